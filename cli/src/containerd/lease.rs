//! Leases: what an install or import writes (blobs, snapshots) belongs to
//! no image or container until the last step, and containerd's garbage
//! collector may remove it meanwhile. A lease holds it; it expires by itself
//! if the CLI dies half-way, so nothing is held for ever.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use containerd_client::services::v1::{CreateRequest, DeleteRequest};

use super::{call_err, Containerd};

pub struct Lease {
    pub id: String,
}

/// RFC 3339 in UTC, as containerd's `containerd.io/gc.expire` label wants.
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

impl Lease {
    /// A lease that expires after `ttl` unless deleted first.
    pub async fn create(c: &Containerd, purpose: &str, ttl: Duration) -> Result<Lease> {
        let id = format!("hearth-{purpose}-{}-{}", std::process::id(), unique());
        let labels = HashMap::from([("containerd.io/gc.expire".to_string(), rfc3339(SystemTime::now() + ttl))]);
        c.leases()
            .create(c.req(CreateRequest { id: id.clone(), labels }))
            .await
            .map_err(call_err("creating a lease"))?;
        Ok(Lease { id })
    }

    /// Holds an existing snapshot of `snapshotter` too.
    pub async fn hold_snapshot(&self, c: &Containerd, snapshotter: &str, key: &str) -> Result<()> {
        use containerd_client::services::v1::{AddResourceRequest, Resource};
        let resource = Resource { id: key.into(), r#type: format!("snapshots/{snapshotter}") };
        c.leases()
            .add_resource(c.req(AddResourceRequest { id: self.id.clone(), resource: Some(resource) }))
            .await
            .map_err(call_err("adding a snapshot to a lease"))?;
        Ok(())
    }

    /// Ends the lease: what it held is kept only if something references it.
    pub async fn delete(self, c: &Containerd) -> Result<()> {
        c.leases()
            .delete(c.req(DeleteRequest { id: self.id, sync: false }))
            .await
            .map_err(call_err("deleting a lease"))?;
        Ok(())
    }
}

/// A short id unique enough for names made by this process.
pub fn unique() -> String {
    let n = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{:x}", n & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(1_704_067_200)), "2024-01-01T00:00:00Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661)), "2000-02-29T01:01:01Z");
    }
}
