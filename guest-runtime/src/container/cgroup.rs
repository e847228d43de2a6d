//! A container's cgroup, seen from the agent: statistics, OOM counters,
//! pids, and resource updates. libcgroups does the work for v2 (in the VM)
//! and for v1 (natively on our hosts, whose controllers are all on v1 with
//! an empty v2 hierarchy beside them); the OOM counters are read here because
//! libcgroups' generic statistics do not carry them.

use std::path::{Path, PathBuf};

use hearth_agent_protocol::agent::{CpuStats, IoStats, MemoryStats, PidsStats, StatsResponse};
use libcgroups::common::{self, AnyCgroupManager, CgroupConfig, CgroupManager, CgroupSetup, ControllerOpt};
use oci_spec::runtime::LinuxResources;

use crate::error::{AgentError, Result};

const ROOT: &str = "/sys/fs/cgroup";

pub struct Cgroup {
    path: PathBuf,
    id: String,
}

impl Cgroup {
    pub fn new(path: &Path, id: &str) -> Self {
        Cgroup { path: path.to_path_buf(), id: id.to_string() }
    }

    pub fn version() -> &'static str {
        match common::get_cgroup_setup() {
            Ok(CgroupSetup::Unified) => "v2",
            Ok(CgroupSetup::Hybrid) => "v1 (hybrid: controllers on v1, an empty v2 hierarchy beside)",
            Ok(CgroupSetup::Legacy) => "v1",
            Err(_) => "unknown",
        }
    }

    fn manager(&self) -> Result<AnyCgroupManager> {
        common::create_cgroup_manager(CgroupConfig {
            cgroup_path: self.path.clone(),
            systemd_cgroup: false,
            container_name: self.id.clone(),
        })
        .map_err(|e| AgentError::internal(format!("opening cgroup {}", self.path.display()), e))
    }

    /// The directory holding a controller's files for this cgroup.
    fn dir(&self, controller: &str) -> PathBuf {
        let rel = self.path.strip_prefix("/").unwrap_or(&self.path);
        match common::get_cgroup_setup() {
            Ok(CgroupSetup::Unified) => Path::new(ROOT).join(rel),
            _ => Path::new(ROOT).join(controller).join(rel),
        }
    }

    /// (OOM events, OOM kills) so far: `memory.events` on v2,
    /// `memory.oom_control` on v1 (which counts kills only).
    pub fn oom_counts(&self) -> (u64, u64) {
        let dir = self.dir("memory");
        let read = |file: &str, key: &str| -> Option<u64> {
            let text = std::fs::read_to_string(dir.join(file)).ok()?;
            text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
        };
        if dir.join("memory.events").exists() {
            (read("memory.events", "oom").unwrap_or(0), read("memory.events", "oom_kill").unwrap_or(0))
        } else {
            let kills = read("memory.oom_control", "oom_kill").unwrap_or(0);
            (kills, kills)
        }
    }

    pub fn pids(&self) -> Result<Vec<u32>> {
        let pids = self.manager()?.get_all_pids().map_err(|e| AgentError::internal("listing the cgroup's pids", e))?;
        Ok(pids.into_iter().map(|p| p.as_raw() as u32).collect())
    }

    /// Where a process exec'd into the container goes, relative to the
    /// container's cgroup: where its init is. That is the container's own
    /// cgroup (None), unless the init moved below it: systemd as init moves
    /// itself to init.scope and then enables controllers for the cgroups
    /// below, after which cgroup v2 refuses processes in the container's own
    /// (EBUSY). runc and crun join the init's cgroup the same way.
    pub fn exec_sub_cgroup(&self, init_pid: i32) -> Option<String> {
        if !matches!(common::get_cgroup_setup(), Ok(CgroupSetup::Unified)) {
            return None;
        }
        let table = std::fs::read_to_string(format!("/proc/{init_pid}/cgroup")).ok()?;
        let init = table.lines().find_map(|l| l.strip_prefix("0::"))?;
        let rel = Path::new(init).strip_prefix(&self.path).ok()?;
        (!rel.as_os_str().is_empty()).then(|| rel.display().to_string())
    }

    /// Removes the cgroups a container made below its own (systemd as its
    /// init makes init.scope, system.slice...), deepest first, so that its
    /// own can be removed: cgroup v2 removes only empty leaves. Call once
    /// no process is left.
    pub fn remove_descendants(&self) {
        fn remove_below(dir: &Path) {
            let Ok(entries) = std::fs::read_dir(dir) else { return };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_below(&e.path());
                    if let Err(err) = std::fs::remove_dir(e.path()) {
                        tracing::warn!("removing cgroup {}: {err}", e.path().display());
                    }
                }
            }
        }
        if let Ok(CgroupSetup::Unified) = common::get_cgroup_setup() {
            remove_below(&self.dir(""));
        }
    }

    pub fn update(&self, resources: &LinuxResources) -> Result<()> {
        let opt = ControllerOpt { resources, disable_oom_killer: false, oom_score_adj: None, freezer_state: None };
        self.manager()?.apply(&opt).map_err(|e| AgentError::internal("updating the cgroup's resources", e))
    }

    pub fn stats(&self) -> Result<StatsResponse> {
        let s = self.manager()?.stats().map_err(|e| AgentError::internal("reading cgroup statistics", e))?;
        let (oom, oom_kill) = self.oom_counts();
        let mut out = StatsResponse::new();
        // libcgroups reports CPU time in nanoseconds.
        out.cpu = Some(CpuStats {
            usage_usec: s.cpu.usage.usage_total / 1000,
            user_usec: s.cpu.usage.usage_user / 1000,
            system_usec: s.cpu.usage.usage_kernel / 1000,
            nr_periods: s.cpu.throttling.periods,
            nr_throttled: s.cpu.throttling.throttled_periods,
            throttled_usec: s.cpu.throttling.throttled_time / 1000,
            ..Default::default()
        })
        .into();
        let mut mem = MemoryStats {
            usage_bytes: s.memory.memory.usage,
            limit_bytes: s.memory.memory.limit,
            max_usage_bytes: s.memory.memory.max_usage,
            oom_events: oom,
            oom_kill_events: oom_kill,
            ..Default::default()
        };
        mem.stat = s.memory.stats.into_iter().collect();
        out.memory = Some(mem).into();
        out.pids = Some(PidsStats { current: s.pids.current, limit: s.pids.limit, ..Default::default() }).into();
        let mut io = IoStats::new();
        for d in &s.blkio.service_bytes {
            match d.op_type.as_deref().map(str::to_ascii_lowercase).as_deref() {
                Some("read") => io.read_bytes += d.value,
                Some("write") => io.write_bytes += d.value,
                _ => {}
            }
        }
        for d in &s.blkio.serviced {
            match d.op_type.as_deref().map(str::to_ascii_lowercase).as_deref() {
                Some("read") => io.read_ios += d.value,
                Some("write") => io.write_ios += d.value,
                _ => {}
            }
        }
        out.io = Some(io).into();
        out.cgroup_version = Self::version().to_string();
        Ok(out)
    }
}
