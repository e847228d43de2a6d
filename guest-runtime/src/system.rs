//! Agent-level requests that are not about one container: health, the guest
//! clock, guest mounts, and the facts a caller checks (boot id, kernel).

use std::path::Path;
use std::time::Duration;

use hearth_agent_protocol::agent::{HealthResponse, MountRequest};
use nix::mount::{mount, MsFlags};

use crate::error::{AgentError, Result};

pub fn health(mode: &str) -> HealthResponse {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default().trim().to_string();
    let meminfo = read("/proc/meminfo");
    let uptime = read("/proc/uptime").split_whitespace().next().and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    HealthResponse {
        version: env!("CARGO_PKG_VERSION").into(),
        boot_id: read("/proc/sys/kernel/random/boot_id"),
        kernel_release: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        uptime_millis: (uptime * 1000.0) as u64,
        mode: mode.into(),
        memory_total_bytes: meminfo_bytes(&meminfo, "MemTotal"),
        memory_available_bytes: meminfo_bytes(&meminfo, "MemAvailable"),
        cpus: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(0),
        ..Default::default()
    }
}

/// A `Key:   N kB` line of /proc/meminfo, in bytes.
fn meminfo_bytes(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Sets the guest's wall clock (the VM has no battery-backed clock the agent
/// trusts, and it drifts across host suspend).
pub fn set_time(unix_nanos: i64) -> Result<()> {
    if unix_nanos <= 0 {
        return Err(AgentError::InvalidArgument("the time must be after 1970".into()));
    }
    let ts = nix::sys::time::TimeSpec::from(Duration::from_nanos(unix_nanos as u64));
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(|e| AgentError::internal("setting the clock", e))
}

/// The flags mount(2) takes as flags; everything else goes in its data.
fn split_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

/// Mounts a virtio-fs tag, a block device or anything mount(2) takes at an
/// absolute guest path, creating the directory.
pub fn mount_request(req: &MountRequest) -> Result<()> {
    let target = Path::new(&req.target);
    if !target.is_absolute() || req.target.split('/').any(|c| c == "..") {
        return Err(AgentError::InvalidArgument(format!(
            "mount target {:?} must be an absolute path without '..'",
            req.target
        )));
    }
    if req.source.is_empty() {
        return Err(AgentError::InvalidArgument("mount source is empty: give a virtio-fs tag or a device".into()));
    }
    std::fs::create_dir_all(target).map_err(|e| AgentError::internal(format!("creating {}", req.target), e))?;
    let (flags, data) = split_options(&req.options);
    let fstype = if req.fstype.is_empty() { None } else { Some(req.fstype.as_str()) };
    let data = if data.is_empty() { None } else { Some(data.as_str()) };
    mount(Some(req.source.as_str()), target, fstype, flags, data).map_err(|e| {
        let hint = match e {
            nix::errno::Errno::ENOENT => " (no such device or tag: is it attached to the VM?)",
            nix::errno::Errno::ENODEV => " (the guest kernel does not know this filesystem type)",
            nix::errno::Errno::EINVAL if req.fstype == "virtiofs" => {
                " (no virtio-fs device has this tag: check the VM's --fs tag=)"
            }
            _ => "",
        };
        AgentError::FailedPrecondition(format!("mounting {} ({}) on {}: {e}{hint}", req.source, req.fstype, req.target))
    })?;
    tracing::info!(source = %req.source, target = %req.target, fstype = %req.fstype, "mounted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options_split_into_flags_and_data() {
        let opts: Vec<String> = ["ro", "nosuid", "rbind", "lowerdir=/a", "size=1m"].map(String::from).into();
        let (flags, data) = split_options(&opts);
        assert!(flags.contains(MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_BIND | MsFlags::MS_REC));
        assert_eq!(data, "lowerdir=/a,size=1m");
    }

    #[test]
    fn relative_or_escaping_targets_are_refused() {
        for t in ["mnt", "/a/../etc"] {
            let req = MountRequest {
                source: "tag".into(),
                fstype: "virtiofs".into(),
                target: t.into(),
                ..Default::default()
            };
            assert!(matches!(mount_request(&req), Err(AgentError::InvalidArgument(_))), "{t}");
        }
    }

    #[test]
    fn health_reports_the_kernel_and_boot() {
        let h = health("native");
        assert_eq!(h.boot_id.len(), 36);
        assert!(!h.kernel_release.is_empty());
        assert_eq!(h.mode, "native");
        assert!(h.memory_total_bytes >= h.memory_available_bytes && h.memory_available_bytes > 0, "{h:?}");
        assert!(h.cpus >= 1);
    }

    #[test]
    fn meminfo_lines_in_bytes() {
        let m = "MemTotal:        1004536 kB\nMemFree:          900000 kB\nMemAvailable:     950000 kB\n";
        assert_eq!(meminfo_bytes(m, "MemTotal"), 1004536 * 1024);
        assert_eq!(meminfo_bytes(m, "MemAvailable"), 950000 * 1024);
        assert_eq!(meminfo_bytes(m, "Missing"), 0);
    }
}
