//! The utility VM as the shim sees it: hearth-vmm booted on first use with the
//! agent initramfs, a vsock socket to reach the agent, and one shared
//! directory exported over virtio-fs into which container root filesystems and
//! bind mounts are bind-mounted (virtio-fs devices cannot be added to a
//! running VM, so one share carries every container's files).

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

pub struct Vm {
    pub dir: PathBuf,
    pub shared: PathBuf,
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
        std::fs::create_dir_all(&shared)?;
        // A shared mount, so that bind mounts made under it later reach
        // virtiofsd's own mount namespace.
        mount(Some(&shared), &shared, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .context("binding the shared dir")?;
        mount(None::<&str>, &shared, None::<&str>, MsFlags::MS_SHARED, None::<&str>)
            .context("making the shared dir a shared mount")?;
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
        let mount_req = MountRequest {
            source: SHARE_TAG.into(),
            fstype: "virtiofs".into(),
            target: GUEST_SHARED.into(),
            ..Default::default()
        };
        agent.mount(ctx(60), &mount_req).context("mounting the shared directory in the guest")?;
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as i64;
        let _ = agent.sync_time(ctx(10), &SyncTimeRequest { unix_nanos: nanos, ..Default::default() });
        let boot_id = agent.health(ctx(10), &Empty::new())?.boot_id;
        Ok(Vm { dir: dir.to_path_buf(), shared, vsock, agent, vmm_pid: pid, boot_id })
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

    /// Unmounts the shared directory and removes the VM's directory.
    pub fn cleanup(&self) {
        let _ = umount2(&self.shared, MntFlags::MNT_DETACH);
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
