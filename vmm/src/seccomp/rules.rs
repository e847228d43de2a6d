//! The allow-lists, one per kind of thread. Each system call is here
//! because something on that thread makes it (the comment says what);
//! where an argument can be pinned cheaply (ioctl request numbers, socket
//! families, prctl options, mmap protections) it is. docs/security.md has
//! the lists with their counts; `rules_are_documented` in tests.rs keeps
//! the two in step.
//!
//! To find what a list lacks: run with `--seccomp=log` and read the kernel
//! log (`audit: type=1326 ... comm="<thread>" ... syscall=N`), or with the
//! default `trap`, whose SIGSYS message names the call and the thread.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::ThreadKind;

/// Syscall number -> the rules of which one must match (none: always allowed).
pub type Rules = BTreeMap<i64, Vec<SeccompRule>>;

// KVM ioctl request numbers (linux/kvm.h).
const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;
const KVM_GET_SREGS: u64 = 0x8138_ae83;
const FIONBIO: u64 = libc::FIONBIO;
/// `File::create`'s flags: the only openat the vCPU thread makes.
const CREATE_FLAGS: u64 = (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC) as u64;

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).expect("argument index below 6")
}

fn cond32(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).expect("argument index below 6")
}

/// One rule: all of `conds` must hold.
fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conds).expect("a rule with conditions")
}

/// Allowed when argument `arg` equals one of `values`.
fn arg_in(arg: u8, values: &[u64]) -> Vec<SeccompRule> {
    values.iter().map(|&v| rule(vec![cond(arg, SeccompCmpOp::Eq, v)])).collect()
}

/// Allowed when argument `arg` (a 32-bit int) equals one of `values`.
fn arg32_in(arg: u8, values: &[u64]) -> Vec<SeccompRule> {
    values.iter().map(|&v| rule(vec![cond32(arg, SeccompCmpOp::Eq, v)])).collect()
}

/// Allowed when argument `arg` has none of the bits of `mask`.
fn arg_without(arg: u8, mask: u64) -> Vec<SeccompRule> {
    vec![rule(vec![cond(arg, SeccompCmpOp::MaskedEq(mask), 0)])]
}

fn add(r: &mut Rules, nr: i64, rules: Vec<SeccompRule>) {
    match r.get_mut(&nr) {
        // Already allowed unconditionally, or now so.
        Some(existing) if existing.is_empty() => {}
        Some(existing) if rules.is_empty() => existing.clear(),
        Some(existing) => existing.extend(rules),
        None => {
            r.insert(nr, rules);
        }
    }
}

fn allow(r: &mut Rules, nrs: &[i64]) {
    for &nr in nrs {
        add(r, nr, vec![]);
    }
}

/// What every thread needs: Rust's and glibc's runtime (allocation,
/// locks, clocks, signal return, thread exit) and the SIGSYS handler's
/// write and exit_group.
fn base() -> Rules {
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            // malloc: the main arena grows with brk; big blocks are mmapped,
            // freed with munmap, grown with mremap; free pages go with madvise.
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            // Mutexes, condition variables, channels, thread joins.
            libc::SYS_futex,
            libc::SYS_sched_yield,
            // Instant::now / SystemTime::now where the vDSO falls back (e.g.
            // a clock source without a vDSO path in a nested VM).
            libc::SYS_clock_gettime,
            // Returning from a signal handler (SIGRTMIN kicks the vCPUs).
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            // A thread's end: Rust frees its signal stack, glibc its stack's
            // pages, then exit.
            libc::SYS_sigaltstack,
            libc::SYS_exit,
            // Tracing and the SIGSYS message to stderr; eventfd signals.
            libc::SYS_write,
            // Dropping descriptors.
            libc::SYS_close,
            // Process exit, from any thread (and the SIGSYS handler).
            libc::SYS_exit_group,
            // The kernel restarting an interrupted call.
            libc::SYS_restart_syscall,
            // glibc's pthread_kill and raise (with every signal blocked, so
            // a SIGSYS there would kill the process without a word).
            libc::SYS_getpid,
            // The random keys of a thread's first HashMap (std's RandomState):
            // the vsock muxer's connection tables, made at activation.
            libc::SYS_getrandom,
        ],
    );
    // Never executable memory: no new code can be mapped in.
    add(&mut r, libc::SYS_mmap, arg_without(2, libc::PROT_EXEC as u64));
    add(&mut r, libc::SYS_mprotect, arg_without(2, libc::PROT_EXEC as u64));
    r
}

/// A device worker's loop (worker.rs): epoll over eventfds.
fn worker_base() -> Rules {
    let mut r = base();
    allow(
        &mut r,
        &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            // Devices (un)register descriptors as they go.
            libc::SYS_epoll_ctl,
            // Queue eventfds, the stop eventfd.
            libc::SYS_read,
        ],
    );
    r
}

/// The allow-list of `kind`.
pub fn rules(kind: ThreadKind) -> Rules {
    match kind {
        ThreadKind::Main => main(),
        ThreadKind::Vcpu => vcpu(),
        ThreadKind::ConsoleIn => console_in(),
        ThreadKind::Spawner => spawner(),
        ThreadKind::Block => block(),
        ThreadKind::Net => net(),
        ThreadKind::Vsock => vsock(),
        ThreadKind::Fs => worker_base(),
        ThreadKind::Balloon => balloon(),
        ThreadKind::Api => api(),
    }
}

fn main() -> Rules {
    let mut r = base();
    allow(
        &mut r,
        &[
            // stop_vcpus: sleeping between kicks.
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            // Stopping virtiofsd (Fs::drop): wait for it.
            libc::SYS_wait4,
            // Removing virtiofsd's socket and its private directory, and
            // the vsock socket, at the end.
            libc::SYS_unlink,
            libc::SYS_rmdir,
        ],
    );
    // stop_vcpus: pthread_kill(SIGRTMIN) interrupts KVM_RUN.
    add(&mut r, libc::SYS_tgkill, arg32_in(2, &[libc::SIGRTMIN() as u64]));
    // Stopping virtiofsd: Child::kill sends SIGKILL.
    add(&mut r, libc::SYS_kill, arg32_in(1, &[libc::SIGKILL as u64]));
    r
}

fn vcpu() -> Rules {
    let mut r = base();
    allow(
        &mut r,
        &[
            // A device reset (the driver writes 0 to Status, at every probe)
            // drains the device's queue eventfds.
            libc::SYS_read,
            // Console log rotation (console_log.rs): the log is renamed to
            // PATH.1 and created afresh, on the thread writing the console.
            libc::SYS_rename,
            // Device activation (the guest's driver writes DRIVER_OK):
            // queue eventfds are duplicated for the worker...
            libc::SYS_eventfd2,
            // ...its epoll is made and the device's descriptors registered...
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            // ...virtio-vsock makes its half-open timer...
            libc::SYS_timerfd_create,
            // ...virtio-fs sends the vring set-up to virtiofsd (vhost-user
            // messages carry descriptors: sendmsg/recvmsg).
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
        ],
    );
    add(&mut r, libc::SYS_ioctl, arg_in(1, &[KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS]));
    // try_clone of queue eventfds, the disk file, the tap at activation.
    add(&mut r, libc::SYS_fcntl, arg32_in(1, &[libc::F_DUPFD_CLOEXEC as u64]));
    // Console log rotation: File::create of the log, nothing else.
    add(&mut r, libc::SYS_openat, arg32_in(2, &[CREATE_FLAGS]));
    r
}

fn console_in() -> Rules {
    let mut r = base();
    allow(
        &mut r,
        &[
            // stdin.
            libc::SYS_read,
            // Waiting while the guest has not drained the FIFO.
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
        ],
    );
    r
}

fn block() -> Rules {
    let mut r = worker_base();
    allow(
        &mut r,
        &[
            // Reads and writes of the image at an offset.
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            // VIRTIO_BLK_T_FLUSH (File::sync_data).
            libc::SYS_fdatasync,
        ],
    );
    // Discard (a hole punched in the image) and write-zeroes.
    add(
        &mut r,
        libc::SYS_fallocate,
        arg32_in(
            1,
            &[
                (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64,
                (libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE) as u64,
            ],
        ),
    );
    r
}

/// The control socket's thread (api/server.rs): one connection at a time.
fn api() -> Rules {
    let mut r = base();
    allow(
        &mut r,
        &[
            // The next client (std's accept is accept4).
            libc::SYS_accept4,
            // A request and the image descriptor sent with it (SCM_RIGHTS),
            // then the rest of its line (std's read on a socket is recv).
            libc::SYS_recvmsg,
            libc::SYS_recvfrom,
            // attach-disk: the image's type and size (File::metadata).
            libc::SYS_statx,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            // pause: waiting for the vCPUs to park between kicks is a
            // futex wait (base); the kicks are below.
        ],
    );
    // The reply (std's write on a socket is send): never to an address.
    add(&mut r, libc::SYS_sendto, arg_in(4, &[0]));
    // attach-disk of a block device: its size is where its end is.
    add(&mut r, libc::SYS_lseek, arg32_in(2, &[libc::SEEK_END as u64]));
    // The client's read and write timeouts.
    add(&mut r, libc::SYS_setsockopt, arg32_in(2, &[libc::SO_RCVTIMEO as u64, libc::SO_SNDTIMEO as u64]));
    // attach-disk and attach-nic: the descriptor's access mode; the
    // received descriptor made close-on-exec; a tap made non-blocking.
    add(&mut r, libc::SYS_fcntl, arg32_in(1, &[libc::F_GETFL as u64, libc::F_SETFD as u64, libc::F_SETFL as u64]));
    // attach-nic: that the descriptor is a tap, and how it was opened.
    add(&mut r, libc::SYS_ioctl, arg_in(1, &[libc::TUNGETIFF]));
    // pause: pthread_kill(SIGRTMIN) interrupts KVM_RUN.
    add(&mut r, libc::SYS_tgkill, arg32_in(2, &[libc::SIGRTMIN() as u64]));
    r
}

fn net() -> Rules {
    // The tap is read and written (read/write) like an eventfd.
    worker_base()
}

fn vsock() -> Rules {
    let mut r = worker_base();
    allow(
        &mut r,
        &[
            // Host processes connecting to the VM's socket.
            libc::SYS_accept4,
            // Guest connections to host port P: connect to PATH_P.
            libc::SYS_connect,
            // Reading a host connection (std's UnixStream::read is recv).
            libc::SYS_recvfrom,
            // Closing one direction of a connection (guest SHUTDOWN).
            libc::SYS_shutdown,
            // Arming the half-open timeout timer (made at activation).
            libc::SYS_timerfd_settime,
        ],
    );
    // Guest connections to the host: Unix sockets only.
    add(&mut r, libc::SYS_socket, arg32_in(0, &[libc::AF_UNIX as u64]));
    // Writing to a host connection (std's UnixStream::write is send with
    // MSG_NOSIGNAL): on a connected socket, never to an address.
    add(&mut r, libc::SYS_sendto, arg_in(4, &[0]));
    // set_nonblocking on accepted connections.
    add(&mut r, libc::SYS_ioctl, arg_in(1, &[FIONBIO]));
    r
}

fn balloon() -> Rules {
    let mut r = worker_base();
    // Pages the guest frees go back to the host: a hole punched in the
    // memfd behind guest RAM (madvise, in base, where RAM is anonymous).
    add(&mut r, libc::SYS_fallocate, arg32_in(1, &[(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64]));
    r
}

/// Every worker's list, plus creating a thread (and what the new thread
/// does before it installs its own filter): a worker's effective filter is
/// the spawner's and its own.
fn spawner() -> Rules {
    let mut r = base();
    for kind in ThreadKind::WORKERS {
        for (nr, rules) in rules(kind) {
            add(&mut r, nr, rules);
        }
    }
    allow(
        &mut r,
        &[
            // pthread_create.
            libc::SYS_clone3,
            libc::SYS_clone,
            // A new thread: glibc registers rseq and its robust futex list,
            // Rust's thread start asks for its stack bounds
            // (pthread_getattr_np reads the affinity).
            libc::SYS_rseq,
            libc::SYS_set_robust_list,
            libc::SYS_sched_getaffinity,
            libc::SYS_gettid,
        ],
    );
    // The thread's name; the worker installing its filter.
    add(&mut r, libc::SYS_prctl, arg32_in(0, &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64]));
    add(&mut r, libc::SYS_seccomp, arg32_in(0, &[libc::SECCOMP_SET_MODE_FILTER as u64]));
    r
}

/// Names of common x86_64 system calls, for the SIGSYS message.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    NAMES.iter().find(|(n, _)| *n == nr).map(|(_, name)| *name)
}

const NAMES: &[(i64, &str)] = &[
    (libc::SYS_read, "read"),
    (libc::SYS_write, "write"),
    (libc::SYS_open, "open"),
    (libc::SYS_close, "close"),
    (libc::SYS_stat, "stat"),
    (libc::SYS_fstat, "fstat"),
    (libc::SYS_lstat, "lstat"),
    (libc::SYS_poll, "poll"),
    (libc::SYS_lseek, "lseek"),
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_brk, "brk"),
    (libc::SYS_rt_sigaction, "rt_sigaction"),
    (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
    (libc::SYS_rt_sigreturn, "rt_sigreturn"),
    (libc::SYS_ioctl, "ioctl"),
    (libc::SYS_pread64, "pread64"),
    (libc::SYS_pwrite64, "pwrite64"),
    (libc::SYS_readv, "readv"),
    (libc::SYS_writev, "writev"),
    (libc::SYS_access, "access"),
    (libc::SYS_pipe, "pipe"),
    (libc::SYS_sched_yield, "sched_yield"),
    (libc::SYS_mremap, "mremap"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_dup, "dup"),
    (libc::SYS_dup2, "dup2"),
    (libc::SYS_nanosleep, "nanosleep"),
    (libc::SYS_getpid, "getpid"),
    (libc::SYS_socket, "socket"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_accept, "accept"),
    (libc::SYS_sendto, "sendto"),
    (libc::SYS_recvfrom, "recvfrom"),
    (libc::SYS_sendmsg, "sendmsg"),
    (libc::SYS_recvmsg, "recvmsg"),
    (libc::SYS_shutdown, "shutdown"),
    (libc::SYS_bind, "bind"),
    (libc::SYS_listen, "listen"),
    (libc::SYS_getsockopt, "getsockopt"),
    (libc::SYS_setsockopt, "setsockopt"),
    (libc::SYS_clone, "clone"),
    (libc::SYS_fork, "fork"),
    (libc::SYS_vfork, "vfork"),
    (libc::SYS_execve, "execve"),
    (libc::SYS_exit, "exit"),
    (libc::SYS_wait4, "wait4"),
    (libc::SYS_kill, "kill"),
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_fsync, "fsync"),
    (libc::SYS_fdatasync, "fdatasync"),
    (libc::SYS_ftruncate, "ftruncate"),
    (libc::SYS_getcwd, "getcwd"),
    (libc::SYS_rename, "rename"),
    (libc::SYS_mkdir, "mkdir"),
    (libc::SYS_rmdir, "rmdir"),
    (libc::SYS_unlink, "unlink"),
    (libc::SYS_readlink, "readlink"),
    (libc::SYS_chmod, "chmod"),
    (libc::SYS_getuid, "getuid"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_sigaltstack, "sigaltstack"),
    (libc::SYS_prctl, "prctl"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_umount2, "umount2"),
    (libc::SYS_gettid, "gettid"),
    (libc::SYS_futex, "futex"),
    (libc::SYS_sched_getaffinity, "sched_getaffinity"),
    (libc::SYS_getdents64, "getdents64"),
    (libc::SYS_set_tid_address, "set_tid_address"),
    (libc::SYS_restart_syscall, "restart_syscall"),
    (libc::SYS_clock_gettime, "clock_gettime"),
    (libc::SYS_clock_nanosleep, "clock_nanosleep"),
    (libc::SYS_exit_group, "exit_group"),
    (libc::SYS_epoll_wait, "epoll_wait"),
    (libc::SYS_epoll_ctl, "epoll_ctl"),
    (libc::SYS_tgkill, "tgkill"),
    (libc::SYS_openat, "openat"),
    (libc::SYS_mkdirat, "mkdirat"),
    (libc::SYS_newfstatat, "newfstatat"),
    (libc::SYS_unlinkat, "unlinkat"),
    (libc::SYS_renameat, "renameat"),
    (libc::SYS_set_robust_list, "set_robust_list"),
    (libc::SYS_epoll_pwait, "epoll_pwait"),
    (libc::SYS_timerfd_create, "timerfd_create"),
    (libc::SYS_fallocate, "fallocate"),
    (libc::SYS_timerfd_settime, "timerfd_settime"),
    (libc::SYS_accept4, "accept4"),
    (libc::SYS_eventfd2, "eventfd2"),
    (libc::SYS_epoll_create1, "epoll_create1"),
    (libc::SYS_dup3, "dup3"),
    (libc::SYS_pipe2, "pipe2"),
    (libc::SYS_prlimit64, "prlimit64"),
    (libc::SYS_getrandom, "getrandom"),
    (libc::SYS_memfd_create, "memfd_create"),
    (libc::SYS_statx, "statx"),
    (libc::SYS_rseq, "rseq"),
    (libc::SYS_clone3, "clone3"),
    (libc::SYS_seccomp, "seccomp"),
    (libc::SYS_pidfd_open, "pidfd_open"),
    (libc::SYS_renameat2, "renameat2"),
];
