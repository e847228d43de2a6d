//! hearth's agent: PID 1 of the utility VM, serving the shim over ttrpc on
//! vsock and running OCI containers with libcontainer. The same program runs
//! natively on a host (`hearth-agent serve --listen unix:PATH`), which is how
//! the container lifecycle is tested without a VM.
//!
//! Where things live:
//! - [`pid1`]: what PID 1 does before serving (mounts, cgroup v2, hostname,
//!   clock, network) and the power-off at the end;
//! - [`service`]: the ttrpc service (protocol in `protocol/proto/agent.proto`);
//! - [`container`]: the container registry and lifecycle on libcontainer,
//!   bundles and overlay root filesystems, cgroup statistics, OOM events;
//! - [`stdio`]: process stdio over vsock (or Unix) streams, pipes and PTYs;
//! - [`reaper`]: reaping children and keeping their exit statuses.

pub mod container;
pub mod error;
pub mod forward;
pub mod pid1;
pub mod reaper;
pub mod service;
pub mod stdio;
pub mod system;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use hearth_agent_protocol::agent_ttrpc::create_agent;
use libc::SIGPWR;
use signal_hook::consts::{SIGCHLD, SIGINT, SIGTERM};

use crate::container::{Containers, RuntimeConfig};
use crate::reaper::Reaper;
use crate::service::{AgentService, Mode};
use crate::stdio::Dialer;

/// Where the service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Vsock(u32),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Listen::Unix(PathBuf::from(p.trim_start_matches("//"))));
        }
        if let Some(p) = s.strip_prefix("vsock:") {
            return p.parse().map(Listen::Vsock).map_err(|_| format!("{s:?}: the vsock port is not a number"));
        }
        Err(format!("{s:?}: listen on unix:/PATH or vsock:PORT"))
    }
}

pub struct Options {
    pub listen: Listen,
    pub state_dir: PathBuf,
    pub mode: Mode,
}

/// Serves until shut down. In VM mode this never returns.
pub fn serve(opts: Options) -> anyhow::Result<()> {
    // Orphans in containers come to us, so that nothing stays a zombie and
    // exec'd processes' children are reaped too.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        tracing::warn!("cannot become a subreaper: {}", std::io::Error::last_os_error());
    }
    let reaper = Arc::new(Reaper::default());
    let dialer = match &opts.listen {
        Listen::Unix(p) => Dialer::Unix(p.clone()),
        Listen::Vsock(_) => Dialer::Vsock,
    };
    let containers = Containers::new(RuntimeConfig { state_dir: opts.state_dir.clone(), dialer }, reaper.clone())
        .with_context(|| format!("preparing the state directory {}", opts.state_dir.display()))?;
    let mode = opts.mode;
    let socket = match &opts.listen {
        Listen::Unix(p) => Some(p.clone()),
        Listen::Vsock(_) => None,
    };
    let on_shutdown: Arc<dyn Fn() + Send + Sync> = match mode {
        Mode::Vm => Arc::new(|| pid1::power_off()),
        Mode::Native => Arc::new(move || {
            if let Some(p) = &socket {
                let _ = std::fs::remove_file(p);
            }
            std::process::exit(0)
        }),
    };
    let addr = match &opts.listen {
        Listen::Unix(p) => {
            if p.exists() {
                std::fs::remove_file(p).with_context(|| format!("removing the stale socket {}", p.display()))?;
            }
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)?;
            }
            format!("unix://{}", p.display())
        }
        Listen::Vsock(port) => format!("vsock://-1:{port}"),
    };
    let service = AgentService { containers: containers.clone(), mode, on_shutdown: on_shutdown.clone() };
    let mut server = ttrpc::Server::new()
        .bind(&addr)
        .with_context(|| format!("listening on {addr}"))?
        .register_service(create_agent(Arc::new(service)))
        // Waits and OOM-event calls each hold a thread while they block.
        .set_thread_count_default(4)
        .set_thread_count_max(256);
    server.start().with_context(|| format!("serving on {addr}"))?;
    tracing::info!(%addr, mode = mode.name(), "hearth-agent serving");
    if let Listen::Vsock(_) = &opts.listen {
        // Failing to relay costs localhost forwarding, not the agent.
        if let Err(e) = forward::spawn_relay() {
            tracing::warn!("localhost forwarding relay: {e}");
        }
    }

    let mut signals = signal_hook::iterator::Signals::new([SIGCHLD, SIGTERM, SIGINT, SIGPWR])?;
    for sig in signals.forever() {
        match sig {
            SIGCHLD => reaper.reap_all(),
            _ => {
                tracing::info!(signal = sig, "stopping containers and shutting down");
                // Keep reaping while containers stop.
                let r = reaper.clone();
                std::thread::spawn(move || loop {
                    r.reap_all();
                    std::thread::sleep(std::time::Duration::from_millis(20));
                });
                containers.stop_all(std::time::Duration::from_secs(5));
                on_shutdown();
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!("unix:/run/a.sock".parse::<Listen>().unwrap(), Listen::Unix("/run/a.sock".into()));
        assert_eq!("unix:///run/a.sock".parse::<Listen>().unwrap(), Listen::Unix("/run/a.sock".into()));
        assert_eq!("vsock:1024".parse::<Listen>().unwrap(), Listen::Vsock(1024));
        assert!("tcp:1".parse::<Listen>().is_err());
        assert!("vsock:x".parse::<Listen>().is_err());
    }
}
