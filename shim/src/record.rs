//! The record a shim keeps of its running VM, `vm.json` in the VM's
//! directory (under `state_dir`), for tools beside containerd: `hearth
//! status` reads it to find the VM and its agent, `hearth shutdown` to ask
//! the shim to power the VM off now. It goes with the VM's directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub const FILE: &str = "vm.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The containerd namespace whose containers run in the VM.
    pub namespace: String,
    pub shim_pid: u32,
    /// The shim's ttrpc address (`unix://...`), where containerd reaches it.
    pub shim_address: String,
    pub vmm_pid: i32,
    pub boot_id: String,
    /// When the VM was booted, in Unix seconds.
    pub booted_at: u64,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub kernel: PathBuf,
    /// hearth-vmm's hybrid vsock socket, through which the agent answers.
    pub vsock: PathBuf,
    pub console: PathBuf,
    /// hearth-vmm's control socket (`hearth_vmm::api`); absent in records
    /// of shims from before it.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// The VM's network, `ADDR/PREFIX via BRIDGE` (docs/networking.md);
    /// None with `network = "off"` and in older records.
    #[serde(default)]
    pub network: Option<String>,
    /// What localhost forwarding forwards (`forward::Ports`, kept up to
    /// date by the shim); None when it is off, and in older records.
    #[serde(default)]
    pub ports_file: Option<PathBuf>,
}

impl VmRecord {
    pub fn write(&self, vm_dir: &Path) -> Result<()> {
        let tmp = vm_dir.join(format!("{FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, vm_dir.join(FILE))?;
        Ok(())
    }

    /// The record of `namespace`'s running VM under `state_dir`, if one
    /// runs (its hearth-vmm alive).
    pub fn find(state_dir: &Path, namespace: &str) -> Result<Option<VmRecord>> {
        let entries = match std::fs::read_dir(state_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", state_dir.display())),
        };
        for e in entries.flatten() {
            let Ok(bytes) = std::fs::read(e.path().join(FILE)) else { continue };
            let Ok(r) = serde_json::from_slice::<VmRecord>(&bytes) else { continue };
            // SAFETY: kill(2) with signal 0 only checks that the process exists.
            let alive = unsafe { libc::kill(r.vmm_pid, 0) } == 0;
            if r.namespace == namespace && alive {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }
}

/// Asks the shim at `address` to power its VM off now and exit (the Task
/// API's Shutdown with `now`); it does so only once it has no containers.
pub fn shutdown_now(address: &str) -> Result<()> {
    use containerd_shim::protos::shim::shim_ttrpc::TaskClient;
    use containerd_shim::protos::ttrpc::context::with_timeout;
    let client = containerd_shim::protos::ttrpc::Client::connect(address)
        .with_context(|| format!("connecting to the shim at {address}"))?;
    let req = containerd_shim::protos::api::ShutdownRequest { now: true, ..Default::default() };
    TaskClient::new(client)
        .shutdown(with_timeout(30_000_000_000), &req)
        .with_context(|| format!("asking the shim at {address} to shut down"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn found_by_namespace_while_its_vmm_lives() {
        let state = std::env::temp_dir().join(format!("hearth-record-{}", std::process::id()));
        let mk = |ns: &str, pid: i32| {
            let dir = state.join(format!("{ns}-{pid}"));
            std::fs::create_dir_all(&dir).unwrap();
            let r = VmRecord {
                namespace: ns.into(),
                shim_pid: 1,
                shim_address: "unix:///x".into(),
                vmm_pid: pid,
                boot_id: "b".into(),
                booted_at: 5,
                memory_mib: 512,
                vcpus: 2,
                kernel: "/k".into(),
                vsock: "/v".into(),
                console: "/c".into(),
                api_socket: Some("/a".into()),
                network: Some("10.89.0.2/24 via hearth0".into()),
                ports_file: None,
            };
            r.write(&dir).unwrap();
            r
        };
        let me = mk("hearth", std::process::id() as i32);
        mk("other", std::process::id() as i32);
        assert_eq!(VmRecord::find(&state, "hearth").unwrap(), Some(me));
        assert_eq!(VmRecord::find(&state, "nobody").unwrap(), None);
        std::fs::remove_dir_all(&state).unwrap();
        mk("dead", i32::MAX);
        assert_eq!(VmRecord::find(&state, "dead").unwrap(), None, "a record whose VMM is gone");
        std::fs::remove_dir_all(&state).unwrap();
        assert_eq!(VmRecord::find(&state, "hearth").unwrap(), None, "no state dir: no VM");
    }
}
