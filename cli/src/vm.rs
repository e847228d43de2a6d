//! The utility VM as `hearth status` and `hearth shutdown` see it: found
//! through the record its shim keeps (`vm.json`), asked about itself through
//! its agent, powered off through its shim.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use containerd_shim_hearth_v2::record::{self, VmRecord};
use hearth_agent_protocol::agent::{ContainerStatus, Empty, HealthResponse, StateContainerResponse};
use hearth_agent_protocol::transport::{AgentAddress, AGENT_PORT};

use crate::config::Config;
use crate::distro::Hearth;

/// The record of the distros' VM, if it runs.
pub fn find_record(cfg: &Config) -> Result<Option<VmRecord>> {
    let vm = cfg.vm_settings()?;
    VmRecord::find(&vm.state_dir, &cfg.namespace)
}

/// What the VM says of itself.
pub struct Status {
    pub record: VmRecord,
    pub health: HealthResponse,
    pub containers: Vec<StateContainerResponse>,
    /// What hearth-vmm's control socket says (None: a VM from a shim
    /// without one); an error is shown, not fatal.
    pub vmm: Option<Result<hearth_vmm::api::VmInfo, String>>,
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(10_000_000_000)
}

pub fn status(cfg: &Config) -> Result<Option<Status>> {
    let Some(record) = find_record(cfg)? else { return Ok(None) };
    let agent = AgentAddress::HybridVsock { socket: record.vsock.clone(), port: AGENT_PORT }
        .connect()
        .with_context(|| format!("connecting to the VM's agent through {}", record.vsock.display()))?;
    let health = agent.health(ctx(), &Empty::new()).context("asking the VM's agent for its health")?;
    let containers = agent.list_containers(ctx(), &Empty::new()).context("listing the VM's containers")?.containers;
    let vmm =
        record.api_socket.as_ref().map(|path| hearth_vmm::api::Client::new(path).info().map_err(|e| e.to_string()));
    Ok(Some(Status { record, health, containers, vmm }))
}

/// A string the guest reported, fit for a terminal: control characters
/// (escape sequences that could rewrite the screen or the window title)
/// shown as `\u{..}` escapes, and at most 128 characters kept.
fn guest_text(s: &str) -> String {
    const MAX: usize = 128;
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == MAX {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{}.{:01}s", s, ms % 1000 / 100),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// hearth-vmm's own view: its state, the balloon, and each disk slot in
/// use with its counters.
fn vmm_lines(info: &hearth_vmm::api::VmInfo) -> String {
    use hearth_vmm::api::protocol::VmState;
    let state = match info.state {
        VmState::Running => "running",
        VmState::Paused => "paused",
    };
    let slots: Vec<_> = info.disks.iter().filter(|d| d.slot).collect();
    let used: Vec<_> = slots.iter().filter(|d| d.id.is_some()).collect();
    let balloon = info.balloon.map(|b| format!(", balloon {} MiB", b.actual_mib)).unwrap_or_default();
    let mut out = format!("vmm:        {state}, disk slots {} in use of {}{balloon}\n", used.len(), slots.len());
    for d in used {
        let s = &d.stats;
        out.push_str(&format!(
            "  disk {:<20} {} MiB{}, {} requests, read {} MiB, written {} MiB, trimmed {} MiB, {} errors\n",
            d.id.as_deref().unwrap_or_default(),
            mib(d.size_bytes),
            if d.read_only { " read-only" } else { "" },
            s.requests,
            mib(s.read_bytes),
            mib(s.written_bytes),
            mib(s.discarded_bytes),
            s.errors,
        ));
    }
    out
}

impl Status {
    /// The report `hearth status` prints.
    pub fn render(&self) -> String {
        let h = &self.health;
        let r = &self.record;
        let host_kernel =
            nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
        let mut out = format!(
            "utility VM: running (hearth-vmm pid {}, shim pid {})\n\
             up:         {}\n\
             kernel:     {} (host: {host_kernel})\n\
             memory:     {} MiB, {} MiB available ({} MiB configured, free pages returned to the host)\n\
             cpus:       {}\n\
             boot id:    {}\n\
             console:    {}\n",
            r.vmm_pid,
            r.shim_pid,
            duration(h.uptime_millis),
            guest_text(&h.kernel_release),
            mib(h.memory_total_bytes),
            mib(h.memory_available_bytes),
            r.memory_mib,
            h.cpus,
            guest_text(&h.boot_id),
            r.console.display(),
        );
        let nic = match &self.vmm {
            Some(Ok(info)) => info.nics.iter().find(|n| n.link_up),
            _ => None,
        };
        match (&r.network, nic) {
            (Some(net), Some(n)) => out.push_str(&format!(
                "network:    {net} (NAT), received {} MiB, sent {} MiB\n",
                mib(n.stats.rx_bytes),
                mib(n.stats.tx_bytes)
            )),
            (Some(net), None) => out.push_str(&format!("network:    {net} (NAT)\n")),
            (None, _) => out.push_str("network:    off (loopback only)\n"),
        }
        if let Some(path) = &r.ports_file {
            let ports: containerd_shim_hearth_v2::forward::Ports =
                std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
            let list = |v: &[u16]| v.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
            let mut line = format!("ports:      forwarded to the host's 127.0.0.1: {}", list(&ports.forwarded));
            if ports.forwarded.is_empty() {
                line = "ports:      forwarded to the host's 127.0.0.1: none listening".into();
            }
            if !ports.taken.is_empty() {
                line.push_str(&format!("; taken on the host, not forwarded: {}", list(&ports.taken)));
            }
            out.push_str(&line);
            out.push('\n');
        }
        match &self.vmm {
            Some(Ok(info)) => out.push_str(&vmm_lines(info)),
            Some(Err(e)) => out.push_str(&format!("vmm:        control socket unavailable: {e}\n")),
            None => {}
        }
        out.push_str(&format!("containers: {}\n", self.containers.len()));
        for c in &self.containers {
            let state = match c.status.enum_value_or_default() {
                ContainerStatus::RUNNING => "running",
                ContainerStatus::CREATED => "created",
                ContainerStatus::STOPPED => "stopped",
                ContainerStatus::PAUSED => "paused",
                ContainerStatus::UNKNOWN => "unknown",
            };
            let execs = c.processes.iter().filter(|p| !p.exited).count();
            let id = guest_text(&c.container_id);
            out.push_str(&format!("  {id:<20} {state:<8} pid {:<6} {execs} exec'd\n", c.pid));
        }
        out
    }
}

impl Hearth {
    /// Terminates every distro and stops every other task of the namespace,
    /// then has the shim power the VM off now; waits until hearth-vmm has
    /// ended. What it stopped, by name.
    pub async fn shutdown(&self) -> Result<Vec<String>> {
        let mut stopped = Vec::new();
        for d in self.distros().await? {
            if self.terminate(&d).await? {
                stopped.push(d.name.clone());
            }
        }
        // Containers that are no distros (ctr run in this namespace).
        let tasks = self
            .cd
            .tasks()
            .list(self.cd.req(containerd_client::services::v1::ListTasksRequest::default()))
            .await
            .map_err(crate::containerd::call_err("listing tasks"))?
            .into_inner()
            .tasks;
        for t in tasks {
            self.cd.kill(&t.id, "", libc::SIGKILL, true).await?;
            let _ = tokio::time::timeout(Duration::from_secs(30), self.cd.wait(&t.id, "")).await;
            self.cd.delete_task(&t.id).await?;
            stopped.push(t.id);
        }
        let Some(r) = find_record(&self.cfg)? else { return Ok(stopped) };
        let address = r.shim_address.clone();
        tokio::task::spawn_blocking(move || record::shutdown_now(&address)).await??;
        let deadline = Instant::now() + Duration::from_secs(60);
        // SAFETY: kill(2) with signal 0 only checks that the process exists.
        while unsafe { libc::kill(r.vmm_pid, 0) } == 0 {
            if Instant::now() > deadline {
                anyhow::bail!("the utility VM (hearth-vmm pid {}) did not power off within 60 s", r.vmm_pid);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(stopped)
    }
}

/// Seconds since `unix` as a duration for people.
pub fn ago(unix: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    duration(now.saturating_sub(unix) * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration(1500), "1.5s");
        assert_eq!(duration(61_000), "1m01s");
        assert_eq!(duration(7_260_000), "2h01m");
    }

    #[test]
    fn guest_strings_cannot_drive_the_terminal() {
        // A window-title escape and a screen clear, as a hostile agent could report them.
        let shown = guest_text("6.12\x1b]0;pwned\x07\x1b[2J\r\n");
        assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
        assert!(shown.starts_with("6.12\\u{1b}]0;pwned"), "{shown:?}");
        assert_eq!(guest_text("6.12.118-hearth"), "6.12.118-hearth");
        let long = guest_text(&"x".repeat(10_000));
        assert_eq!(long.len(), 128 + 3);
    }
}
