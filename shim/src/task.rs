//! containerd's Task service, served by driving the agent in the utility VM.
//!
//! One shim serves every container of its group (one VM): the first `Create`
//! boots the VM, the last `Delete` plus containerd's `Shutdown` start the idle
//! timer that powers it off. Each started process has a thread blocked in the
//! agent's `WaitProcess`, which records the exit and publishes `TaskExit` once
//! the output has reached containerd.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use containerd_shim::api::*;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics::*;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Task, TtrpcContext, TtrpcResult};
use hearth_agent_protocol::agent as pb;

use crate::config::Config;
use crate::io::{self, ProcessIo, StdioPaths};
use crate::lifecycle::{BootError, Ended, Lifecycle, Unavailable};
use crate::source::GuestWritable;
use crate::vm::{self, ctx, Vm};
use containerd_shim::protos::ttrpc as sttrpc;

const OUTPUT_GRACE: Duration = Duration::from_secs(5);
/// Exit status of processes whose VM died under them.
const VM_GONE_STATUS: u32 = 255;

#[derive(Default)]
struct Proc {
    paths: StdioPaths,
    io: Option<Arc<ProcessIo>>,
    /// An exec's process document, until it is started.
    exec_spec: Option<Vec<u8>>,
    started: bool,
    exit: Option<(u32, SystemTime)>,
}

struct Container {
    bundle: String,
    /// Mount points on the host to undo at delete, innermost last.
    mounts: Vec<PathBuf>,
    init: Proc,
    execs: HashMap<String, Proc>,
    vm_boot_id: String,
    /// The id of the disk its root is on, attached to the VM (detached at
    /// delete), if it runs on a disk image (see disk.rs).
    disk: Option<String>,
    /// The key of the layer image its root is over, if it runs on one
    /// (layers.rs): released at delete.
    layers: Option<String>,
    /// The pid containerd is given for each of the container's processes:
    /// hearth-vmm's, the host process that runs them (as Kata reports its
    /// hypervisor's). A guest pid means nothing on the host, and `docker
    /// top`, monitoring agents or nsenter scripts would act on whatever host
    /// process has that number.
    host_pid: u32,
    /// Its init's pid in the VM, as the agent reported it: used only to
    /// name its namespaces there for the containers of its pod (pod.rs).
    guest_pid: u32,
    /// The interfaces of the network namespace its caller made, mirrored
    /// into the VM (netns.rs); undone at delete.
    netns: Option<crate::netns::Mirrored>,
    /// Its poststart and poststop hooks, and the state they are given
    /// (hooks.rs).
    hooks: Option<(crate::hooks::Hooks, crate::hooks::State)>,
    /// The relay to its resolver on the host (dns.rs); stops when dropped.
    _dns: Option<crate::dns::Relay>,
}

impl Container {
    fn proc(&mut self, exec_id: &str) -> TtrpcResult<&mut Proc> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs.get_mut(exec_id).ok_or_else(|| not_found(format!("no process {exec_id:?}")))
    }
}

/// How many deleted containers the shim remembers for late OOM reports.
const DELETED_KEPT: usize = 64;

pub struct Inner {
    /// The configuration in force; a create's runtime options may replace it
    /// while no VM runs.
    cfg: Mutex<Config>,
    /// The file the configuration came from, when one was named.
    cfg_source: Mutex<Option<PathBuf>>,
    /// Why the configuration could not be loaded: creates fail with it
    /// rather than boot a VM from defaults nobody asked for.
    cfg_error: Mutex<Option<String>>,
    namespace: String,
    publisher: RemotePublisher,
    /// The VM's life: down, running, being stopped, or closed for good
    /// (lifecycle.rs).
    vm: Lifecycle<Vm>,
    containers: Mutex<HashMap<String, Container>>,
    /// The last containers deleted, with their VM's boot id: the agent's
    /// OOM report can arrive after the container's process ended and
    /// containerd deleted it (`ctr run --rm`), and is still about one of ours.
    deleted: Mutex<std::collections::VecDeque<(String, String)>>,
    exited: Condvar,
    exit: Arc<ExitSignal>,
    /// Creates under way: a create that is still booting the VM has no
    /// container in the table yet, but the VM must not idle out under it.
    creating: AtomicUsize,
    /// The shim's own socket, removed when it decides to exit so that
    /// containerd starts a fresh shim for the next container.
    socket: String,
}

#[derive(Clone)]
pub struct Service(pub Arc<Inner>);

// containerd's side speaks the ttrpc of containerd-shim (sttrpc); the agent's
// side the workspace's. Statuses cross by code number.
fn status(code: sttrpc::Code, msg: impl Into<String>) -> sttrpc::Error {
    sttrpc::Error::RpcStatus(sttrpc::get_status(code, msg.into()))
}

/// Why there is no VM to serve a request, as containerd is told.
fn unavailable(u: Unavailable) -> sttrpc::Error {
    match u {
        Unavailable::Closed => {
            status(sttrpc::Code::UNAVAILABLE, "this shim is shutting its idle VM down: retry, a new shim will start")
        }
        Unavailable::NotRunning => status(sttrpc::Code::UNAVAILABLE, "the utility VM is not running"),
    }
}

fn not_found(msg: impl Into<String>) -> sttrpc::Error {
    status(sttrpc::Code::NOT_FOUND, msg)
}

fn internal(e: impl std::fmt::Display) -> sttrpc::Error {
    status(sttrpc::Code::INTERNAL, format!("{e:#}"))
}

/// An agent failure, with its status code, for containerd.
fn agent_err(e: ttrpc::Error) -> sttrpc::Error {
    use containerd_shim::protos::protobuf::Enum;
    match e {
        ttrpc::Error::RpcStatus(s) => {
            let code = sttrpc::Code::from_i32(s.code().value()).unwrap_or(sttrpc::Code::INTERNAL);
            status(code, format!("hearth agent: {}", as_runc_says(s.message())))
        }
        other => status(sttrpc::Code::UNAVAILABLE, format!("hearth agent: {other}")),
    }
}

/// An agent error's text, for a create.
fn agent_text(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => as_runc_says(s.message()),
        other => other.to_string(),
    }
}

/// The agent's message, with a missing executable worded as runc words it:
/// Docker and the CRI recognise that wording (Docker's exit code 127 for
/// `docker run`/`docker exec` of a missing command), not libcontainer's.
fn as_runc_says(msg: &str) -> String {
    const YOUKI: (&str, &str) = ("executable '", "' not found in $PATH");
    if let Some(start) = msg.find(YOUKI.0) {
        let rest = &msg[start + YOUKI.0.len()..];
        if let Some(end) = rest.find(YOUKI.1) {
            return format!("{msg}: exec: \"{}\": executable file not found in $PATH", &rest[..end]);
        }
    }
    msg.to_string()
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32, ..Default::default() }
}

fn from_nanos(n: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(n.max(0) as u64)
}

impl Service {
    pub fn new(
        cfg: Config,
        cfg_error: Option<String>,
        namespace: String,
        socket: String,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Service {
        Service(Arc::new(Inner {
            cfg: Mutex::new(cfg),
            cfg_source: Mutex::new(std::env::var_os("HEARTH_CONFIG").map(PathBuf::from)),
            cfg_error: Mutex::new(cfg_error),
            namespace,
            publisher,
            vm: Lifecycle::default(),
            containers: Mutex::new(HashMap::new()),
            exited: Condvar::new(),
            exit,
            creating: AtomicUsize::new(0),
            deleted: Mutex::new(std::collections::VecDeque::new()),
            socket,
        }))
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.0.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cfg(&self) -> Config {
        self.0.cfg.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Applies a create's runtime options: a `ConfigPath` names the
    /// configuration to boot the VM with. A VM already running keeps its own.
    fn apply_options(&self, options: Option<&Any>) -> TtrpcResult<()> {
        let Some(path) = options.and_then(|o| crate::config::config_path_from_options(&o.type_url, &o.value)) else {
            return Ok(());
        };
        if self.0.cfg_source.lock().unwrap().as_ref() == Some(&path) {
            return Ok(());
        }
        let vm_running = self.0.vm.running().is_ok();
        if vm_running {
            log::warn!("runtime option ConfigPath {} ignored: the utility VM is already running", path.display());
            return Ok(());
        }
        let cfg = Config::from_file(&path).map_err(|e| {
            status(sttrpc::Code::INVALID_ARGUMENT, format!("{e:#} (named by the runtime option ConfigPath)"))
        })?;
        *self.0.cfg.lock().unwrap() = cfg;
        *self.0.cfg_source.lock().unwrap() = Some(path);
        *self.0.cfg_error.lock().unwrap() = None;
        Ok(())
    }

    /// Whether the VM is in use: containers, or a create under way.
    fn busy(&self, containers: &HashMap<String, Container>) -> bool {
        !containers.is_empty() || self.0.creating.load(Ordering::SeqCst) > 0
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self.0.publisher.publish(Default::default(), topic, &self.0.namespace, event) {
            log::warn!("publishing {topic}: {e}");
        }
    }

    fn vm(&self) -> TtrpcResult<Arc<Vm>> {
        self.0.vm.running().map_err(unavailable)
    }

    /// The running VM, booting it first if there is none; `pod_cgroup` is
    /// the cgroup of the pod it is booted for, in per-pod mode.
    fn ensure_vm(&self, pod_cgroup: Option<&Path>) -> TtrpcResult<Arc<Vm>> {
        let mut booted = false;
        let vm = self
            .0
            .vm
            .running_or_boot(|| {
                booted = true;
                self.boot(pod_cgroup)
            })
            .map_err(|e| match e {
                BootError::Unavailable(u) => unavailable(u),
                BootError::Boot(e) => e,
            })?;
        if booted {
            self.watch_oom(vm.clone());
            self.watch_agent(vm.clone(), self.cfg().agent_timeout_secs);
        }
        Ok(vm)
    }

    /// Boots a VM (for [`Lifecycle::running_or_boot`]) and records it for
    /// `hearth status`.
    fn boot(&self, pod_cgroup: Option<&Path>) -> TtrpcResult<Arc<Vm>> {
        if let Some(e) = self.0.cfg_error.lock().unwrap().clone() {
            return Err(status(
                sttrpc::Code::FAILED_PRECONDITION,
                format!("{e}: fix the file, then run the container again"),
            ));
        }
        let cfg = self.cfg();
        crate::vm::reap_orphans(&cfg.state_dir);
        let dir = cfg.state_dir.join(format!("{}-{}", self.0.namespace, std::process::id()));
        let me = self.clone();
        let vm = Vm::boot(&cfg, &dir, pod_cgroup, move |code, killed, console| me.vm_ended(code, killed, console))
            .map_err(|e| status(sttrpc::Code::UNAVAILABLE, format!("booting the utility VM: {e:#}")))?;
        let record = crate::record::VmRecord {
            namespace: self.0.namespace.clone(),
            shim_pid: std::process::id(),
            shim_address: self.0.socket.clone(),
            vmm_pid: vm.vmm_pid,
            boot_id: vm.boot_id.clone(),
            booted_at: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs(),
            memory_mib: cfg.memory_mib,
            vcpus: cfg.vcpus,
            kernel: cfg.kernel.clone(),
            vsock: vm.vsock.clone(),
            console: vm.dir.join(crate::vm::JAIL).join("console.log"),
            api_socket: Some(vm.dir.join(crate::vm::JAIL).join(crate::vm::API_SOCKET)),
            network: vm.network.clone(),
            ports_file: cfg.localhost_forwarding.then(|| vm.dir.join(crate::forward::PORTS_FILE)),
        };
        if let Err(e) = record.write(&vm.dir) {
            log::warn!("writing the VM's record in {}: {e:#}", vm.dir.display());
        }
        Ok(Arc::new(vm))
    }

    /// hearth-vmm ended. Unless the shim powered it off, every process still
    /// running in it has exited: say so, with the reason in the log.
    fn vm_ended(&self, code: i32, killed: Option<String>, console: String) {
        let why = match self.0.vm.ended() {
            Ended::OnPurpose => return,
            Ended::Unexpectedly(vm) => {
                if let Some(vm) = vm {
                    vm.cleanup();
                }
                None
            }
            Ended::Stopped { vm, why } => {
                vm.cleanup();
                Some(why)
            }
        };
        let reason = why.or(killed).unwrap_or_else(|| {
            match code {
                3 => "the guest kernel panicked",
                4 => "the guest crashed",
                0 => "the guest shut down",
                _ => "hearth-vmm failed",
            }
            .to_string()
        });
        log::error!("the utility VM ended (hearth-vmm status {code}: {reason}); its processes are reported exited with {VM_GONE_STATUS}\n--- console ---\n{console}");
        let now = SystemTime::now();
        let mut events = Vec::new();
        {
            let mut cs = self.containers();
            for (id, c) in cs.iter_mut() {
                let host_pid = c.host_pid;
                let procs = std::iter::once(("".to_string(), &mut c.init))
                    .chain(c.execs.iter_mut().map(|(k, v)| (k.clone(), v)));
                for (exec_id, p) in procs {
                    if p.started && p.exit.is_none() {
                        if let Some(io) = &p.io {
                            io.notify(&format!("the utility VM ended ({reason}); exit status {VM_GONE_STATUS}"));
                        }
                        p.exit = Some((VM_GONE_STATUS, now));
                        events.push(TaskExit {
                            container_id: id.clone(),
                            id: if exec_id.is_empty() { id.clone() } else { exec_id },
                            pid: host_pid,
                            exit_status: VM_GONE_STATUS,
                            exited_at: Some(timestamp(now)).into(),
                            ..Default::default()
                        });
                    }
                }
            }
        }
        self.0.exited.notify_all();
        for e in events {
            self.publish(TASK_EXIT_EVENT_TOPIC, Box::new(e));
        }
    }

    /// Whether `vm` is still the shim's VM (not ended, not replaced).
    fn is_current(&self, vm: &Arc<Vm>) -> bool {
        self.0.vm.is_current(vm)
    }

    /// Checks the agent's health every few seconds. An agent that leaves a
    /// check unanswered for `timeout_secs` (hung, or its VM frozen) is dead:
    /// the shim stops the VM, and vm_ended reports every task exited with the
    /// reason, rather than leaving containerd waiting for ever.
    fn watch_agent(&self, vm: Arc<Vm>, timeout_secs: u64) {
        if timeout_secs == 0 {
            return;
        }
        let me = self.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(timeout_secs.min(5)));
            if !me.is_current(&vm) {
                return;
            }
            let Err(e) = vm.agent.health(ctx(timeout_secs as i64), &pb::Empty::new()) else { continue };
            // A VMM that just ended fails the check too: give vm_ended the
            // moment it needs to take the VM first.
            let settle = Instant::now() + Duration::from_secs(3);
            while Instant::now() < settle && me.is_current(&vm) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let reason = format!("the agent did not answer a health check within {timeout_secs} s ({e})");
            // Not if it ended, or the shim is closing, in the meantime.
            if !me.0.vm.stop_serving(&vm, reason.clone()) {
                return;
            }
            log::error!("{reason}: stopping the utility VM (hearth-vmm pid {})", vm.vmm_pid);
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(vm.vmm_pid), nix::sys::signal::SIGKILL);
            return;
        });
    }

    fn watch_oom(&self, vm: Arc<Vm>) {
        let me = self.clone();
        std::thread::spawn(move || {
            let mut ignored = 0u64;
            while let Ok(ev) = vm.agent.get_oom_event(ttrpc::context::with_timeout(0), &pb::Empty::new()) {
                // The guest names the container: only one of ours, in this
                // VM, gets an event; anything else is the guest's word alone
                // (logged at 1, 2, 4, 8... so that a guest cannot flood the log).
                let ours = me.containers().get(&ev.container_id).is_some_and(|c| c.vm_boot_id == vm.boot_id)
                    || me
                        .0
                        .deleted
                        .lock()
                        .unwrap()
                        .iter()
                        .any(|(id, boot)| *id == ev.container_id && *boot == vm.boot_id);
                if !ours {
                    ignored += 1;
                    if ignored.is_power_of_two() {
                        log::warn!(
                            "the agent reported an OOM kill in {:?}, no container of this VM; ignored ({ignored} so far)",
                            ev.container_id
                        );
                    }
                    continue;
                }
                me.publish(
                    TASK_OOM_EVENT_TOPIC,
                    Box::new(TaskOOM { container_id: ev.container_id, ..Default::default() }),
                );
            }
        });
    }

    /// Waits in the agent for a process's end, then records and publishes it.
    fn spawn_waiter(&self, vm: Arc<Vm>, id: String, exec_id: String, io: Option<Arc<ProcessIo>>) {
        let me = self.clone();
        std::thread::spawn(move || {
            let req = pb::ProcessRequest { container_id: id.clone(), exec_id: exec_id.clone(), ..Default::default() };
            let (code, at) = match vm.agent.wait_process(ttrpc::context::with_timeout(0), &req) {
                Ok(w) => (w.exit_status, from_nanos(w.exited_at_unix_nanos)),
                Err(e) => {
                    // The VM went away; vm_ended reports it.
                    log::warn!("waiting for {id}/{exec_id}: {e}");
                    return;
                }
            };
            if let Some(io) = io {
                io.drain(OUTPUT_GRACE);
            }
            {
                let mut cs = me.containers();
                let Some(c) = cs.get_mut(&id) else { return };
                let Ok(p) = c.proc(&exec_id) else { return };
                if p.exit.is_some() {
                    return;
                }
                p.exit = Some((code, at));
            }
            me.0.exited.notify_all();
            me.publish(
                TASK_EXIT_EVENT_TOPIC,
                Box::new(TaskExit {
                    container_id: id.clone(),
                    id: if exec_id.is_empty() { id.clone() } else { exec_id },
                    pid: vm.vmm_pid as u32,
                    exit_status: code,
                    exited_at: Some(timestamp(at)).into(),
                    ..Default::default()
                }),
            );
        });
    }

    fn undo_mounts(mounts: &[PathBuf]) {
        for m in mounts.iter().rev() {
            crate::share::unmount(m);
        }
    }

    /// containerd's snapshot, mounted on the host as runc's shim does, and
    /// bound into the roots share for the guest.
    fn share_root(
        &self,
        req: &CreateTaskRequest,
        bundle: &Path,
        spec: &oci_spec::runtime::Spec,
        vm: &Vm,
        writable: &GuestWritable,
        mounts: &mut Vec<PathBuf>,
    ) -> anyhow::Result<()> {
        let host_root = bundle.join("rootfs");
        for m in &req.rootfs {
            let fstype = (!m.type_.is_empty()).then_some(m.type_.as_str());
            std::fs::create_dir_all(&host_root)?;
            containerd_shim::mount::mount_rootfs(fstype, Some(m.source.as_str()), &m.options, &host_root)
                .map_err(|e| anyhow::anyhow!("mounting the container's rootfs: {e}"))?;
            mounts.push(host_root.clone());
        }
        let root = match spec.root().as_ref().map(|r| r.path().clone()) {
            Some(p) if p.is_absolute() => p,
            Some(p) => bundle.join(p),
            None => host_root.clone(),
        };
        let fd = crate::source::open(&root, writable)?;
        mounts.push(vm.roots.bind(&Path::new(&req.id).join("rootfs"), &root, &fd, true, false)?);
        Ok(())
    }

    /// The erofs image of the container's layers, attached to the VM, when
    /// its root is an overlayfs snapshot and that path is chosen (its key
    /// and disk serial); None for the virtio-fs path, which is also where a
    /// root goes when the image cannot be made or attached (said in the log).
    fn layer_root(
        &self,
        req: &CreateTaskRequest,
        spec: &oci_spec::runtime::Spec,
        vm: &Vm,
    ) -> anyhow::Result<Option<(String, String)>> {
        let cfg = self.cfg();
        if crate::layers::wanted(spec, cfg.overlay_roots)? != crate::layers::OverlayRoots::Erofs {
            return Ok(None);
        }
        let Some(lowers) = crate::layers::lower_dirs(&req.rootfs) else { return Ok(None) };
        let attached = (|| {
            let (key, image) = crate::layers::image(&cfg.layer_images_dir, &lowers, cfg.layer_images_kept)?;
            let serial = vm.layers.acquire(&vm.api, &key, &image)?;
            Ok::<_, anyhow::Error>((key, serial))
        })();
        match attached {
            Ok(a) => Ok(Some(a)),
            Err(e) => {
                log::warn!(
                    "container {}: its root goes over virtio-fs, not on an erofs image of its layers: {e:#}",
                    req.id
                );
                Ok(None)
            }
        }
    }

    /// Lets go of a container's disks in the VM (its agent unmounted
    /// them): its disk root is detached, its layer image released (detached
    /// with the image's last container).
    fn release_disks(vm: &Vm, id: &str, disk: &Option<String>, layers: &Option<String>) {
        if let Some(serial) = disk {
            if let Err(e) = vm.api.detach_disk(serial) {
                log::warn!("container {id}: detaching its disk {serial}: {e}");
            }
        }
        if let Some(key) = layers {
            vm.layers.release(&vm.api, key);
        }
    }

    fn do_create(&self, req: &CreateTaskRequest) -> anyhow::Result<(u32, Container)> {
        let bundle = PathBuf::from(&req.bundle);
        let spec_json = std::fs::read(bundle.join("config.json"))
            .map_err(|e| anyhow::anyhow!("reading {}/config.json: {e}", bundle.display()))?;
        let mut spec = hearth_oci::parse_spec(&spec_json)?;
        // A pod's own VM is accounted in the pod's cgroup (cgroup.rs).
        let pod_cgroup = match self.cfg().mode {
            crate::config::VmMode::PerPod => crate::pod::cgroup_parent(&spec),
            crate::config::VmMode::Shared => None,
        };
        let vm = self.ensure_vm(pod_cgroup.as_deref()).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let hooks = crate::hooks::Hooks::from_spec(&spec)?;
        // A CRI pod's container joins its sandbox's namespaces in the VM.
        let pod = match crate::pod::sandbox_of(&spec) {
            Some(sandbox) => Some((self.sandbox_pid(&sandbox, &vm)?, crate::pod::shared_namespaces(&spec))),
            None => None,
        };
        let mut mounts = Vec::new();
        // Where guests can write on the host, as of now: bind sources do
        // not follow symlinks there.
        let writable = GuestWritable::scan(&self.cfg().state_dir);
        let mut disk = None;
        let mut layers = None;
        let mut mirrored = None;
        let mut dns = None;
        let result = (|| {
            let guest_root = Path::new(vm::GUEST_ROOTS).join(&req.id).join("rootfs");
            // A root on a disk: a disk image the annotation names, or a
            // block-device snapshot (devmapper); attached, then mounted by
            // the agent. Any other root is shared over virtio-fs.
            let block = match crate::disk::requested(&spec) {
                Some(image) => {
                    Some((crate::disk::open(&self.cfg().disk_images_dir, &image)?, format!("the disk image {image}")))
                }
                None => match crate::disk::snapshot_device(&req.rootfs) {
                    Some(device) => {
                        Some((crate::disk::open_device(&device)?, format!("the snapshot device {}", device.display())))
                    }
                    None => None,
                },
            };
            let rootfs = match block {
                Some((file, what)) => {
                    let serial = crate::disk::serial(&req.id);
                    vm.api
                        .attach_disk(&file, &serial, false)
                        .map_err(|e| anyhow::anyhow!("attaching {what} to the VM: {e}"))?;
                    disk = Some(serial.clone());
                    log::info!("container {}: root on {what} (disk {serial})", req.id);
                    pb::Rootfs { block_serial: serial, ..Default::default() }
                }
                None => match self.layer_root(req, &spec, &vm)? {
                    Some((key, serial)) => {
                        log::info!("container {}: root on the erofs image {key} of its layers (disk {serial})", req.id);
                        layers = Some(key);
                        pb::Rootfs {
                            block_serial: serial,
                            fs_type: "erofs".into(),
                            block_is_lower: true,
                            ..Default::default()
                        }
                    }
                    None => {
                        self.share_root(req, &bundle, &spec, &vm, &writable, &mut mounts)?;
                        pb::Rootfs { path: guest_root.display().to_string(), ..Default::default() }
                    }
                },
            };
            // Read before the translation drops the path (the guest cannot
            // join a host namespace; it gets its interfaces instead).
            let mut interfaces = Vec::new();
            let mut dns_relay = None;
            // A pod's container has its sandbox's network, mirrored already.
            let requested = crate::netns::requested(&spec).filter(|_| pod.is_none());
            if let Some(p) = &requested {
                crate::netns::check_joinable(p, vm.vmm_pid)?;
            }
            // Hooks run on the host, with a holder thread in the
            // container's host-side network namespace as their pid; what
            // they plug into that namespace (Docker's veth) is mirrored.
            let held = if hooks.any() {
                hooks.run_create_held(&spec, &req.id, &req.bundle, requested.as_deref())?
            } else {
                None
            };
            let to_mirror = match held {
                Some(ns) => Some((ns.path(), Some(ns))),
                None => requested.map(|p| (p, None)),
            };
            if let Some((netns, held)) = to_mirror {
                // A resolver at a loopback address of that namespace
                // (Docker's 127.0.0.11) is relayed into the container's.
                if let Some(addr) = crate::dns::wanted(&spec) {
                    let (relay, r) = crate::dns::Relay::start(&vm.vsock, &netns, addr)
                        .map_err(|e| e.context(format!("relaying the resolver {addr} of {}", netns.display())))?;
                    log::info!("container {}: its resolver {addr} relayed from {}", req.id, netns.display());
                    dns = Some(relay);
                    dns_relay = Some(r);
                }
                let (m, nics) = crate::netns::Mirrored::set_up(&req.id, &netns, held, &vm.api).map_err(|e| {
                    e.context(format!("mirroring the network namespace {} into the VM", netns.display()))
                })?;
                log::info!(
                    "container {}: interfaces {:?} of {} mirrored into the VM",
                    req.id,
                    m.names(),
                    netns.display()
                );
                mirrored = Some(m);
                interfaces = nics;
            }
            for b in hearth_oci::translate::for_guest(&mut spec, &req.id, Path::new(vm::GUEST_SHARED)) {
                // Resolved so that no guest-planted symlink aims it (source.rs).
                let fd = crate::source::open(&b.source, &writable)?;
                mounts.push(vm.shared.bind(&b.in_share, &b.source, &fd, b.recursive, b.readonly)?);
            }
            if let Some((sandbox_pid, shared)) = &pod {
                crate::pod::join_sandbox(&mut spec, shared, *sandbox_pid)?;
            }
            let paths = StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            };
            let (stdio, pending) = io::prepare(&vm.vsock, &paths)?;
            let create = pb::CreateContainerRequest {
                container_id: req.id.clone(),
                spec_json: serde_json::to_vec(&spec)?,
                rootfs: Some(rootfs).into(),
                stdio: Some(stdio).into(),
                interfaces,
                dns_relay: dns_relay.into(),
                ..Default::default()
            };
            let guest_pid = vm
                .agent
                .create_container(ctx(120), &create)
                .map_err(|e| anyhow::anyhow!("the agent: {}", agent_text(&e)))?
                .pid;
            log::info!("container {}: guest pid {guest_pid} in hearth-vmm pid {}", req.id, vm.vmm_pid);
            let io = pending.start().map(Arc::new).ok();
            Ok::<_, anyhow::Error>((paths, io, guest_pid))
        })();
        let host_pid = vm.vmm_pid as u32;
        match result {
            Ok((paths, io, guest_pid)) => Ok((
                host_pid,
                Container {
                    bundle: req.bundle.clone(),
                    mounts,
                    init: Proc { paths, io, ..Default::default() },
                    execs: HashMap::new(),
                    vm_boot_id: vm.boot_id.clone(),
                    disk,
                    layers,
                    host_pid,
                    guest_pid,
                    netns: mirrored,
                    _dns: dns,
                    hooks: hooks.any().then(|| {
                        (hooks, crate::hooks::State::new(&spec, &req.id, &req.bundle, "created", host_pid as i32))
                    }),
                },
            )),
            Err(e) => {
                if let Some(m) = &mirrored {
                    m.teardown(Some(&vm.api));
                }
                Self::undo_mounts(&mounts);
                Self::release_disks(&vm, &req.id, &disk, &layers);
                vm.forget_dirs(&req.id);
                Err(e)
            }
        }
    }

    /// The guest pid of pod sandbox `id`'s init, which must run in `vm`.
    fn sandbox_pid(&self, id: &str, vm: &Vm) -> anyhow::Result<u32> {
        let cs = self.containers();
        match cs.get(id) {
            Some(c) if c.vm_boot_id == vm.boot_id => Ok(c.guest_pid),
            Some(_) => anyhow::bail!("the pod sandbox {id} ran in an earlier VM, which is gone: recreate the pod"),
            None => anyhow::bail!(
                "the pod sandbox {id} is not served by this shim: a pod's containers must run in its sandbox's VM \
                 (are the sandbox and this container under different runtime handlers?)"
            ),
        }
    }

    /// After the last container is gone and containerd asked the shim to
    /// shut down: wait the idle time, then power the VM off and exit.
    fn idle_shutdown(&self, now: bool) {
        let me = self.clone();
        std::thread::spawn(move || {
            let idle = if now { Duration::ZERO } else { Duration::from_secs(me.cfg().idle_timeout_secs) };
            let deadline = Instant::now() + idle;
            while Instant::now() < deadline {
                if me.busy(&me.containers()) {
                    return; // busy again
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let vm = {
                // Decide under the containers lock, so that a create either
                // comes first (and the shim stays) or finds it closed.
                let cs = me.containers();
                if me.busy(&cs) {
                    return;
                }
                let vm = me.0.vm.close();
                let _ = std::fs::remove_file(me.0.socket.trim_start_matches("unix://"));
                vm
            };
            if let Some(vm) = vm {
                log::info!("no containers for {idle:?}: shutting the utility VM down");
                vm.shutdown();
            }
            me.0.exit.signal();
        });
    }
}

fn unpack_spec(any: &Any) -> Vec<u8> {
    any.value.clone()
}

impl Task for Service {
    fn connect(&self, _: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let task_pid = self.containers().get(&req.id).map(|c| c.host_pid).unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn create(&self, _: &TtrpcContext, req: CreateTaskRequest) -> TtrpcResult<CreateTaskResponse> {
        {
            let cs = self.containers();
            if self.0.vm.is_closed() {
                return Err(unavailable(Unavailable::Closed));
            }
            if cs.contains_key(&req.id) {
                return Err(status(sttrpc::Code::ALREADY_EXISTS, format!("container {} already exists", req.id)));
            }
            self.0.creating.fetch_add(1, Ordering::SeqCst);
        }
        // Counted until the container is in the table (or the create failed).
        struct Creating<'a>(&'a AtomicUsize);
        impl Drop for Creating<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _creating = Creating(&self.0.creating);
        self.apply_options(req.options.as_ref())?;
        let (pid, c) = self.do_create(&req).map_err(|e| {
            log::error!("create {}: {e:#}", req.id);
            internal(e)
        })?;
        self.containers().insert(req.id.clone(), c);
        // containerd reads this container's log FIFO now (logging.rs).
        crate::logging::attach(&Path::new(&req.bundle).join("log"));
        self.publish(
            TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                })
                .into(),
                pid,
                ..Default::default()
            }),
        );
        Ok(CreateTaskResponse { pid, ..Default::default() })
    }

    fn start(&self, _: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let vm = self.vm()?;
        if req.exec_id.is_empty() {
            let io = {
                let mut cs = self.containers();
                let c = cs.get_mut(&req.id).ok_or_else(|| not_found(format!("no container {}", req.id)))?;
                c.init.io.clone()
            };
            vm.agent
                .start_container(ctx(60), &pb::ContainerRequest { container_id: req.id.clone(), ..Default::default() })
                .map_err(agent_err)?;
            let (pid, hooks) = {
                let mut cs = self.containers();
                let c = cs.get_mut(&req.id).ok_or_else(|| not_found("deleted while starting"))?;
                c.init.started = true;
                (c.host_pid, c.hooks.clone())
            };
            if let Some((hooks, mut state)) = hooks {
                state.status = "running";
                hooks.run_poststart(&state);
            }
            self.spawn_waiter(vm, req.id.clone(), String::new(), io);
            self.publish(
                TASK_START_EVENT_TOPIC,
                Box::new(TaskStart { container_id: req.id.clone(), pid, ..Default::default() }),
            );
            return Ok(StartResponse { pid, ..Default::default() });
        }
        let (spec, paths) = {
            let mut cs = self.containers();
            let c = cs.get_mut(&req.id).ok_or_else(|| not_found(format!("no container {}", req.id)))?;
            let p = c.proc(&req.exec_id)?;
            (p.exec_spec.clone().unwrap_or_default(), p.paths.clone())
        };
        let (stdio, pending) = io::prepare(&vm.vsock, &paths).map_err(internal)?;
        let exec = pb::ExecProcessRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            process_json: spec,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        let guest_pid = vm.agent.exec_process(ctx(120), &exec).map_err(agent_err)?.pid;
        let io = pending.start().map(Arc::new).ok();
        let pid = {
            let mut cs = self.containers();
            let c = cs.get_mut(&req.id).ok_or_else(|| not_found("deleted while starting"))?;
            let host_pid = c.host_pid;
            let p = c.proc(&req.exec_id)?;
            p.started = true;
            p.io = io.clone();
            host_pid
        };
        log::info!("exec {}/{}: guest pid {guest_pid}", req.id, req.exec_id);
        self.spawn_waiter(vm, req.id.clone(), req.exec_id.clone(), io);
        self.publish(
            TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(StartResponse { pid, ..Default::default() })
    }

    fn exec(&self, _: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let spec = req.spec.as_ref().map(unpack_spec).unwrap_or_default();
        let mut cs = self.containers();
        let c = cs.get_mut(&req.id).ok_or_else(|| not_found(format!("no container {}", req.id)))?;
        if c.execs.contains_key(&req.exec_id) {
            return Err(status(sttrpc::Code::ALREADY_EXISTS, format!("exec {} already exists", req.exec_id)));
        }
        c.execs.insert(
            req.exec_id.clone(),
            Proc {
                paths: StdioPaths { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal: req.terminal },
                exec_spec: Some(spec),
                ..Default::default()
            },
        );
        drop(cs);
        self.publish(
            TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded { container_id: req.id, exec_id: req.exec_id, ..Default::default() }),
        );
        Ok(Empty::new())
    }

    fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let r = pb::ResizePtyRequest {
            container_id: req.id,
            exec_id: req.exec_id,
            width: req.width,
            height: req.height,
            ..Default::default()
        };
        self.vm()?.agent.resize_pty(ctx(30), &r).map_err(agent_err)?;
        Ok(Empty::new())
    }

    fn close_io(&self, _: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let mut cs = self.containers();
        let c = cs.get_mut(&req.id).ok_or_else(|| not_found(format!("no container {}", req.id)))?;
        if let Some(io) = &c.proc(&req.exec_id)?.io {
            io.close_stdin();
        }
        Ok(Empty::new())
    }

    fn kill(&self, _: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        {
            let mut cs = self.containers();
            let c = cs.get_mut(&req.id).ok_or_else(|| not_found(format!("no container {}", req.id)))?;
            if c.proc(&req.exec_id)?.exit.is_some() {
                return Err(not_found("process already finished"));
            }
        }
        let r = pb::SignalProcessRequest {
            container_id: req.id,
            exec_id: req.exec_id,
            signal: req.signal,
            all: req.all,
            ..Default::default()
        };
        self.vm()?.agent.signal_process(ctx(30), &r).map_err(agent_err)?;
        Ok(Empty::new())
    }

    fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let mut cs = self.containers();
        loop {
            let c = cs.get_mut(&req.id).ok_or_else(|| not_found(format!("no container {}", req.id)))?;
            if let Some((code, at)) = c.proc(&req.exec_id)?.exit {
                return Ok(WaitResponse {
                    exit_status: code,
                    exited_at: Some(timestamp(at)).into(),
                    ..Default::default()
                });
            }
            cs = self.0.exited.wait(cs).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        if !req.exec_id.is_empty() {
            let mut cs = self.containers();
            let c = cs.get_mut(&req.id).ok_or_else(|| not_found(format!("no container {}", req.id)))?;
            let host_pid = c.host_pid;
            let p = c.execs.remove(&req.exec_id).ok_or_else(|| not_found(format!("no process {}", req.exec_id)))?;
            // The agent forgets it too, so that the exec id can be used again.
            if let (Ok(vm), true) = (self.vm(), p.started) {
                let r = pb::ProcessRequest {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                };
                if let Err(e) = vm.agent.delete_process(ctx(30), &r) {
                    log::warn!("deleting {}/{} in the VM: {e:?}", req.id, req.exec_id);
                }
            }
            let (code, at) = p.exit.unwrap_or((0, SystemTime::now()));
            return Ok(DeleteResponse {
                pid: if p.started { host_pid } else { 0 },
                exit_status: code,
                exited_at: Some(timestamp(at)).into(),
                ..Default::default()
            });
        }
        let mut c = self.containers().remove(&req.id).ok_or_else(|| not_found(format!("no container {}", req.id)))?;
        {
            let mut deleted = self.0.deleted.lock().unwrap();
            if deleted.len() == DELETED_KEPT {
                deleted.pop_front();
            }
            deleted.push_back((req.id.clone(), c.vm_boot_id.clone()));
        }
        // Its log FIFO goes with its bundle: log through another container's.
        if crate::logging::current().is_some_and(|p| p.starts_with(&c.bundle)) {
            if let Some(other) = self.containers().values().next() {
                crate::logging::attach(&Path::new(&other.bundle).join("log"));
            }
        }
        if let Ok(vm) = self.vm() {
            let d = pb::DeleteContainerRequest { container_id: req.id.clone(), force: true, ..Default::default() };
            if let Err(e) = vm.agent.delete_container(ctx(60), &d) {
                log::warn!("deleting {} in the VM: {e:?}", req.id);
            }
            Self::undo_mounts(&c.mounts);
            Self::release_disks(&vm, &req.id, &c.disk, &c.layers);
            if let Some(m) = &c.netns {
                m.teardown(Some(&vm.api));
            }
            vm.forget_dirs(&req.id);
        } else {
            Self::undo_mounts(&c.mounts);
            // The VM is gone, and its taps with it; the redirection on the
            // caller's interfaces goes now.
            if let Some(m) = &c.netns {
                m.teardown(None);
            }
        }
        if let Some((hooks, mut state)) = c.hooks.take() {
            state.status = "stopped";
            hooks.run_poststop(&state);
        }
        let (code, at) = c.init.exit.unwrap_or((0, SystemTime::now()));
        self.publish(
            TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                pid: c.host_pid,
                exit_status: code,
                exited_at: Some(timestamp(at)).into(),
                ..Default::default()
            }),
        );
        Ok(DeleteResponse {
            pid: c.host_pid,
            exit_status: code,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        })
    }

    fn state(&self, _: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let mut cs = self.containers();
        let c = cs.get_mut(&req.id).ok_or_else(|| not_found(format!("no container {}", req.id)))?;
        let (bundle, host_pid) = (c.bundle.clone(), c.host_pid);
        let p = c.proc(&req.exec_id)?;
        // An init has its place in the VM from create on; an exec from its start.
        let pid = if p.started || req.exec_id.is_empty() { host_pid } else { 0 };
        let st = match (p.started, p.exit) {
            (_, Some(_)) => Status::STOPPED,
            (true, None) => Status::RUNNING,
            (false, None) => Status::CREATED,
        };
        let (code, at) = p.exit.map(|(c, t)| (c, Some(timestamp(t)))).unwrap_or((0, None));
        Ok(StateResponse {
            id: req.id,
            bundle,
            pid,
            status: st.into(),
            stdin: p.paths.stdin.clone(),
            stdout: p.paths.stdout.clone(),
            stderr: p.paths.stderr.clone(),
            terminal: p.paths.terminal,
            exit_status: code,
            exited_at: at.into(),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    /// The host process that runs the container's processes: hearth-vmm,
    /// as Kata reports its hypervisor. The guest's own pids (which `ctr task
    /// exec ID ps` shows) are no host processes, and `docker top` or `ctr
    /// task ps` would otherwise point at unrelated host processes that
    /// happen to have the same numbers.
    fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let host_pid = self
            .containers()
            .get(&req.id)
            .map(|c| c.host_pid)
            .ok_or_else(|| not_found(format!("no container {}", req.id)))?;
        let processes = vec![containerd_shim::protos::types::task::ProcessInfo { pid: host_pid, ..Default::default() }];
        Ok(PidsResponse { processes, ..Default::default() })
    }

    fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let s = self
            .vm()?
            .agent
            .stats(ctx(30), &pb::ContainerRequest { container_id: req.id, ..Default::default() })
            .map_err(agent_err)?;
        let any = crate::metrics::to_containerd(&s).map_err(internal)?;
        Ok(StatsResponse { stats: Some(any).into(), ..Default::default() })
    }

    fn update(&self, _: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let resources = req.resources.as_ref().map(unpack_spec).unwrap_or_default();
        let r = pb::UpdateResourcesRequest { container_id: req.id, resources_json: resources, ..Default::default() };
        self.vm()?.agent.update_resources(ctx(30), &r).map_err(agent_err)?;
        Ok(Empty::new())
    }

    fn shutdown(&self, _: &TtrpcContext, req: ShutdownRequest) -> TtrpcResult<Empty> {
        log::debug!("shutdown requested (now: {}, containers: {})", req.now, self.containers().len());
        if self.containers().is_empty() {
            self.idle_shutdown(req.now);
        }
        Ok(Empty::new())
    }
}

/// The boot id of the VM a container runs in (for tests through `ctr`, the
/// guest's /proc/sys/kernel/random/boot_id says the same).
pub fn boot_id_of(s: &Service, id: &str) -> Option<String> {
    s.containers().get(id).map(|c| c.vm_boot_id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_executable_is_worded_as_runc_words_it() {
        let youki = "creating container \"c\": failed to create container: exec process failed with error error \
                     in executing process : executable 'nope' not found in $PATH";
        assert!(as_runc_says(youki).ends_with(": exec: \"nope\": executable file not found in $PATH"));
        assert_eq!(as_runc_says("something else"), "something else");
    }
}
