//! The shim binary's commands: `start` (find or spawn the shim that owns the
//! VM for this container's group), `delete` (clean up after a shim that died),
//! and serving the Task service.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{api, Config as ShimConfig, DeleteResponse, ExitSignal, Flags, StartOpts};

use crate::config::{Config, VmMode};
use crate::task::Service;

pub struct HearthShim {
    exit: Arc<ExitSignal>,
    socket: String,
    namespace: String,
    id: String,
    cfg: Config,
    cfg_error: Option<String>,
    debug: bool,
}

/// The group a container's shim belongs to: one VM per group.
fn grouping(cfg: &Config, id: &str) -> String {
    match cfg.mode {
        VmMode::Shared => "hearth-shared".to_string(),
        VmMode::PerPod => {
            // CRI sandboxes: the sandbox id annotation groups a pod's containers.
            let spec =
                std::fs::read("config.json").ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
            spec.and_then(|s| s["annotations"]["io.kubernetes.cri.sandbox-id"].as_str().map(String::from))
                .unwrap_or_else(|| id.to_string())
        }
    }
}

/// The ConfigPath of the runtime options containerd writes to `start`'s
/// stdin (a marshalled `Any`, as it does for every shim).
fn start_options_config_path() -> Option<std::path::PathBuf> {
    use containerd_shim::protos::protobuf::well_known_types::any::Any;
    use containerd_shim::protos::protobuf::Message;
    use std::io::Read;
    if nix::unistd::isatty(0).unwrap_or(true) {
        return None;
    }
    let mut buf = Vec::new();
    std::io::stdin().read_to_end(&mut buf).ok()?;
    let any = Any::parse_from_bytes(&buf).ok()?;
    crate::config::config_path_from_options(&any.type_url, &any.value)
}

/// A short stable hash (FNV-1a) to name a group after a config path.
pub(crate) fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c9dc5u32, |h, b| (h ^ *b as u32).wrapping_mul(0x0100_0193))
}

impl containerd_shim::Shim for HearthShim {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, config: &mut ShimConfig) -> Self {
        // A configuration that does not load is reported by every create (see
        // task.rs); grouping and logging meanwhile use the defaults.
        let (cfg, cfg_error) = match Config::load() {
            Ok(c) => (c, None),
            Err(e) => (Config::default(), Some(format!("{e:#}"))),
        };
        // Our own logger (logging.rs), installed when serving.
        config.no_setup_logger = true;
        HearthShim {
            exit: Arc::new(ExitSignal::default()),
            socket: args.socket.clone(),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            cfg,
            cfg_error,
            debug: args.debug,
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // A runtime option's ConfigPath replaces the configuration: for the
        // grouping here, and for the shim started below (through its
        // environment). Its VMs are a group of their own.
        let config_path = start_options_config_path();
        let (cfg, suffix) = match &config_path {
            Some(p) => {
                let cfg = Config::from_file(p).map_err(|e| {
                    containerd_shim::Error::InvalidArgument(format!("{e:#} (runtime option ConfigPath)"))
                })?;
                (cfg, format!("-{:08x}", fnv1a(p.as_os_str().as_encoded_bytes())))
            }
            None => (self.cfg.clone(), String::new()),
        };
        let group = grouping(&cfg, &opts.id) + &suffix;
        let address = containerd_shim::socket_address(&opts.address, &opts.namespace, &group);
        // A shim of this group already serving: containerd talks to it.
        let path = address.strip_prefix("unix://").unwrap_or(&address);
        let address = if UnixStream::connect(path).is_ok() {
            address
        } else {
            let _ = std::fs::remove_file(path);
            let path = config_path.as_ref().map(|p| p.display().to_string());
            let vars = path.as_deref().map(|p| vec![("HEARTH_CONFIG", p)]).unwrap_or_default();
            containerd_shim::spawn(opts, &group, vars)?.1
        };
        // containerd reads the bundle's `address` file when it restarts, to
        // find the shim again (start runs in the bundle).
        std::fs::write("address", &address)
            .map_err(|e| containerd_shim::Error::Other(format!("writing the address file: {e}")))?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // The shim that served this container is gone (its VMM died with it:
        // vm.rs binds it to the shim); what may be left on the host is the
        // rootfs mount in the bundle and the dead shim's VM directory with
        // the shares' mounts.
        let rootfs = Path::new("rootfs");
        if rootfs.exists() {
            let _ = nix::mount::umount2(rootfs, nix::mount::MntFlags::MNT_DETACH);
        }
        crate::vm::reap_orphans(&self.cfg.state_dir);
        crate::network::teardown_stale(&self.cfg.network_bridge);
        log::info!("cleaned up after container {} in {}", self.id, self.namespace);
        let mut r = DeleteResponse::new();
        r.exit_status = 137;
        r.exited_at = Some(containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp::now()).into();
        Ok(r)
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        crate::logging::init(&self.cfg.log_level, self.debug);
        Service::new(
            self.cfg.clone(),
            self.cfg_error.clone(),
            self.namespace.clone(),
            self.socket.clone(),
            publisher,
            self.exit.clone(),
        )
    }
}

#[allow(dead_code)]
fn _api_types_in_use(_: api::Empty) {}
