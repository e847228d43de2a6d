//! hearth-vmm: the KVM virtual machine monitor of hearth's utility VM.
//!
//! It boots hearth's tuned Linux kernel with an initramfs on N vCPUs and runs
//! it until the guest ends the VM. The layers, from the bottom:
//!
//! - [`checks`]: start-up checks of the host and the configuration, each
//!   failure explained (no /dev/kvm, no permission, a PVM-only KVM, a missing
//!   kernel, an impossible memory size).
//! - [`arch`]: the x86_64 guest: memory layout, MP table, GDT and page
//!   tables, CPUID and MSRs.
//! - [`boot`]: loading the kernel (ELF through PVH, or bzImage), the initramfs
//!   and the command line, and writing the boot parameters.
//! - [`vstate`]: the KVM VM (memory slots, irqchip, PIT) and vCPUs with
//!   their run loop.
//! - [`devices`]: what vCPU exits reach: the serial console (which also
//!   watches for kernel panics) and the i8042 reset line.
//! - [`seccomp`]: the seccomp filter each kind of thread installs before
//!   guest code runs (docs/security.md).
//! - [`jail`]: with `--jail`, the namespaces, root and (no) capabilities the
//!   VMM keeps once set up (docs/security.md).
//! - [`api`]: with `--api-socket`, the control socket through which the
//!   host attaches and detaches disks, sets the balloon, pauses, resumes
//!   and inspects the running VM, and its typed client.
//!
//! [`run`] ties these together and returns how the guest ended, which the
//! `hearth-vmm` binary turns into its exit status (see [`GuestExit::code`]).

pub mod api;
pub mod arch;
pub mod boot;
pub mod checks;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod jail;
pub mod seccomp;
pub mod vstate;

use std::io::Write;
use std::os::fd::IntoRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::channel;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::config::{Console, VmConfig, DEFAULT_CMDLINE};
use crate::devices::bus::Bus;
use crate::devices::legacy::console::ConsoleSink;
use crate::devices::legacy::{i8042, serial, IrqTrigger, SerialConsole, I8042};
use crate::devices::VmEvent;
use crate::vstate::{run_control::RunControl, vcpu::Vcpu, vm::Vm};

/// Exit status of `hearth-vmm` when the VMM itself fails (bad host, bad input).
pub const EXIT_VMM_ERROR: i32 = 1;

/// How the guest ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest rebooted or powered off (both end the VM).
    Shutdown,
    /// The guest kernel panicked; the panic line from its console.
    Panic(String),
    /// The guest could not go on (KVM internal error, failed entry...).
    Crashed(String),
}

impl GuestExit {
    /// The exit status of `hearth-vmm`: 0 for a clean shutdown, 3 for a guest
    /// kernel panic, 4 for a guest that crashed the vCPU (1 is a VMM error and
    /// 2 a usage error).
    pub fn code(&self) -> i32 {
        match self {
            GuestExit::Shutdown => 0,
            GuestExit::Panic(_) => 3,
            GuestExit::Crashed(_) => 4,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Check(#[from] checks::Error),
    #[error("this KVM lacks {0}, which hearth needs")]
    KvmCapability(&'static str),
    #[error("KVM could not {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error(transparent)]
    Vm(#[from] vstate::vm::Error),
    #[error(transparent)]
    Vcpu(#[from] vstate::vcpu::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    Mptable(#[from] arch::mptable::Error),
    #[error("cannot open the console log {path}: {source}")]
    ConsoleLog { path: String, source: std::io::Error },
    #[error(transparent)]
    Devices(#[from] device_manager::Error),
    #[error(transparent)]
    Fs(#[from] devices::virtio::fs::Error),
    #[error("cannot create the vsock socket {path}: {source}")]
    VsockSocket { path: String, source: std::io::Error },
    #[error("cannot open the disk {path}: {source}")]
    Disk { path: String, source: std::io::Error },
    #[error("cannot open the tap {tap}: {source}")]
    Net { tap: String, source: std::io::Error },
    #[error(transparent)]
    Seccomp(#[from] seccomp::Error),
    #[error(transparent)]
    Jail(#[from] jail::Error),
    #[error("cannot create the control socket {path}: {source}")]
    ApiSocket { path: String, source: std::io::Error },
    #[error("setting up the VMM: {0}")]
    Setup(String),
}

/// Boots the VM described by `config` on this host and runs it to its end.
pub fn run(config: &VmConfig) -> Result<GuestExit, Error> {
    run_on(&checks::Host::default(), config)
}

pub fn run_on(host: &checks::Host, config: &VmConfig) -> Result<GuestExit, Error> {
    let started = Instant::now();
    host.check_config(config)?;
    // Where the files reached by path at run time will be, once jailed.
    let mut console_in_jail = None;
    let mut vsock_in_jail = None;
    let mut api_in_jail = None;
    if let Some(jail) = &config.jail {
        jail::check(jail, config.jail_ids)?;
        if let Console::File(path) = &config.console {
            console_in_jail = Some(jail::inside(jail, path, "the console log")?);
        }
        if let Some(v) = &config.vsock {
            vsock_in_jail = Some(jail::inside(jail, &v.socket, "the vsock socket")?);
        }
        if let Some(api) = &config.api_socket {
            api_in_jail = Some(jail::inside(jail, api, "the control socket")?);
        }
    }
    let kvm_file = host.check_kvm()?;
    // SAFETY: the descriptor was just opened on the KVM device and is owned by
    // nothing else once turned into a raw fd.
    let kvm = unsafe { <Kvm as std::os::fd::FromRawFd>::from_raw_fd(kvm_file.into_raw_fd()) };
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip"),
        (Cap::UserMemory, "user memory regions"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Pit2, "the in-kernel PIT"),
        (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::KvmCapability(name));
        }
    }

    let vm = Vm::new(&kvm, config.memory_mib << 20)?;
    let (events, event_rx) = channel();

    let out: Box<dyn Write + Send> = match &config.console {
        Console::Stdout => Box::new(std::io::stdout()),
        // Capped and rotated: the guest can print forever.
        Console::File(path) => {
            let mut log = devices::legacy::console_log::ConsoleLog::with_cap(path, config.console_max_bytes)
                .map_err(|source| Error::ConsoleLog { path: path.display().to_string(), source })?;
            if let Some(p) = console_in_jail.take() {
                log.reached_at(p);
            }
            Box::new(log)
        }
        Console::Off => Box::new(std::io::sink()),
    };
    let sink = ConsoleSink::new(out, events.clone());
    let panic_watch = sink.watch();
    let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Setup(format!("eventfd: {e}")))?;
    vm.fd
        .register_irqfd(&irq, serial::COM1_IRQ)
        .map_err(|source| Error::Kvm { what: "register the serial irqfd", source })?;
    let console = Arc::new(SerialConsole::new(IrqTrigger(irq), sink));

    let mut pio = Bus::default();
    pio.insert(serial::COM1_PORT, serial::COM1_LEN, console.clone())
        .and_then(|_| pio.insert(i8042::I8042_PORT, i8042::I8042_LEN, Arc::new(I8042::new(events.clone()))))
        .map_err(|e| Error::Setup(e.to_string()))?;
    let pio = Arc::new(pio);

    let mut mmio = Bus::default();
    let mut devices = device_manager::DeviceManager::default();
    // What the control socket reaches: every disk (fixed ones for their
    // counters) and the balloon.
    let mut api_disks = Vec::new();
    let mut api_balloon = None;
    for disk in &config.disks {
        let block = devices::virtio::block::Block::new(disk.clone())
            .map_err(|source| Error::Disk { path: disk.path.display().to_string(), source })?;
        let slot = block.shared();
        let transport = devices.attach(&vm.fd, &vm.memory, &mut mmio, Box::new(block))?;
        api_disks.push(api::control::DiskDevice { transport, slot, hotplug: false });
    }
    // Slots follow the fixed disks, so the guest names those as before.
    for _ in 0..config.disk_slots {
        let block = devices::virtio::block::Block::slot();
        let slot = block.shared();
        let transport = devices.attach(&vm.fd, &vm.memory, &mut mmio, Box::new(block))?;
        api_disks.push(api::control::DiskDevice { transport, slot, hotplug: true });
    }
    let mut api_nics = Vec::new();
    for net in &config.nets {
        let dev = devices::virtio::net::Net::new(net.clone())
            .map_err(|source| Error::Net { tap: net.tap.clone(), source })?;
        let (nic, mac) = (dev.shared(), dev.mac());
        let transport = devices.attach(&vm.fd, &vm.memory, &mut mmio, Box::new(dev))?;
        api_nics.push(api::control::NicDevice { transport, nic, mac, hotplug: false });
    }
    // Slots follow the fixed NICs, so the guest names those as before.
    for index in 0..config.nic_slots {
        let dev = devices::virtio::net::Net::slot(index)
            .map_err(|source| Error::Net { tap: format!("slot {index}"), source })?;
        let (nic, mac) = (dev.shared(), dev.mac());
        let transport = devices.attach(&vm.fd, &vm.memory, &mut mmio, Box::new(dev))?;
        api_nics.push(api::control::NicDevice { transport, nic, mac, hotplug: true });
    }
    if let Some(vsock) = &config.vsock {
        let mut dev = devices::virtio::vsock::Vsock::new(vsock.clone())
            .map_err(|source| Error::VsockSocket { path: vsock.socket.display().to_string(), source })?;
        if let Some(p) = vsock_in_jail.take() {
            dev.reached_at(p);
        }
        devices.attach(&vm.fd, &vm.memory, &mut mmio, Box::new(dev))?;
    }
    for share in &config.shares {
        let dev = devices::virtio::fs::Fs::new_in(share.clone(), config.jail.as_deref())?;
        devices.attach(&vm.fd, &vm.memory, &mut mmio, Box::new(dev))?;
    }
    if let Some(balloon) = &config.balloon {
        let dev = devices::virtio::balloon::Balloon::new(balloon.clone());
        let size = dev.size();
        let transport = devices.attach(&vm.fd, &vm.memory, &mut mmio, Box::new(dev))?;
        api_balloon = Some(api::control::BalloonDevice { transport, size });
    }
    // Bound now, on the host's path; served once the vCPUs run.
    let api_listener = match &config.api_socket {
        Some(path) => Some(
            api::server::bind(path).map_err(|source| Error::ApiSocket { path: path.display().to_string(), source })?,
        ),
        None => None,
    };
    let api_socket_now = api_in_jail.take().or_else(|| config.api_socket.clone());
    let mmio = Arc::new(mmio);

    let table = arch::mptable::build(config.vcpus)?;
    vm.memory
        .write_slice(&table, GuestAddress(arch::mptable::mptable_address()))
        .map_err(|e| Error::Setup(format!("writing the MP table: {e}")))?;
    let defaults = format!("{DEFAULT_CMDLINE} {}", devices.cmdline());
    let cmdline = boot::build_cmdline(&defaults, &config.cmdline)?;
    let loaded = boot::load(&vm.memory, vm.memory_size, &config.kernel, config.initramfs.as_deref(), &cmdline)?;
    tracing::info!(
        kernel = %config.kernel.display(),
        format = ?loaded.format,
        entry = ?loaded.entry,
        initramfs = ?loaded.initramfs,
        cmdline = %cmdline.as_cstring().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default(),
        vcpus = config.vcpus,
        memory_mib = config.memory_mib,
        "kernel loaded"
    );

    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| Error::Kvm { what: "report its supported CPUID", source })?;
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        let vcpu = Vcpu::new(&vm.fd, id, pio.clone(), mmio.clone(), events.clone())?;
        vcpu.configure(&supported, tsc_deadline, config.vcpus, &vm.memory, (id == 0).then_some(loaded.entry))?;
        vcpus.push(vcpu);
    }

    // Everything reached by path before the guest runs is open now.
    if let Some(jail) = &config.jail {
        jail::enter(jail, config.jail_ids)?;
    }
    seccomp::start()?;

    extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(SIGRTMIN(), kick).map_err(|e| Error::Setup(format!("signal handler: {e}")))?;

    let control = Arc::new(RunControl::default());
    let mut threads = Vec::new();
    // No guest code runs before every thread has its seccomp filter: the
    // vCPUs (and the console input thread) wait here for the main thread,
    // which installs its own last.
    let filtered = Arc::new(Barrier::new(config.vcpus as usize + 1 + config.console_input as usize));
    for vcpu in vcpus {
        let control = control.clone();
        let filtered = filtered.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.id))
            .spawn(move || {
                seccomp::apply_or_exit(seccomp::ThreadKind::Vcpu);
                filtered.wait();
                vcpu.run(control)
            })
            .map_err(|e| Error::Setup(format!("spawning a vCPU thread: {e}")))?;
        threads.push(thread);
    }
    control.set_threads(threads.iter().map(|t| t.as_pthread_t()).collect());
    if let Some(listener) = api_listener {
        let api = api::Control {
            run: control.clone(),
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            disks: api_disks,
            nics: api_nics,
            balloon: api_balloon,
            changes: Default::default(),
        };
        api::server::spawn(listener, Arc::new(api))
            .map_err(|e| Error::Setup(format!("spawning the control socket's thread: {e}")))?;
    }
    if config.console_input {
        spawn_console_input(console.clone(), filtered.clone())?;
    }
    seccomp::apply(seccomp::ThreadKind::Main)?;
    filtered.wait();
    tracing::info!(setup_ms = started.elapsed().as_millis() as u64, "vCPUs started");
    drop(events);

    let event = event_rx.recv().unwrap_or(VmEvent::Fatal("every vCPU stopped without a reason".into()));
    stop_vcpus(&control, threads);
    devices.shutdown();
    console.flush();
    if let Some(path) = api_socket_now {
        let _ = std::fs::remove_file(path);
    }

    let exit = match (event, panic_watch.get()) {
        (VmEvent::Panic(line), _) | (VmEvent::Reset | VmEvent::TripleFault, Some(line)) => GuestExit::Panic(line),
        (VmEvent::Reset, None) => GuestExit::Shutdown,
        // With reboot=k and our i8042, a reboot never needs a triple fault:
        // one is a guest crash, not a shutdown.
        (VmEvent::TripleFault, None) => {
            GuestExit::Crashed("the guest triple-faulted (a CPU reset without a reboot request)".into())
        }
        (VmEvent::Fatal(msg), _) => GuestExit::Crashed(msg),
    };
    tracing::info!(?exit, run_ms = started.elapsed().as_millis() as u64, "guest ended");
    Ok(exit)
}

/// Copies stdin into the serial console's receive FIFO, waiting while the
/// guest has not drained it yet. Ends at end of input.
fn spawn_console_input(console: Arc<SerialConsole>, filtered: Arc<Barrier>) -> Result<(), Error> {
    use std::io::Read;
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            seccomp::apply_or_exit(seccomp::ThreadKind::ConsoleIn);
            filtered.wait();
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin().lock();
            while let Ok(n @ 1..) = stdin.read(&mut buf) {
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    rest = &rest[console.input(rest)..];
                    if !rest.is_empty() {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| Error::Setup(format!("spawning the console input thread: {e}")))
}

/// Sets `stop` and interrupts KVM_RUN on every vCPU thread until each has
/// returned. A signal can land just before a thread enters KVM_RUN, so it is
/// repeated until the thread is seen to finish.
fn stop_vcpus(control: &RunControl, threads: Vec<std::thread::JoinHandle<()>>) {
    control.stop();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut pending = threads;
    while !pending.is_empty() && Instant::now() < deadline {
        for t in &pending {
            // SAFETY: the thread handle is live (not joined), so its pthread_t is valid.
            unsafe { libc::pthread_kill(t.as_pthread_t(), SIGRTMIN()) };
        }
        std::thread::sleep(Duration::from_millis(1));
        let (done, rest): (Vec<_>, Vec<_>) = pending.into_iter().partition(|t| t.is_finished());
        for t in done {
            let _ = t.join();
        }
        pending = rest;
    }
    if !pending.is_empty() {
        tracing::warn!(count = pending.len(), "vCPU threads did not stop; leaving them to process exit");
    }
}
