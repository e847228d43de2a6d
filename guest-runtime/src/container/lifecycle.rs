//! The agent's containers and their processes, from create to delete.
//!
//! libcontainer creates each container (and each exec'd process) as a child
//! of the agent; the [`Reaper`] records how they end. A container's lock is
//! never held while waiting for a process, so a blocked `WaitProcess` does not
//! stop the rest of the service.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hearth_agent_protocol::agent::{
    ContainerStatus as WireStatus, CreateContainerRequest, ExecProcessRequest, ProcessState, StateContainerResponse,
    StatsResponse, Stdio, WaitProcessResponse,
};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container as LcContainer, ContainerStatus};
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::Signal;
use oci_spec::runtime::LinuxResources;

use super::bundle::{self, Bundle};
use super::cgroup::Cgroup;
use super::oom::OomEvents;
use crate::error::{AgentError, Result};
use crate::reaper::{Exit, Reaper};
use crate::stdio::{Dialer, ProcessEnds, StdioSession};

/// How long output may trail a process's exit before `WaitProcess` answers
/// anyway (a daemonised grandchild can hold the pipe open for ever).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where libcontainer's state, bundles and console sockets live.
    pub state_dir: PathBuf,
    pub dialer: Dialer,
}

struct Process {
    pid: i32,
    stdio: Arc<Mutex<StdioSession>>,
    exit: Option<WaitProcessResponse>,
}

struct Container {
    id: String,
    lc: LcContainer,
    bundle: Bundle,
    cgroup: Cgroup,
    init: Process,
    execs: HashMap<String, Process>,
    /// The OOM-kill counter when last looked at, and when created.
    oom_kills_seen: u64,
    oom_kills_at_create: u64,
    /// The relay to its caller's resolver on the host, if it has one.
    dns: Option<super::dns::DnsRelay>,
}

impl Container {
    fn process(&mut self, exec_id: &str) -> Result<&mut Process> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        let id = &self.id;
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| AgentError::NotFound(format!("container {id:?} has no process {exec_id:?}")))
    }

    fn status(&mut self) -> ContainerStatus {
        let _ = self.lc.refresh_status();
        self.lc.status()
    }
}

pub struct Containers {
    cfg: RuntimeConfig,
    reaper: Arc<Reaper>,
    table: Mutex<HashMap<String, Arc<Mutex<Container>>>>,
    pub oom: Arc<OomEvents>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn lc_error(what: &str, id: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::Internal(format!("{what} container {id:?}: {e}"))
}

fn stdio_or_default(s: Option<&Stdio>) -> Stdio {
    s.cloned().unwrap_or_default()
}

fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

impl Containers {
    pub fn new(cfg: RuntimeConfig, reaper: Arc<Reaper>) -> std::io::Result<Arc<Self>> {
        for d in ["libcontainer", "bundles", "stdio"] {
            std::fs::create_dir_all(cfg.state_dir.join(d))?;
        }
        let me = Arc::new(Containers { cfg, reaper, table: Mutex::new(HashMap::new()), oom: Default::default() });
        let weak = Arc::downgrade(&me);
        std::thread::Builder::new().name("oom-watch".into()).spawn(move || {
            while let Some(me) = weak.upgrade() {
                me.check_oom();
                drop(me);
                std::thread::sleep(Duration::from_millis(200));
            }
        })?;
        Ok(me)
    }

    fn lc_root(&self) -> PathBuf {
        self.cfg.state_dir.join("libcontainer")
    }

    fn scratch(&self) -> PathBuf {
        self.cfg.state_dir.join("stdio")
    }

    fn get(&self, id: &str) -> Result<Arc<Mutex<Container>>> {
        lock(&self.table).get(id).cloned().ok_or_else(|| AgentError::NotFound(format!("no container {id:?}")))
    }

    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.table).keys().cloned().collect();
        ids.sort();
        ids
    }

    fn builder(&self, id: &str, ends: ProcessEnds) -> Result<ContainerBuilder> {
        let mut b = ContainerBuilder::new(id.to_string(), SyscallType::default())
            .with_root_path(self.lc_root())
            .map_err(|e| lc_error("preparing", id, e))?
            .with_console_socket(ends.console_socket.as_ref());
        if let Some(fd) = ends.stdin {
            b = b.with_stdin(fd);
        }
        if let Some(fd) = ends.stdout {
            b = b.with_stdout(fd);
        }
        if let Some(fd) = ends.stderr {
            b = b.with_stderr(fd);
        }
        Ok(b)
    }

    pub fn create(&self, req: &CreateContainerRequest) -> Result<u32> {
        let id = req.container_id.as_str();
        bundle::check_id(id)?;
        if lock(&self.table).contains_key(id) {
            return Err(AgentError::AlreadyExists(format!("container {id:?} already exists")));
        }
        let spec = hearth_oci::parse_spec(&req.spec_json)?;
        if let Some(p) = spec.process() {
            super::caps::check_available(p)?;
        }
        let terminal = spec.process().as_ref().and_then(|p| p.terminal()).unwrap_or(false);
        let stdio = stdio_or_default(req.stdio.as_ref());
        if terminal != stdio.terminal {
            return Err(AgentError::InvalidArgument(format!(
                "the spec's process.terminal is {terminal} but the request's stdio.terminal is {}: make them agree",
                stdio.terminal
            )));
        }
        if let Some(dns) = req.dns_relay.as_ref() {
            super::dns::validate(dns).map_err(|e| AgentError::InvalidArgument(e.to_string()))?;
        }
        for nic in &req.interfaces {
            super::nic::validate(nic)
                .map_err(|e| AgentError::InvalidArgument(format!("container {id:?}'s NIC: {e}")))?;
        }
        let rootfs = req.rootfs.clone().unwrap_or_default();
        let bundle = bundle::prepare(&self.cfg.state_dir.join("bundles"), id, spec, &rootfs)?;
        let (mut session, ends) = match StdioSession::open(&self.cfg.dialer, &stdio, &self.scratch(), id) {
            Ok(s) => s,
            Err(e) => {
                bundle.remove();
                return Err(AgentError::InvalidArgument(format!("connecting stdio of container {id:?}: {e}")));
            }
        };
        let built = {
            let hold = self.reaper.hold();
            let built = self.builder(id, ends).and_then(|b| {
                b.as_init(&bundle.dir)
                    .with_systemd(false)
                    .with_detach(true)
                    .build()
                    .map_err(|e| lc_error("creating", id, e))
            });
            if let Ok(lc) = &built {
                if let Some(pid) = lc.pid() {
                    self.reaper.track(pid.as_raw());
                }
            }
            drop(hold);
            built
        };
        let lc = match built {
            Ok(lc) => lc,
            Err(e) => {
                session.abandon();
                self.remove_lc_state(id);
                bundle.remove();
                return Err(e);
            }
        };
        let pid = lc.pid().map(|p| p.as_raw()).unwrap_or(0);
        if pid > 0 {
            if let Err(e) = crate::pid1::network::loopback_up_in(pid) {
                tracing::warn!(container = id, "bringing loopback up in its network namespace: {e}");
            }
        }
        if let Err(e) = session.attach_terminal() {
            tracing::warn!(container = id, "terminal: {e}");
        }
        let cgroup = Cgroup::new(&bundle.cgroup_path, id);
        let oom_kills_seen = cgroup.oom_counts().1;
        let c = Container {
            id: id.to_string(),
            lc,
            bundle,
            cgroup,
            init: Process { pid, stdio: Arc::new(Mutex::new(session)), exit: None },
            execs: HashMap::new(),
            oom_kills_seen,
            oom_kills_at_create: oom_kills_seen,
            dns: None,
        };
        lock(&self.table).insert(id.to_string(), Arc::new(Mutex::new(c)));
        // The NICs of the network namespace its caller made, mirrored by
        // the host (docs/networking.md): without them the container would
        // run cut off, so it is not created.
        for nic in &req.interfaces {
            if let Err(e) = super::nic::move_into(pid, nic) {
                let _ = self.delete(id, true);
                return Err(AgentError::Internal(format!("container {id:?}: giving it the NIC {}: {e}", nic.name)));
            }
        }
        if let Some(dns) = req.dns_relay.as_ref() {
            match super::dns::DnsRelay::start(pid, dns, self.cfg.dialer.clone()) {
                Ok(relay) => {
                    if let Ok(c) = self.get(id) {
                        lock(&c).dns = Some(relay);
                    }
                }
                Err(e) => {
                    let _ = self.delete(id, true);
                    return Err(AgentError::Internal(format!(
                        "container {id:?}: its resolver at {}: {e}",
                        dns.address
                    )));
                }
            }
        }
        tracing::info!(container = id, pid, "created");
        Ok(pid as u32)
    }

    /// Removes what libcontainer left of a container whose creation failed.
    fn remove_lc_state(&self, id: &str) {
        let dir = self.lc_root().join(id);
        if let Ok(mut c) = LcContainer::load(dir.clone()) {
            let _ = c.delete(true);
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    pub fn start(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let mut c = lock(&c);
        match c.status() {
            ContainerStatus::Created => {}
            s => {
                return Err(AgentError::FailedPrecondition(format!(
                    "container {id:?} is {s:?}, not created: it can be started once"
                )))
            }
        }
        c.lc.start().map_err(|e| lc_error("starting", id, e))?;
        tracing::info!(container = id, "started");
        Ok(())
    }

    pub fn exec(&self, req: &ExecProcessRequest) -> Result<u32> {
        let id = req.container_id.as_str();
        let exec_id = req.exec_id.as_str();
        bundle::check_id(exec_id).map_err(|_| {
            AgentError::InvalidArgument(format!("exec id {exec_id:?} is not valid: use letters, digits, '-', '_', '.'"))
        })?;
        let process = hearth_oci::parse_process(&req.process_json)?;
        super::caps::check_available(&process)?;
        let stdio = stdio_or_default(req.stdio.as_ref());
        if process.terminal().unwrap_or(false) != stdio.terminal {
            return Err(AgentError::InvalidArgument(
                "the process's terminal and the request's stdio.terminal disagree".into(),
            ));
        }
        let c = self.get(id)?;
        let mut c = lock(&c);
        if c.execs.contains_key(exec_id) {
            return Err(AgentError::AlreadyExists(format!("container {id:?} already has a process {exec_id:?}")));
        }
        match c.status() {
            ContainerStatus::Running => {}
            s => {
                return Err(AgentError::FailedPrecondition(format!(
                    "container {id:?} is {s:?}: exec needs a running container"
                )))
            }
        }
        let process_file = c.bundle.dir.join(format!("exec-{exec_id}.json"));
        std::fs::write(&process_file, serde_json::to_vec(&process).unwrap_or_default())
            .map_err(|e| AgentError::internal("writing the exec process", e))?;
        let (mut session, ends) =
            StdioSession::open(&self.cfg.dialer, &stdio, &self.scratch(), &format!("{id}-{exec_id}"))
                .map_err(|e| AgentError::InvalidArgument(format!("connecting stdio of {id:?}/{exec_id:?}: {e}")))?;
        let sub_cgroup = c.cgroup.exec_sub_cgroup(c.init.pid);
        let built = {
            let hold = self.reaper.hold();
            let built = self.builder(id, ends).and_then(|b| {
                b.as_tenant()
                    .with_sub_cgroup(sub_cgroup)
                    .with_detach(true)
                    .with_process(Some(&process_file))
                    .build()
                    .map_err(|e| lc_error("exec in", id, e))
            });
            if let Ok(pid) = &built {
                self.reaper.track(pid.as_raw());
            }
            drop(hold);
            built
        };
        let _ = std::fs::remove_file(&process_file);
        let pid = match built {
            Ok(p) => p.as_raw(),
            Err(e) => {
                session.abandon();
                return Err(e);
            }
        };
        if let Err(e) = session.attach_terminal() {
            tracing::warn!(container = id, exec = exec_id, "terminal: {e}");
        }
        c.execs.insert(exec_id.to_string(), Process { pid, stdio: Arc::new(Mutex::new(session)), exit: None });
        tracing::info!(container = id, exec = exec_id, pid, "exec");
        Ok(pid as u32)
    }

    pub fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        // Real-time signals too (systemd stops cleanly on SIGRTMIN+3), which
        // nix's Signal does not name.
        let max = libc::SIGRTMAX() as u32;
        if signal == 0 || signal > max {
            return Err(AgentError::InvalidArgument(format!("{signal} is not a signal number (1 to {max})")));
        }
        let c = self.get(id)?;
        let mut c = lock(&c);
        if all && exec_id.is_empty() {
            return match Signal::try_from(signal as i32) {
                Ok(sig) => c.lc.kill(sig, true).map_err(|e| lc_error("signalling", id, e)),
                Err(_) => {
                    for pid in c.cgroup.pids()? {
                        // SAFETY: kill(2); a process that ended meanwhile is ESRCH, ignored.
                        unsafe { libc::kill(pid as i32, signal as i32) };
                    }
                    Ok(())
                }
            };
        }
        let pid = c.process(exec_id)?.pid;
        if self.reaper.exit_of(pid).is_some() || c.process(exec_id)?.exit.is_some() {
            return Err(AgentError::NotFound(format!("process {exec_id:?} of container {id:?} has already exited")));
        }
        // SAFETY: kill(2) of a process this agent started and has not reaped.
        let sent = unsafe { libc::kill(pid, signal as i32) };
        let sent = if sent == 0 { Ok(()) } else { Err(nix::errno::Errno::last()) };
        sent.map_err(|e| match e {
            nix::errno::Errno::ESRCH => {
                AgentError::NotFound(format!("process {exec_id:?} of container {id:?} has already exited"))
            }
            e => AgentError::internal("sending the signal", e),
        })
    }

    pub fn wait(&self, id: &str, exec_id: &str) -> Result<WaitProcessResponse> {
        let (pid, stdio) = {
            let c = self.get(id)?;
            let mut c = lock(&c);
            let p = c.process(exec_id)?;
            if let Some(done) = &p.exit {
                return Ok(done.clone());
            }
            (p.pid, p.stdio.clone())
        };
        let exit: Exit = self
            .reaper
            .wait(pid, None)
            .ok_or_else(|| AgentError::Internal(format!("process {pid} of container {id:?} is not tracked")))?;
        lock(&stdio).process_exited();
        lock(&stdio).drain(OUTPUT_GRACE);
        let c = self.get(id)?;
        let mut c = lock(&c);
        let kills_now = c.cgroup.oom_counts().1;
        let resp = WaitProcessResponse {
            exit_status: exit.status,
            exited_at_unix_nanos: unix_nanos(exit.at),
            // Killed by SIGKILL, and the cgroup counted an OOM kill since the
            // container was created.
            oom_killed: exit.status == 137 && kills_now > c.oom_kills_at_create,
            ..Default::default()
        };
        c.process(exec_id)?.exit = Some(resp.clone());
        // Queue the OOM event now if the watcher has not yet: a caller that
        // deletes right after the exit (`ctr run --rm`) would otherwise race
        // it and the event would be lost.
        self.note_oom_kills(&mut c, kills_now);
        Ok(resp)
    }

    pub fn delete(&self, id: &str, force: bool) -> Result<()> {
        let arc = self.get(id)?;
        let mut c = lock(&arc);
        let status = c.status();
        if matches!(status, ContainerStatus::Running | ContainerStatus::Paused) && !force {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id:?} is {status:?}: stop it first, or delete with force"
            )));
        }
        // Its sockets hold the container's network namespace (and so its NICs).
        if let Some(dns) = c.dns.take() {
            dns.stop();
        }
        // Kill everything in the cgroup and wait until it is empty before
        // libcontainer removes it: its own removal gives up after a short
        // while, which a slow (nested, emulated) machine can exceed.
        if status != ContainerStatus::Stopped {
            let _ = c.lc.kill(Signal::SIGKILL, true);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while c.cgroup.pids().is_ok_and(|p| !p.is_empty()) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        c.cgroup.remove_descendants();
        if let Err(first) = c.lc.delete(true) {
            std::thread::sleep(Duration::from_millis(500));
            c.lc.delete(true).map_err(|e| lc_error("deleting", id, format!("{e} (first attempt: {first})")))?;
        }
        // Make sure the init is gone and reaped before its state is dropped.
        let init = c.init.pid;
        if init > 0 && self.reaper.wait(init, Some(Duration::from_secs(5))).is_none() {
            tracing::warn!(container = id, pid = init, "init not reaped after delete");
        }
        self.reaper.forget(init);
        for p in c.execs.values() {
            self.reaper.forget(p.pid);
        }
        c.bundle.remove();
        drop(c);
        lock(&self.table).remove(id);
        tracing::info!(container = id, "deleted");
        Ok(())
    }

    /// Forgets an exec process once its exit has been collected.
    pub fn delete_process(&self, id: &str, exec_id: &str) -> Result<()> {
        if exec_id.is_empty() {
            return Err(AgentError::InvalidArgument(
                "the init process is deleted with its container (DeleteContainer)".into(),
            ));
        }
        let c = self.get(id)?;
        let mut c = lock(&c);
        let p = c.process(exec_id)?;
        if p.exit.is_none() {
            return Err(AgentError::FailedPrecondition(format!(
                "process {exec_id:?} of container {id:?} has not been waited for: wait for it (or kill it) first"
            )));
        }
        let pid = p.pid;
        c.execs.remove(exec_id);
        self.reaper.forget(pid);
        Ok(())
    }

    pub fn state(&self, id: &str) -> Result<StateContainerResponse> {
        let c = self.get(id)?;
        let mut c = lock(&c);
        let status = match c.status() {
            ContainerStatus::Creating | ContainerStatus::Created => WireStatus::CREATED,
            ContainerStatus::Running => WireStatus::RUNNING,
            ContainerStatus::Stopped => WireStatus::STOPPED,
            ContainerStatus::Paused => WireStatus::PAUSED,
        };
        let mut processes = Vec::new();
        let mut execs: Vec<_> = c.execs.iter().collect();
        execs.sort_by(|a, b| a.0.cmp(b.0));
        for (exec_id, p) in execs {
            let exit = p.exit.as_ref().map(|e| e.exit_status).or_else(|| self.reaper.exit_of(p.pid).map(|e| e.status));
            processes.push(ProcessState {
                exec_id: exec_id.clone(),
                pid: p.pid as u32,
                exited: exit.is_some(),
                exit_status: exit.unwrap_or(0),
                ..Default::default()
            });
        }
        Ok(StateContainerResponse {
            container_id: c.id.clone(),
            status: status.into(),
            pid: c.init.pid as u32,
            processes,
            ..Default::default()
        })
    }

    pub fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let c = self.get(id)?;
        let c = lock(&c);
        c.cgroup.pids()
    }

    pub fn stats(&self, id: &str) -> Result<StatsResponse> {
        let c = self.get(id)?;
        let c = lock(&c);
        c.cgroup.stats()
    }

    pub fn update(&self, id: &str, resources: &LinuxResources) -> Result<()> {
        let c = self.get(id)?;
        let c = lock(&c);
        c.cgroup.update(resources)
    }

    fn session(&self, id: &str, exec_id: &str) -> Result<Arc<Mutex<StdioSession>>> {
        let c = self.get(id)?;
        let mut c = lock(&c);
        Ok(c.process(exec_id)?.stdio.clone())
    }

    pub fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let s = self.session(id, exec_id)?;
        let (w, h) = (width.min(u16::MAX as u32) as u16, height.min(u16::MAX as u32) as u16);
        let r = lock(&s).resize(w, h);
        r.map_err(|e| AgentError::FailedPrecondition(format!("resizing the PTY of {id:?}/{exec_id:?}: {e}")))
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let s = self.session(id, exec_id)?;
        lock(&s).close_stdin();
        Ok(())
    }

    fn check_oom(&self) {
        // Not while libcontainer clones: its child runs Rust code before
        // exec, and a lock (the allocator's) that this thread held at that
        // instant would stay held in the child for ever. Skip the round
        // instead of waiting; and skip busy containers (an exec holds its
        // container's lock while it takes the hold).
        let Some(_hold) = self.reaper.try_hold() else { return };
        let all: Vec<_> = lock(&self.table).values().cloned().collect();
        for c in all {
            let Ok(mut c) = c.try_lock() else { continue };
            let kills = c.cgroup.oom_counts().1;
            self.note_oom_kills(&mut c, kills);
        }
    }

    /// Queues one OOM event if the container's OOM-kill counter grew past
    /// what was seen last (by the watcher or by a wait).
    fn note_oom_kills(&self, c: &mut Container, kills: u64) {
        if kills > c.oom_kills_seen {
            c.oom_kills_seen = kills;
            self.oom.push(c.id.clone());
        }
    }

    /// Stops every container, politely first: SIGTERM, then SIGKILL after
    /// `grace`; then deletes them.
    pub fn stop_all(&self, grace: Duration) {
        let ids = self.ids();
        for id in &ids {
            let _ = self.signal(id, "", Signal::SIGTERM as u32, true);
        }
        let deadline = std::time::Instant::now() + grace;
        for id in &ids {
            if let Ok(c) = self.get(id) {
                let pid = lock(&c).init.pid;
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let _ = self.reaper.wait(pid, Some(left));
            }
            if let Err(e) = self.delete(id, true) {
                tracing::warn!(container = %id, "stopping: {e}");
            }
        }
    }

    pub fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }
}
