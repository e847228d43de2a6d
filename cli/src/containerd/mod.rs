//! containerd's API as the CLI uses it: a gRPC channel to containerd's
//! socket (containerd-client), every request in hearth's namespace, and the
//! few services a distro needs: content and images (installing, importing),
//! snapshots and diff (unpacking, the distro's persistent root filesystem),
//! containers (the distro's record) and tasks (its running init, execs).

pub mod content;
pub mod image;
pub mod lease;
pub mod task;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, DeleteContainerRequest, GetContainerRequest, ListContainersRequest,
    UpdateContainerRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::types::Mount;

/// The type URL containerd gives an OCI runtime spec carried in an `Any`.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// The type URL of an OCI process (an exec's spec).
pub const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

/// A connection to containerd, scoped to one namespace.
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
    address: PathBuf,
    /// The lease that requests made through this handle run under (see
    /// lease.rs): what they create is kept from garbage collection until the
    /// lease ends.
    lease: Option<String>,
}

/// A gRPC status as an error that says which call failed.
pub fn call_err(what: &str) -> impl FnOnce(Status) -> anyhow::Error + '_ {
    move |s: Status| anyhow::anyhow!("containerd: {what}: {} ({:?})", s.message(), s.code())
}

pub fn is_not_found(e: &Status) -> bool {
    e.code() == Code::NotFound
}

pub fn is_already_exists(e: &Status) -> bool {
    e.code() == Code::AlreadyExists
}

impl Containerd {
    /// Connects to containerd's socket at `address`, checking that something
    /// answers there.
    pub async fn connect(address: &Path, namespace: &str) -> Result<Containerd> {
        if !address.exists() {
            bail!(
                "containerd's socket {} does not exist: is containerd running? (start it with `systemctl start containerd`, \
                 or name its socket with --address or `containerd_address` in hearth's CLI config)",
                address.display()
            );
        }
        let channel = containerd_client::connect(address)
            .await
            .with_context(|| format!("connecting to containerd at {}", address.display()))?;
        let c = Containerd { channel, namespace: namespace.to_string(), address: address.to_path_buf(), lease: None };
        VersionClient::new(c.channel.clone()).version(()).await.map_err(|s| {
            anyhow::anyhow!(
                "containerd at {} does not answer: {} (is it running, and are you root?)",
                address.display(),
                s.message()
            )
        })?;
        Ok(c)
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn address(&self) -> &Path {
        &self.address
    }

    /// The same connection with requests under `lease`.
    pub fn with_lease(&self, lease: &str) -> Containerd {
        Containerd { lease: Some(lease.to_string()), ..self.clone() }
    }

    /// A request in our namespace (and lease).
    pub fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        md.insert("containerd-namespace", self.namespace.parse().expect("a namespace is ASCII"));
        if let Some(l) = &self.lease {
            md.insert("containerd-lease", l.parse().expect("a lease id is ASCII"));
        }
        r
    }

    pub fn containers(&self) -> ContainersClient<Channel> {
        ContainersClient::new(self.channel.clone())
    }
    pub fn content(&self) -> ContentClient<Channel> {
        // Layers are large: lift tonic's 4 MiB default for the reads.
        ContentClient::new(self.channel.clone()).max_decoding_message_size(64 << 20)
    }
    pub fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
    }
    pub fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }
    pub fn diff(&self) -> DiffClient<Channel> {
        DiffClient::new(self.channel.clone())
    }
    pub fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel.clone())
    }
    pub fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }

    // Containers: the records distros are kept as.

    pub async fn container(&self, id: &str) -> Result<Option<Container>> {
        match self.containers().get(self.req(GetContainerRequest { id: id.into() })).await {
            Ok(r) => Ok(r.into_inner().container),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(call_err("getting a container")(e)),
        }
    }

    /// Containers matching a containerd filter (`labels."k"==v`, say).
    pub async fn list_containers(&self, filter: &str) -> Result<Vec<Container>> {
        let filters = if filter.is_empty() { vec![] } else { vec![filter.to_string()] };
        let r = self
            .containers()
            .list(self.req(ListContainersRequest { filters }))
            .await
            .map_err(call_err("listing containers"))?;
        Ok(r.into_inner().containers)
    }

    pub async fn create_container(&self, c: Container) -> Result<Container> {
        let id = c.id.clone();
        let r = self.containers().create(self.req(CreateContainerRequest { container: Some(c) })).await;
        match r {
            Ok(r) => r.into_inner().container.context("containerd returned no container"),
            Err(e) if is_already_exists(&e) => {
                bail!("a container named {id:?} already exists in namespace {}", self.namespace)
            }
            Err(e) => Err(call_err("creating a container")(e)),
        }
    }

    /// Replaces the fields of `c` that `paths` name (`spec`, `labels`...).
    pub async fn update_container(&self, c: Container, paths: &[&str]) -> Result<()> {
        let mask = prost_types::FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() };
        self.containers()
            .update(self.req(UpdateContainerRequest { container: Some(c), update_mask: Some(mask) }))
            .await
            .map_err(call_err("updating a container"))?;
        Ok(())
    }

    pub async fn delete_container(&self, id: &str) -> Result<()> {
        match self.containers().delete(self.req(DeleteContainerRequest { id: id.into() })).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(call_err("deleting a container")(e)),
        }
    }

    // Snapshots.

    /// A new active (writable) snapshot `key` on top of the committed `parent`.
    pub async fn prepare_snapshot(
        &self,
        snapshotter: &str,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let r = self
            .snapshots()
            .prepare(self.req(PrepareSnapshotRequest {
                snapshotter: snapshotter.into(),
                key: key.into(),
                parent: parent.into(),
                labels,
            }))
            .await
            .map_err(call_err("preparing a snapshot"))?;
        Ok(r.into_inner().mounts)
    }

    /// How to mount snapshot `key`.
    pub async fn snapshot_mounts(&self, snapshotter: &str, key: &str) -> Result<Vec<Mount>> {
        let r = self
            .snapshots()
            .mounts(self.req(MountsRequest { snapshotter: snapshotter.into(), key: key.into() }))
            .await
            .map_err(call_err("getting a snapshot's mounts"))?;
        Ok(r.into_inner().mounts)
    }

    pub async fn remove_snapshot(&self, snapshotter: &str, key: &str) -> Result<()> {
        match self
            .snapshots()
            .remove(self.req(RemoveSnapshotRequest { snapshotter: snapshotter.into(), key: key.into() }))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(call_err("removing a snapshot")(e)),
        }
    }
}

/// Mounts containerd's mount list (a snapshot's) at `target` on this host,
/// as containerd's own mount helper does: one mount, overlay or bind.
pub fn mount_all(mounts: &[Mount], target: &Path, read_only: bool) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    let [m] = mounts else {
        bail!("expected one mount for a snapshot, containerd gave {}", mounts.len());
    };
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in &m.options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            other => data.push(other.to_string()),
        }
    }
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let fstype = if flags.contains(MsFlags::MS_BIND) { None } else { Some(m.r#type.as_str()) };
    let data = data.join(",");
    mount(Some(m.source.as_str()), target, fstype, flags, (!data.is_empty()).then_some(data.as_str()))
        .with_context(|| format!("mounting the snapshot ({} {}) at {}", m.r#type, m.source, target.display()))?;
    if read_only && flags.contains(MsFlags::MS_BIND) {
        // A bind mount takes read-only only on a remount.
        mount(None::<&str>, target, None::<&str>, flags | MsFlags::MS_REMOUNT, None::<&str>)
            .with_context(|| format!("making {} read-only", target.display()))?;
    }
    Ok(())
}
