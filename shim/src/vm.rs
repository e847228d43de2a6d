//! The utility VM as the shim sees it: hearth-vmm booted on first use with the
//! agent initramfs, a vsock socket to reach the agent, and two shares
//! exported over virtio-fs (virtio-fs devices cannot be added to a running
//! VM, so each carries every container's files, bind-mounted into it; the
//! host side of each is laid out in [`crate::share`] so that the guest cannot
//! redirect the shim's mounts):
//!
//! - `roots`: container root filesystems, cached by the guest without
//!   revalidation (`cache=always`): only the container changes its root, and
//!   every lookup saved is a round trip to virtiofsd saved (a distro's boot
//!   makes tens of thousands); with extended attributes (file capabilities,
//!   and Docker's vfs driver copies them);
//! - `shared`: bind-mount sources, host directories the host may change
//!   under the guest, cached with revalidation (`cache=auto`).
//!
//! Booting is transactional: whatever a failed boot mounted or started is
//! undone before the error is returned.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use containerd_shim::monitor::{monitor_subscribe, wait_pid, Topic};
use hearth_agent_protocol::agent::{Empty, MountRequest, SyncTimeRequest};
use hearth_agent_protocol::transport::{AgentAddress, AGENT_PORT};
use hearth_agent_protocol::AgentClient;

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;

use crate::cgroup::{self, VmCgroup};
use crate::config::Config;
use crate::network::VmNetwork;
use crate::share::{remove_tree, Share};

/// Where the shared directory appears in the guest.
pub const GUEST_SHARED: &str = "/run/hearth/shared";
const SHARE_TAG: &str = "hearth";
/// Where the root filesystems' directory appears in the guest.
pub const GUEST_ROOTS: &str = "/run/hearth/roots";
const ROOTS_TAG: &str = "hearth-roots";
/// The subdirectory of a VM directory that hearth-vmm is jailed in.
pub const JAIL: &str = "jail";
/// hearth-vmm's control socket, in the jail.
pub const API_SOCKET: &str = "api.sock";

pub struct Vm {
    pub dir: PathBuf,
    pub shared: Share,
    pub roots: Share,
    pub vsock: PathBuf,
    pub agent: AgentClient,
    /// hearth-vmm's control socket: disks attached while it runs.
    pub api: hearth_vmm::api::Client,
    /// The layer images attached, shared by the containers on them.
    pub layers: crate::layers::Attached,
    pub vmm_pid: i32,
    pub boot_id: String,
    /// hearth-vmm's own cgroup (None on a cgroup v1 host).
    pub cgroup: Option<VmCgroup>,
    /// The VM's network as `hearth status` shows it (None when off).
    pub network: Option<String>,
    /// Its lease and host side, released by whichever comes first: the
    /// thread that sees hearth-vmm end, or [`Vm::cleanup`] (an idle shim
    /// exits right after it, before that thread may run).
    net: Arc<Mutex<Option<VmNetwork>>>,
    /// Localhost forwarding of the VM's listening ports; stopped at cleanup.
    forwarder: Mutex<Option<crate::forward::Forwarder>>,
}

/// The file in a VM directory that names the VM's cgroup.
const CGROUP_RECORD: &str = "cgroup";

pub fn ctx(secs: i64) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(secs * 1_000_000_000)
}

impl Vm {
    /// Boots a VM whose state lives in `dir` and waits for its agent.
    /// `pod_cgroup`, for a VM of one CRI pod, is the pod's cgroup, beneath
    /// which hearth-vmm's goes (cgroup.rs). `on_exit` runs (on a thread of
    /// its own) when hearth-vmm ends, whatever the reason, with its exit
    /// code, why the host killed it if it did, and the tail of the console.
    pub fn boot(
        cfg: &Config,
        dir: &Path,
        pod_cgroup: Option<&Path>,
        on_exit: impl FnOnce(i32, Option<String>, String) + Send + 'static,
    ) -> Result<Vm> {
        cfg.check()?;
        std::fs::create_dir_all(dir)?;
        // Undoes a failed boot: the VMM killed, the shares unmounted, the
        // directory removed.
        struct Undo<'a> {
            dir: &'a Path,
            shares: Vec<Share>,
            vmm: Option<i32>,
            cgroup: Option<VmCgroup>,
        }
        impl Drop for Undo<'_> {
            fn drop(&mut self) {
                if let Some(pid) = self.vmm {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
                }
                if let Some(c) = &self.cgroup {
                    c.kill_and_remove(Duration::from_secs(5));
                }
                for s in &self.shares {
                    s.teardown();
                }
                if let Err(e) = remove_tree(self.dir) {
                    log::warn!("cleaning up after a failed boot: {e:#}");
                }
            }
        }
        let mut undo = Undo { dir, shares: Vec::new(), vmm: None, cgroup: None };
        undo.shares.push(Share::create(dir, "shared")?);
        undo.shares.push(Share::create(dir, "roots")?);
        // hearth-vmm's root once set up (its jail: docs/security.md): only
        // what it reaches by path while the guest runs, the vsock socket
        // (and the `_<port>` sockets beside it) and the console log.
        let jail = dir.join(JAIL);
        std::fs::DirBuilder::new().mode(0o700).create(&jail).with_context(|| format!("creating {}", jail.display()))?;
        // hearth-vmm's own once it drops root (it rotates its console log
        // there); 0700 keeps everyone else out of it.
        if cfg.vmm_uid != 0 {
            std::os::unix::fs::chown(&jail, Some(cfg.vmm_uid), Some(cfg.vmm_gid))
                .with_context(|| format!("giving {} to hearth-vmm's user {}", jail.display(), cfg.vmm_uid))?;
        }
        let vsock = jail.join("vsock.sock");
        let console = jail.join("console.log");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // The VM's address, leased until hearth-vmm ends (the thread that
        // waits for it drops the lease, or this function if it fails first).
        let network = VmNetwork::reserve(cfg.network, &cfg.network_subnet, &cfg.network_bridge, &name)
            .context("hearth's VM network (set network = \"off\" in the shim's config to run without)")?;
        let net_cmdline = network.as_ref().map(|n| n.cmdline()).unwrap_or_default();
        let network = Arc::new(Mutex::new(network));
        let cmdline = format!("hearth.time={now} {net_cmdline} {}", cfg.extra_cmdline);
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
            .arg("--console-max-kib")
            .arg(cfg.console_log_max_kib.to_string())
            .arg("--vsock")
            .arg(format!("cid=3,socket={}", vsock.display()))
            .arg("--fs")
            .arg(format!("tag={SHARE_TAG},dir={}", undo.shares[0].export().display()))
            .arg("--fs")
            .arg(format!("tag={ROOTS_TAG},dir={},cache=always,xattr=on", undo.shares[1].export().display()))
            .arg("--balloon")
            .arg("--api-socket")
            .arg(jail.join(API_SOCKET))
            .arg("--disk-slots")
            .arg(cfg.disk_slots.to_string())
            .arg("--nic-slots")
            // Slot 0 is the VM's own NIC (eth0 in the guest); the others
            // take containers' mirrored interfaces (netns.rs).
            .arg((u8::from(network.lock().unwrap().is_some()) + cfg.container_nics).to_string())
            .arg("--jail")
            .arg(&jail)
            .args(
                (cfg.vmm_uid != 0)
                    .then(|| ["--uid".to_string(), cfg.vmm_uid.to_string(), "--gid".into(), cfg.vmm_gid.to_string()])
                    .into_iter()
                    .flatten(),
            )
            .args(["--cmdline", cmdline.trim()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("vmm.log"))?);
        if let Some(v) = &cfg.virtiofsd {
            cmd.env("HEARTH_VIRTIOFSD", v);
        }
        // Its own cgroup, joined before it runs (virtiofsd follows it).
        match VmCgroup::create(Path::new(cgroup::ROOT), &name, pod_cgroup)
            .and_then(|c| c.map(|c| c.procs().map(|fd| (c, fd))).transpose())
        {
            Ok(Some((c, procs))) => {
                // Where it is, for the clean-up after a dead shim.
                let _ = std::fs::write(dir.join(CGROUP_RECORD), c.path().as_os_str().as_encoded_bytes());
                undo.cgroup = Some(c.clone());
                let memory_max = (u64::from(cfg.memory_mib) + u64::from(cfg.vmm_memory_overhead_mib)) << 20;
                c.limit(memory_max, cfg.vmm_pids_max.into()).context("limiting the VM's cgroup")?;
                // SAFETY: join_in_child only makes a write(2).
                unsafe { cmd.pre_exec(move || cgroup::join_in_child(&procs)) };
            }
            Ok(None) => {}
            Err(e) => log::warn!("hearth-vmm gets no cgroup of its own, it stays in the shim's: {e:#}"),
        }
        // Subscribe before spawning: the shim's reaper reaps every child and
        // tells subscribers, so a fast exit is not missed.
        let sub = monitor_subscribe(Topic::Pid).map_err(|e| anyhow::anyhow!("{e}"))?;
        let child = spawn_bound_to_shim(cmd).with_context(|| format!("starting {}", cfg.vmm.display()))?;
        let pid = child.id() as i32;
        undo.vmm = Some(pid);
        std::mem::forget(child); // reaped by the shim's reaper
        let console_for_exit = console.clone();
        let cgroup_for_exit = undo.cgroup.clone();
        let network_for_exit = network.clone();
        std::thread::spawn(move || {
            let code = wait_pid(pid, sub);
            // What is left in the VM's cgroup (virtiofsd, dying with it) goes
            // too, once it is known whether its memory limit ended the VM.
            let mut killed = None;
            if let Some(c) = cgroup_for_exit {
                let (oom_kills, max) = c.oom_kills();
                if oom_kills > 0 {
                    killed = Some(format!(
                        "the host's OOM killer ended hearth-vmm: the VM's cgroup {} reached its memory.max ({max} \
                         bytes: memory_mib + vmm_memory_overhead_mib in the shim's config; raise the overhead if \
                         the VMM needs more than its guest's RAM)",
                        c.path().display()
                    ));
                }
                c.kill_and_remove(Duration::from_secs(5));
            }
            // Its tap went with it; its address, and with the last VM the
            // bridge and the NAT rules, go now.
            drop(network_for_exit.lock().unwrap_or_else(|p| p.into_inner()).take());
            on_exit(code, killed, tail(&console_for_exit, 30));
        });
        tracing_log(&format!("booting the utility VM (hearth-vmm pid {pid}) in {}", dir.display()));
        let addr = AgentAddress::HybridVsock { socket: vsock.clone(), port: AGENT_PORT };
        let agent = addr.connect_when_ready(Duration::from_secs(180)).map_err(|e| {
            anyhow::anyhow!("the utility VM's agent did not answer: {e}\n--- console ---\n{}", tail(&console, 30))
        })?;
        for (tag, target) in [(SHARE_TAG, GUEST_SHARED), (ROOTS_TAG, GUEST_ROOTS)] {
            let mount_req = MountRequest {
                source: tag.into(),
                fstype: "virtiofs".into(),
                target: target.into(),
                ..Default::default()
            };
            agent.mount(ctx(60), &mount_req).with_context(|| format!("mounting {target} in the guest"))?;
        }
        let api = hearth_vmm::api::Client::new(jail.join(API_SOCKET));
        let mut net_summary = None;
        if let Some(n) = network.lock().unwrap().as_ref() {
            n.attach(&api)
                .context("hearth's VM network (set network = \"off\" in the shim's config to run without)")?;
            tracing_log(&format!("the VM's network: {} on {}, tap {}", n.addr, cfg.network_bridge, n.tap));
            net_summary = Some(n.summary());
        }
        let forwarder = if cfg.localhost_forwarding {
            let ports = dir.join(crate::forward::PORTS_FILE);
            match crate::forward::Forwarder::start(agent.clone(), vsock.clone(), ports) {
                Ok(f) => Some(f),
                Err(e) => {
                    log::warn!("localhost forwarding does not run: {e}");
                    None
                }
            }
        } else {
            None
        };
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as i64;
        let _ = agent.sync_time(ctx(10), &SyncTimeRequest { unix_nanos: nanos, ..Default::default() });
        let boot_id = agent.health(ctx(10), &Empty::new())?.boot_id;
        // Booted: from here on the Vm owns what Undo would have undone.
        let roots = undo.shares.pop().expect("two shares");
        let shared = undo.shares.pop().expect("two shares");
        let cgroup = undo.cgroup.take();
        std::mem::forget(undo);
        Ok(Vm {
            dir: dir.to_path_buf(),
            shared,
            roots,
            vsock,
            agent,
            api,
            layers: Default::default(),
            vmm_pid: pid,
            boot_id,
            cgroup,
            network: net_summary,
            net: network,
            forwarder: Mutex::new(forwarder),
        })
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

    /// Removes container `id`'s directories from both shares (its bind
    /// targets, `shared/ID/mounts/N`, and its root, `roots/ID/rootfs`) once
    /// its mounts there are undone, never descending into a mount: should
    /// one have stayed (its unmount failed), it and the files under it are
    /// left alone.
    pub fn forget_dirs(&self, id: &str) {
        self.shared.forget(Path::new(id));
        self.roots.forget(Path::new(id));
    }

    /// Removes the VM's cgroup (killing whatever is left in it), unmounts
    /// the shares (and every container mount in them) and removes the VM's
    /// directory, never crossing a mount that is still there.
    pub fn cleanup(&self) {
        // Here too, not only when the VMM's exit is seen: an idle shim
        // exits right after this.
        if let Some(c) = &self.cgroup {
            c.kill_and_remove(Duration::from_secs(5));
        }
        drop(self.forwarder.lock().unwrap_or_else(|p| p.into_inner()).take());
        drop(self.net.lock().unwrap_or_else(|p| p.into_inner()).take());
        self.shared.teardown();
        self.roots.teardown();
        if let Err(e) = remove_tree(&self.dir) {
            log::warn!("removing the VM's directory: {e:#}");
        }
    }
}

/// Spawns `cmd` so that it is killed when the shim dies, however it dies,
/// as the first process of a pid namespace of its own.
///
/// Killed with the shim: a shim killed with SIGKILL runs no clean-up, and a
/// VMM left behind would keep the VM, its virtiofsd and the shares' mounts
/// alive with no one to answer for them. PR_SET_PDEATHSIG fires when the
/// *thread* that forked the child ends, and the shim's ttrpc threads come
/// and go (a containerd restart replaces them), so every VMM is spawned by
/// one thread that lives as long as the shim. (virtiofsd is bound to
/// hearth-vmm the same way.)
///
/// Its own pid namespace (Firecracker's jailer gives the VMM one): a VMM
/// taken over by the guest sees no host process to signal or ptrace, only
/// itself and its virtiofsd; and when it ends, for any reason, the kernel
/// kills everything left in that namespace. The spawner thread unshares a
/// new pid namespace for its children before each spawn and returns to the
/// shim's after it: a namespace lives only as long as its first process, so
/// each VMM needs a fresh one.
fn spawn_bound_to_shim(mut cmd: Command) -> std::io::Result<std::process::Child> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::sync::mpsc;
    type Request = (Command, mpsc::Sender<std::io::Result<std::process::Child>>);
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<mpsc::Sender<Request>>> = std::sync::OnceLock::new();
    // In its own pid namespace the child's getppid() is 0, so whether the
    // shim still runs is asked of a pidfd of the shim instead: it polls
    // readable once the shim has exited.
    // SAFETY: pidfd_open of our own pid takes plain values.
    let shim = unsafe { libc::syscall(libc::SYS_pidfd_open, std::process::id() as libc::pid_t, 0) };
    if shim < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pidfd_open returned a descriptor that nothing else owns.
    let shim = unsafe { std::os::fd::OwnedFd::from_raw_fd(shim as i32) };
    let shim_fd = shim.as_raw_fd();
    // SAFETY: prctl and poll are async-signal-safe and touch no memory of
    // ours beyond the pollfd on this stack.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The shim died before the prctl: no signal will come.
            let mut p = libc::pollfd { fd: shim_fd, events: libc::POLLIN, revents: 0 };
            if libc::poll(&mut p, 1, 0) != 0 {
                return Err(std::io::Error::other("the shim exited while starting hearth-vmm"));
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("vmm-spawner".into())
            .spawn(move || {
                // The shim's own pid namespace, to return to after each spawn.
                let own = std::fs::File::open("/proc/thread-self/ns/pid");
                for (mut cmd, reply) in rx {
                    let _ = reply.send(spawn_in_new_pid_namespace(&own, &mut cmd));
                }
            })
            .expect("starting the shim's VMM spawner thread");
        std::sync::Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    spawner.lock().unwrap().send((cmd, tx)).map_err(|_| std::io::Error::other("the VMM spawner thread ended"))?;
    let child = rx.recv().map_err(|_| std::io::Error::other("the VMM spawner thread ended"))?;
    drop(shim);
    child
}

/// On the spawner thread: spawns `cmd` as pid 1 of a new pid namespace,
/// then sets the thread's children back to `own`, the shim's namespace.
fn spawn_in_new_pid_namespace(
    own: &std::io::Result<std::fs::File>,
    cmd: &mut Command,
) -> std::io::Result<std::process::Child> {
    use std::os::fd::AsRawFd;
    let own =
        own.as_ref().map_err(|e| std::io::Error::new(e.kind(), format!("opening the shim's pid namespace: {e}")))?;
    let pid_namespace_error = |what: &str| {
        let e = std::io::Error::last_os_error();
        std::io::Error::new(e.kind(), format!("{what} for hearth-vmm: {e} (the shim must run as root)"))
    };
    // SAFETY: unshare and setns take plain values; they change only which
    // pid namespace this thread's next children start in.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(pid_namespace_error("creating a pid namespace"));
    }
    let child = cmd.spawn();
    // SAFETY: as above; `own` is an open namespace descriptor.
    if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        // Every later VMM would start in this (soon dead) namespace.
        let e = pid_namespace_error("returning to the shim's pid namespace");
        log::error!("{e}");
        return child.and(Err(e));
    }
    child
}

/// Cleans up after shims that died without cleaning up (killed, crashed):
/// for each VM directory under `state_dir` (`NAMESPACE-SHIMPID`) whose shim
/// no longer runs, kills a hearth-vmm still running for it (only a process
/// that is hearth-vmm and names that directory), undoes every mount beneath
/// it, deepest first, and removes it without crossing a mount. containerd
/// runs the shim's `delete` for each container of a dead shim, which calls
/// this; so does each shim before it boots a VM.
pub fn reap_orphans(state_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(state_dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.rsplit('-').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if pid == std::process::id() as i32 || process_is(pid, "containerd-shim-hearth", None) {
            continue;
        }
        let dir = e.path();
        log::warn!("cleaning up after a dead shim (pid {pid}): {}", dir.display());
        let dir_str = dir.display().to_string();
        for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(vmm) = p.file_name().to_string_lossy().parse::<i32>() else { continue };
            if process_is(vmm, "hearth-vmm", Some(&dir_str)) {
                log::warn!("killing hearth-vmm pid {vmm}, left running by its dead shim");
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(vmm), nix::sys::signal::SIGKILL);
            }
        }
        let recorded = std::fs::read(dir.join(CGROUP_RECORD)).ok().and_then(|b| {
            let p = std::path::PathBuf::from(String::from_utf8(b).ok()?);
            // Only the VM's own: named after its directory.
            let leaf = p.file_name()?.to_str()?;
            (leaf == name || leaf == format!("hearth-{name}")).then_some(())?;
            VmCgroup::at(Path::new(cgroup::ROOT), &p)
        });
        recorded
            .unwrap_or_else(|| VmCgroup::of(Path::new(cgroup::ROOT), &name))
            .kill_and_remove(Duration::from_secs(5));
        let mut mounts = mounts_beneath(&dir);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
        for m in &mounts {
            crate::share::unmount(m);
        }
        if let Err(e) = remove_tree(&dir) {
            log::warn!("removing {}: {e:#}", dir.display());
        }
    }
}

/// Whether process `pid` runs a program whose name contains `program`
/// (and, when given, whose command line contains `arg`).
fn process_is(pid: i32, program: &str, arg: Option<&str>) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let mut args = cmdline.split(|b| *b == 0).map(String::from_utf8_lossy);
    let Some(argv0) = args.next() else { return false };
    let name = argv0.rsplit('/').next().unwrap_or_default().to_string();
    name.contains(program) && arg.is_none_or(|a| args.any(|x| x.contains(a)))
}

/// The mount points at or beneath `dir`, from /proc/self/mountinfo.
fn mounts_beneath(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
pub(crate) fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'3').contains(&b[i + 1]) && (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last `n` lines of a file.
///
/// The console log is in hearth-vmm's jail, a directory the VMM may write:
/// a VMM taken over by the guest could put a symbolic link there (to
/// /etc/shadow, say) for the shim to read and log. So it is opened without
/// following one, must be a regular file, and only its last 64 KiB are read.
pub fn tail(path: &Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    const MAX: u64 = 64 << 10;
    let Ok(mut f) = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)
    else {
        return String::new();
    };
    match f.metadata() {
        Ok(m) if m.is_file() => {
            let _ = f.seek(SeekFrom::Start(m.len().saturating_sub(MAX)));
        }
        _ => return format!("({} is not a regular file: not read)", path.display()),
    }
    let mut bytes = Vec::new();
    let _ = f.take(MAX).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn tracing_log(msg: &str) {
    log::info!("{msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_tail_follows_no_symlink_and_reads_the_end() {
        let dir = std::env::temp_dir().join(format!("hearth-tail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, "host-secret\n").unwrap();
        let log = dir.join("console.log");
        std::os::unix::fs::symlink(&secret, &log).unwrap();
        assert!(!tail(&log, 30).contains("host-secret"), "{}", tail(&log, 30));
        std::fs::remove_file(&log).unwrap();
        let text: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).unwrap();
        assert_eq!(tail(&log, 2), "line 19998\nline 19999");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/run/a\040b\011c\134d"), "/run/a b\tc\\d");
        assert_eq!(unescape_mountinfo(r"/plain\9x\"), r"/plain\9x\");
    }

    #[test]
    fn processes_are_told_by_program_and_argument() {
        let me = std::process::id() as i32;
        let argv0 = std::env::args().next().unwrap();
        let name = argv0.rsplit('/').next().unwrap().to_string();
        assert!(process_is(me, &name, None));
        assert!(!process_is(me, "hearth-vmm", None));
        assert!(!process_is(me, &name, Some("no-such-argument-anywhere")));
        assert!(!process_is(i32::MAX, &name, None));
    }
}
