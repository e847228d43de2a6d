//! Seccomp-BPF filters for the VMM's threads (after Firecracker's design):
//! each kind of thread gets an allow-list of the system calls it makes
//! ([`rules`]), installed at the start of the thread, after the set-up that
//! needs more (opening KVM, files and sockets, starting virtiofsd) and before
//! any guest code runs. A guest that breaks out of a device model into the
//! VMM's code is then held to that thread's few system calls: no `execve`,
//! no new files or network sockets, no `mount`, no `ptrace`.
//!
//! The `--seccomp` option picks what a forbidden system call does
//! ([`Mode`]): `trap` (the default) raises SIGSYS, whose handler names the
//! call and the thread on stderr and ends the VMM with status
//! [`EXIT_SECCOMP`]; `kill` kills the process at once
//! (SECCOMP_RET_KILL_PROCESS); `log` lets it through and has the kernel log
//! it (SECCOMP_RET_LOG, in the kernel log as `audit: type=1326 ...
//! comm="<thread>" ... syscall=N`); `off` installs nothing.
//!
//! Seccomp filters are inherited by threads created after them, and a
//! thread's filters stack (the strictest verdict wins). Device workers are
//! created when the guest's driver starts a device, which happens on a vCPU
//! thread; if the vCPU thread spawned them, each worker would be held to
//! the vCPU's list as well as its own. So workers are spawned by a thread
//! of their own, the spawner ([`spawn_thread`]), whose list is the union of
//! the workers' lists plus what creating a thread takes; the vCPU threads
//! only hand it the work.
//!
//! Filters are only installed in a process that called [`prepare`] (the
//! `hearth-vmm` binary): unit tests and fuzz targets that run device code
//! are unaffected.

pub mod rules;
#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Exit status of `hearth-vmm` when a thread made a system call its seccomp
/// filter forbids (in `trap` mode).
pub const EXIT_SECCOMP: i32 = 5;

/// What a system call outside a thread's allow-list does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// SIGSYS: the handler names the call and exits with [`EXIT_SECCOMP`].
    Trap,
    /// The kernel kills the whole process (SECCOMP_RET_KILL_PROCESS).
    Kill,
    /// Allowed, and logged by the kernel (SECCOMP_RET_LOG): for finding
    /// what an allow-list lacks.
    Log,
    /// No filter at all.
    Off,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, String> {
        match s {
            "trap" => Ok(Mode::Trap),
            "kill" => Ok(Mode::Kill),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(format!("{s:?} is not a seccomp mode: use trap, kill, log or off")),
        }
    }

    fn action(self) -> SeccompAction {
        match self {
            Mode::Trap => SeccompAction::Trap,
            Mode::Kill => SeccompAction::KillProcess,
            Mode::Log | Mode::Off => SeccompAction::Log,
        }
    }
}

/// The kinds of thread of the VMM, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread: set-up, then waits for the VM to end and tears it down.
    Main = 1,
    /// A vCPU: KVM_RUN and the port and MMIO exits (serial console, i8042,
    /// virtio-mmio registers, device activation).
    Vcpu,
    /// Copies stdin into the serial console.
    ConsoleIn,
    /// Creates the device workers.
    Spawner,
    Block,
    Net,
    Vsock,
    Fs,
    Balloon,
    /// Serves the control socket (`--api-socket`).
    Api,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 10] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::ConsoleIn,
        ThreadKind::Spawner,
        ThreadKind::Block,
        ThreadKind::Net,
        ThreadKind::Vsock,
        ThreadKind::Fs,
        ThreadKind::Balloon,
        ThreadKind::Api,
    ];

    /// The device workers, whose lists the spawner's includes.
    pub const WORKERS: [ThreadKind; 5] =
        [ThreadKind::Block, ThreadKind::Net, ThreadKind::Vsock, ThreadKind::Fs, ThreadKind::Balloon];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::ConsoleIn => "console-in",
            ThreadKind::Spawner => "spawner",
            ThreadKind::Block => "virtio-blk",
            ThreadKind::Net => "virtio-net",
            ThreadKind::Vsock => "virtio-vsock",
            ThreadKind::Fs => "virtio-fs",
            ThreadKind::Balloon => "virtio-balloon",
            ThreadKind::Api => "api",
        }
    }

    /// The worker kind of a device worker's thread name (`worker::spawn`).
    pub fn of_worker(name: &str) -> Option<ThreadKind> {
        ThreadKind::WORKERS.into_iter().find(|k| k.name() == name)
    }

    fn from_index(i: u8) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| *k as u8 == i)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building the seccomp filter of the {kind} threads: {source}")]
    Build { kind: &'static str, source: seccompiler::BackendError },
    #[error("installing the seccomp filter of a {kind} thread: {source}")]
    Install { kind: &'static str, source: seccompiler::Error },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("starting the thread spawner: {0}")]
    Spawner(std::io::Error),
}

/// The seccomp state of this process, once [`prepare`] ran.
struct Filters {
    mode: Mode,
    programs: BTreeMap<ThreadKind, BpfProgram>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

type Job = (String, Box<dyn FnOnce() + Send>, Sender<std::io::Result<JoinHandle<()>>>);
static SPAWNER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

thread_local! {
    /// This thread's kind, for the SIGSYS handler's message (0: none yet).
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// Compiles one kind's filter for `mode` (anything but `Off`).
pub fn compile(kind: ThreadKind, mode: Mode) -> Result<BpfProgram, Error> {
    let build = |source| Error::Build { kind: kind.name(), source };
    let filter =
        SeccompFilter::new(rules::rules(kind).into_iter().collect(), mode.action(), SeccompAction::Allow, arch())
            .map_err(build)?;
    filter.try_into().map_err(build)
}

fn arch() -> TargetArch {
    #[cfg(target_arch = "x86_64")]
    return TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    return TargetArch::aarch64;
}

/// Sets this process up for seccomp in `mode`: compiles every filter, makes
/// glibc's allocator stay within them and installs the SIGSYS handler
/// (`trap`), but starts no thread, so that the process can still be jailed
/// ([`crate::jail`] needs it single-threaded); [`start`] then starts the
/// thread spawner. Call once, from the main thread, before any other thread
/// exists; threads then call [`apply`]. With `off`, warns loudly and does
/// nothing else.
pub fn prepare(mode: Mode) -> Result<(), Error> {
    if mode == Mode::Off {
        tracing::warn!(
            "--seccomp=off: the VMM runs WITHOUT seccomp filters; a guest that escapes into the VMM \
             can make any system call. Use this only to debug, never in production."
        );
        return Ok(());
    }
    let mut programs = BTreeMap::new();
    for kind in ThreadKind::ALL {
        programs.insert(kind, compile(kind, mode)?);
    }
    prepare_allocator();
    if mode == Mode::Trap {
        install_sigsys_handler().map_err(Error::Handler)?;
    }
    let _ = FILTERS.set(Filters { mode, programs }); // or prepared already
    Ok(())
}

/// Starts the spawner thread, if filters were prepared and it is not running.
pub fn start() -> Result<(), Error> {
    if FILTERS.get().is_none() || SPAWNER.get().is_some() {
        return Ok(());
    }
    start_spawner()
}

/// Keeps glibc's malloc from system calls outside the filters: with one
/// arena, every thread allocates from the main (brk) arena, which never
/// reads /proc/sys/vm/overcommit_memory (glibc does, lazily, the first time
/// it shrinks a thread arena's heap) nor counts CPUs to size its arenas.
fn prepare_allocator() {
    // SAFETY: mallopt only sets a malloc parameter; no other thread exists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The mode [`prepare`] set up, if any (`None` without it or with `off`).
pub fn mode() -> Option<Mode> {
    FILTERS.get().map(|f| f.mode)
}

/// Installs `kind`'s filter on the calling thread, if [`prepare`] set filters
/// up (otherwise does nothing). Irreversible.
pub fn apply(kind: ThreadKind) -> Result<(), Error> {
    let Some(filters) = FILTERS.get() else { return Ok(()) };
    KIND.with(|k| k.set(kind as u8));
    let program = &filters.programs[&kind];
    seccompiler::apply_filter(program).map_err(|source| Error::Install { kind: kind.name(), source })
}

/// [`apply`], and on failure, ends the process: a thread must not run
/// guest-facing code unfiltered when filters were asked for.
pub fn apply_or_exit(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        eprintln!("hearth-vmm: error: {e}");
        // SAFETY: _exit ends the process; nothing of ours is left half-done
        // that a normal exit would finish.
        unsafe { libc::_exit(EXIT_SECCOMP) };
    }
}

/// Spawns a thread named `name` running `f`: through the spawner thread when
/// filters are installed (so the new thread is not held to the caller's
/// filter), directly otherwise.
pub fn spawn_thread(name: String, f: Box<dyn FnOnce() + Send>) -> std::io::Result<JoinHandle<()>> {
    let Some(spawner) = SPAWNER.get() else {
        return std::thread::Builder::new().name(name).spawn(f);
    };
    let (reply, answer) = channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((name, f, reply))
        .map_err(|_| std::io::Error::other("the thread spawner is gone"))?;
    answer.recv().map_err(|_| std::io::Error::other("the thread spawner is gone"))?
}

fn start_spawner() -> Result<(), Error> {
    let (jobs, queue) = channel::<Job>();
    let (ready, started) = channel();
    std::thread::Builder::new()
        .name("spawner".into())
        .spawn(move || {
            let applied = apply(ThreadKind::Spawner);
            let ok = applied.is_ok();
            let _ = ready.send(applied);
            if !ok {
                return;
            }
            for (name, f, reply) in queue {
                let _ = reply.send(std::thread::Builder::new().name(name).spawn(f));
            }
        })
        .map_err(Error::Spawner)?;
    started.recv().map_err(|_| Error::Spawner(std::io::Error::other("the spawner thread died")))??;
    let _ = SPAWNER.set(Mutex::new(jobs));
    Ok(())
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe
    // (see sigsys_handler) and stays installed for the life of the process.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = sigsys_handler as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The SIGSYS handler of `trap` mode. Async-signal-safe: it formats into a
/// buffer on its stack and makes only write(2) and exit_group(2), which
/// every filter allows. It reads nothing the syscall pointed to (an
/// openat's path could be anything, or nothing mapped).
extern "C" fn sigsys_handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // siginfo_t for SIGSYS (SYS_SECCOMP): si_call_addr at 16, si_syscall
    // (int) at 24, si_arch at 28.
    // SAFETY: the kernel passes a valid siginfo_t with SA_SIGINFO.
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() };
    let kind = KIND.with(|k| k.get());
    let mut msg = Msg::default();
    msg.push(b"hearth-vmm: seccomp: the ");
    msg.push(ThreadKind::from_index(kind).map_or("unfiltered", |k| k.name()).as_bytes());
    msg.push(b" thread made the system call ");
    msg.push_num(nr as i64);
    msg.push(b" (");
    msg.push(rules::syscall_name(nr as i64).unwrap_or("unknown").as_bytes());
    msg.push(
        b"), which its seccomp filter forbids; the VMM stops. To see every such call, \
run with --seccomp=log and read the kernel log (audit type=1326), then add the call to \
vmm/src/seccomp/rules.rs with the reason it is needed.\n",
    );
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(2, msg.buf.as_ptr().cast(), msg.len);
        libc::_exit(EXIT_SECCOMP);
    }
}

/// A fixed buffer to format the handler's message without allocating.
struct Msg {
    buf: [u8; 512],
    len: usize,
}

impl Default for Msg {
    fn default() -> Msg {
        Msg { buf: [0; 512], len: 0 }
    }
}

impl Msg {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_num(&mut self, mut v: i64) {
        if v < 0 {
            self.push(b"-");
            v = -v;
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}
