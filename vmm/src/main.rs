//! `hearth-vmm`: boot a kernel and initramfs in a KVM VM from the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use hearth_vmm::config::{
    BalloonConfig, Console, DiskConfig, FsConfig, NetConfig, VmConfig, VsockConfig, DEFAULT_CMDLINE,
    DEFAULT_MEMORY_MIB, DEFAULT_VCPUS,
};
use hearth_vmm::seccomp::Mode;
use hearth_vmm::{GuestExit, EXIT_VMM_ERROR};

/// Boot a Linux kernel in a KVM virtual machine, with the serial console on
/// stdin/stdout (or output to a file). The VM ends when the guest reboots.
///
/// Exit status: 0 the guest shut down, 1 the VMM failed (the message says
/// why and what to do), 2 bad arguments, 3 the guest kernel panicked,
/// 4 the guest crashed its vCPU, 5 a VMM thread made a system call its
/// seccomp filter forbids (`--seccomp=trap`).
#[derive(Parser, Debug)]
#[command(name = "hearth-vmm", version)]
struct Args {
    /// Kernel image: an ELF vmlinux (booted through PVH) or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs (a cpio archive, optionally compressed).
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Extra kernel command line, appended to the defaults so it can override them.
    #[arg(long, default_value = "", long_help = format!(
        "Extra kernel command line, appended after the defaults ({DEFAULT_CMDLINE}) \
         so any of them can be overridden, e.g. `loglevel=8` for a verbose boot."))]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = DEFAULT_VCPUS)]
    cpus: u8,
    /// Where the serial console goes: `stdout`, `off`, or a file path.
    #[arg(long, default_value = "stdout")]
    console: String,
    /// With `--console FILE`: the size in KiB at which the log is moved to
    /// `FILE.1` and restarted (the guest can print forever; at most twice
    /// this is kept).
    #[arg(long, value_name = "KIB", default_value_t = hearth_vmm::devices::legacy::console_log::MAX_BYTES >> 10,
          value_parser = clap::value_parser!(u64).range(4..))]
    console_max_kib: u64,
    /// A virtio-blk disk backed by a raw image: `PATH[,ro]`. Repeat for more
    /// disks; they appear in the guest as /dev/vda, /dev/vdb, ... in order.
    #[arg(long = "disk", value_parser = DiskConfig::parse)]
    disks: Vec<DiskConfig>,
    /// Empty virtio-blk devices after the `--disk` disks, to which the
    /// control socket attaches disk images while the VM runs (and from
    /// which it detaches them). Needs `--api-socket`.
    #[arg(long, value_name = "N", default_value_t = 0, requires = "api_socket",
          value_parser = clap::value_parser!(u8).range(0..=16))]
    disk_slots: u8,
    /// The control socket: a Unix socket through which the host attaches
    /// and detaches disks, sets the balloon's target, pauses and resumes
    /// the VM and reads its state and per-disk counters (docs/vmm.md).
    /// With `--jail` it must lie directly inside the jail.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// A virtio-net device over a host tap: `tap=NAME[,mac=AA:BB:CC:DD:EE:FF]`.
    /// An existing tap is attached to; otherwise one is created (which needs
    /// CAP_NET_ADMIN). The MAC defaults to 52:54:00:xx:xx:xx derived from the
    /// tap's name. Repeat for more devices: eth0, eth1, ... in order.
    #[arg(long = "net", value_parser = NetConfig::parse)]
    nets: Vec<NetConfig>,
    /// virtio-net devices after the `--net` ones, with no tap and their link
    /// down, to which the control socket attaches taps while the VM runs
    /// (and from which it detaches them). Their MACs are 02:68:65:00:00:NN,
    /// NN the slot. Needs `--api-socket`.
    #[arg(long, value_name = "N", default_value_t = 0, requires = "api_socket",
          value_parser = clap::value_parser!(u8).range(0..=16))]
    nic_slots: u8,
    /// A virtio-vsock device: `cid=N,socket=PATH`. Host processes connect to
    /// PATH and send `CONNECT <port>\n`; guest connections to host port P go
    /// to the Unix socket `PATH_P`.
    #[arg(long, value_parser = VsockConfig::parse)]
    vsock: Option<VsockConfig>,
    /// A virtio-fs share served by virtiofsd: `tag=TAG,dir=DIR[,cache=MODE]`
    /// starts virtiofsd on DIR, `tag=TAG,socket=PATH` uses a running one.
    /// In the guest: `mount -t virtiofs TAG /mnt`. Repeatable.
    #[arg(long = "fs", value_parser = FsConfig::parse)]
    shares: Vec<FsConfig>,
    /// A virtio-balloon device: `--balloon` or `--balloon reporting=on|off`.
    /// With free page reporting (on by default) the guest kernel reports the
    /// memory it frees, and the VMM gives it back to the host.
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "", value_parser = BalloonConfig::parse)]
    balloon: Option<BalloonConfig>,
    /// What a system call outside a VMM thread's seccomp allow-list does:
    /// `trap` (SIGSYS: the call is named on stderr and the VMM exits with
    /// status 5), `kill` (the kernel kills the VMM), `log` (allowed, and
    /// logged by the kernel: for debugging a filter), `off` (no filters).
    #[arg(long, value_name = "MODE", default_value = "trap", value_parser = Mode::parse)]
    seccomp: Mode,
    /// After set-up, move into new mount, network, IPC and UTS namespaces
    /// whose root is DIR, and drop every capability (needs root). The vsock
    /// socket and a console log file must be directly inside DIR: they are
    /// all the VMM reaches by path once the guest runs. The shim always
    /// jails the VMM; without this option it keeps the host's view.
    #[arg(long, value_name = "DIR")]
    jail: Option<PathBuf>,
    /// With `--jail`: become this unprivileged user once jailed (as
    /// Firecracker's jailer's `--uid`). The jail directory must be owned by
    /// it: the console log is rotated there and its sockets are reached.
    #[arg(long, value_name = "UID", requires_all = ["jail", "gid"])]
    uid: Option<u32>,
    /// With `--jail`: become this group once jailed (no supplementary groups).
    #[arg(long, value_name = "GID", requires_all = ["jail", "uid"])]
    gid: Option<u32>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    if let Err(e) = hearth_vmm::seccomp::prepare(args.seccomp) {
        eprintln!("hearth-vmm: error: {e}");
        return ExitCode::from(EXIT_VMM_ERROR as u8);
    }
    let console_input = args.console == "stdout";
    let config = VmConfig {
        kernel: args.kernel,
        initramfs: args.initramfs,
        cmdline: args.cmdline,
        memory_mib: args.memory,
        vcpus: args.cpus,
        console: match args.console.as_str() {
            "stdout" => Console::Stdout,
            "off" => Console::Off,
            path => Console::File(path.into()),
        },
        console_input,
        console_max_bytes: args.console_max_kib << 10,
        disks: args.disks,
        disk_slots: args.disk_slots,
        api_socket: args.api_socket,
        nets: args.nets,
        nic_slots: args.nic_slots,
        vsock: args.vsock,
        shares: args.shares,
        balloon: args.balloon,
        jail: args.jail,
        jail_ids: args.uid.zip(args.gid).map(|(uid, gid)| hearth_vmm::jail::Ids { uid, gid }),
    };
    match hearth_vmm::run(&config) {
        Ok(exit) => {
            match &exit {
                GuestExit::Shutdown => {}
                GuestExit::Panic(line) => {
                    eprintln!("hearth-vmm: the guest kernel panicked: {line}")
                }
                GuestExit::Crashed(msg) => eprintln!("hearth-vmm: the guest crashed: {msg}"),
            }
            ExitCode::from(exit.code() as u8)
        }
        Err(e) => {
            eprintln!("hearth-vmm: error: {e}");
            ExitCode::from(EXIT_VMM_ERROR as u8)
        }
    }
}
