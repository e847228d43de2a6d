//! The utility VM as the shim sees it: hearth-vmm booted on first use with the
//! agent initramfs, a vsock socket to reach the agent, and two directories
//! exported over virtio-fs (virtio-fs devices cannot be added to a running
//! VM, so each carries every container's files, bind-mounted into it):
//!
//! - `roots`: container root filesystems, cached by the guest without
//!   revalidation (`cache=always`): only the container changes its root, and
//!   every lookup saved is a round trip to virtiofsd saved (a distro's boot
//!   makes tens of thousands); with extended attributes (file capabilities,
//!   and Docker's vfs driver copies them);
//! - `shared`: bind-mount sources, host directories the host may change
//!   under the guest, cached with revalidation (`cache=auto`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use containerd_shim::monitor::{monitor_subscribe, wait_pid, Topic};
use hearth_agent_protocol::agent::{Empty, MountRequest, SyncTimeRequest};
use hearth_agent_protocol::transport::{AgentAddress, AGENT_PORT};
use hearth_agent_protocol::AgentClient;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::config::Config;

/// Where the shared directory appears in the guest.
pub const GUEST_SHARED: &str = "/run/hearth/shared";
const SHARE_TAG: &str = "hearth";
/// Where the root filesystems' directory appears in the guest.
pub const GUEST_ROOTS: &str = "/run/hearth/roots";
const ROOTS_TAG: &str = "hearth-roots";

pub struct Vm {
    pub dir: PathBuf,
    pub shared: PathBuf,
    pub roots: PathBuf,
    pub vsock: PathBuf,
    pub agent: AgentClient,
    pub vmm_pid: i32,
    pub boot_id: String,
}

pub fn ctx(secs: i64) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(secs * 1_000_000_000)
}

impl Vm {
    /// Boots a VM in `dir` and waits for its agent. `on_exit` runs (on a
    /// thread of its own) when hearth-vmm ends, whatever the reason, with its
    /// exit code and the tail of the console.
    pub fn boot(cfg: &Config, dir: &Path, on_exit: impl FnOnce(i32, String) + Send + 'static) -> Result<Vm> {
        cfg.check()?;
        std::fs::create_dir_all(dir)?;
        let shared = dir.join("shared");
        let roots = dir.join("roots");
        for d in [&shared, &roots] {
            std::fs::create_dir_all(d)?;
            // A shared mount, so that bind mounts made under it later reach
            // virtiofsd's own mount namespace.
            mount(Some(d), d, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .with_context(|| format!("binding {}", d.display()))?;
            mount(None::<&str>, d, None::<&str>, MsFlags::MS_SHARED, None::<&str>)
                .with_context(|| format!("making {} a shared mount", d.display()))?;
        }
        let vsock = dir.join("vsock.sock");
        let console = dir.join("console.log");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let cmdline = format!("hearth.time={now} {}", cfg.extra_cmdline);
        let mut cmd = Command::new(&cfg.vmm);
        cmd.arg("--kernel")
            .arg(&cfg.kernel)
            .arg("--initramfs")
            .arg(&cfg.initramfs)
            .arg("--cpus")
            .arg(cfg.vcpus.to_string())
            .arg("--memory")
            .arg(cfg.memory_mib.to_string())
            .arg("--console")
            .arg(&console)
            .arg("--vsock")
            .arg(format!("cid=3,socket={}", vsock.display()))
            .arg("--fs")
            .arg(format!("tag={SHARE_TAG},dir={}", shared.display()))
            .arg("--fs")
            .arg(format!("tag={ROOTS_TAG},dir={},cache=always,xattr=on", roots.display()))
            .arg("--balloon")
            .args(["--cmdline", cmdline.trim()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("vmm.log"))?);
        if let Some(v) = &cfg.virtiofsd {
            cmd.env("HEARTH_VIRTIOFSD", v);
        }
        // Subscribe before spawning: the shim's reaper reaps every child and
        // tells subscribers, so a fast exit is not missed.
        let sub = monitor_subscribe(Topic::Pid).map_err(|e| anyhow::anyhow!("{e}"))?;
        let child = cmd.spawn().with_context(|| format!("starting {}", cfg.vmm.display()))?;
        let pid = child.id() as i32;
        std::mem::forget(child); // reaped by the shim's reaper
        let console_for_exit = console.clone();
        std::thread::spawn(move || {
            let code = wait_pid(pid, sub);
            on_exit(code, tail(&console_for_exit, 30));
        });
        tracing_log(&format!("booting the utility VM (hearth-vmm pid {pid}) in {}", dir.display()));
        let addr = AgentAddress::HybridVsock { socket: vsock.clone(), port: AGENT_PORT };
        let agent = match addr.connect_when_ready(Duration::from_secs(180)) {
            Ok(a) => a,
            Err(e) => {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
                bail!("the utility VM's agent did not answer: {e}\n--- console ---\n{}", tail(&console, 30));
            }
        };
        for (tag, target) in [(SHARE_TAG, GUEST_SHARED), (ROOTS_TAG, GUEST_ROOTS)] {
            let mount_req = MountRequest {
                source: tag.into(),
                fstype: "virtiofs".into(),
                target: target.into(),
                ..Default::default()
            };
            agent.mount(ctx(60), &mount_req).with_context(|| format!("mounting {target} in the guest"))?;
        }
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as i64;
        let _ = agent.sync_time(ctx(10), &SyncTimeRequest { unix_nanos: nanos, ..Default::default() });
        let boot_id = agent.health(ctx(10), &Empty::new())?.boot_id;
        Ok(Vm { dir: dir.to_path_buf(), shared, roots, vsock, agent, vmm_pid: pid, boot_id })
    }

    /// Asks the agent to stop everything and power off; kills the VMM if it
    /// does not end by itself. Then removes the VM's directory.
    pub fn shutdown(&self) {
        let _ = self.agent.shutdown(ctx(30), &Empty::new());
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline && Path::new(&format!("/proc/{}", self.vmm_pid)).exists() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.vmm_pid), nix::sys::signal::SIGKILL);
        self.cleanup();
    }

    /// Removes container `id`'s directories from both shares, once its
    /// mounts there are undone: its bind targets (`shared/ID/mounts/N`) and
    /// its root (`roots/ID/rootfs`), never descending into them. Should a
    /// mount have stayed (its unmount failed), removing its mount point
    /// fails (EBUSY) and the files under it are left alone.
    pub fn forget_dirs(&self, id: &str) {
        let shared = self.shared.join(id);
        for e in std::fs::read_dir(shared.join("mounts")).into_iter().flatten().flatten() {
            let _ = if e.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir(e.path())
            } else {
                std::fs::remove_file(e.path())
            };
        }
        for d in [shared.join("mounts"), shared, self.roots.join(id).join("rootfs"), self.roots.join(id)] {
            let _ = std::fs::remove_dir(d);
        }
    }

    /// Unmounts the shared directories and removes the VM's directory.
    pub fn cleanup(&self) {
        let _ = umount2(&self.shared, MntFlags::MNT_DETACH);
        let _ = umount2(&self.roots, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn tracing_log(msg: &str) {
    log::info!("{msg}");
}
