//! Filters are irreversible, and `kill` kills the whole process, so every
//! test that installs one does so in a forked child; the test process only
//! compiles the filters and reads the child's fate (exit status or signal,
//! and what it wrote on stderr). The child makes only raw system calls:
//! it was forked from a multi-threaded process and must not take locks.

use std::io::Read;
use std::os::fd::FromRawFd;

use super::*;

/// How a child ended.
#[derive(Debug, PartialEq, Eq)]
enum Fate {
    Exited(i32),
    Signaled(i32),
}

/// Runs `body` in a forked child with `kind`'s filter in `mode` (and the
/// SIGSYS handler for `trap`); the child exits with `body`'s value. Returns
/// how it ended and its stderr.
fn in_child(kind: ThreadKind, mode: Mode, body: impl FnOnce() -> i32) -> (Fate, String) {
    let program = compile(kind, mode).unwrap();
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: the child makes only async-signal-safe calls (raw system
    // calls, no allocation, no locks) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        unsafe {
            libc::dup2(fds[1], 2);
            if mode == Mode::Trap && install_sigsys_handler().is_err() {
                libc::_exit(100);
            }
            KIND.with(|k| k.set(kind as u8));
            if seccompiler::apply_filter(&program).is_err() {
                libc::_exit(101);
            }
            libc::_exit(body());
        }
    }
    // SAFETY: the write end is ours; closing it lets the read below end.
    unsafe { libc::close(fds[1]) };
    let mut stderr = String::new();
    // SAFETY: the read end is ours alone.
    unsafe { std::fs::File::from_raw_fd(fds[0]) }.read_to_string(&mut stderr).unwrap();
    let mut status = 0;
    // SAFETY: pid is our child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let fate = if libc::WIFEXITED(status) {
        Fate::Exited(libc::WEXITSTATUS(status))
    } else {
        Fate::Signaled(libc::WTERMSIG(status))
    };
    (fate, stderr)
}

/// socket(AF_INET): no thread may open a network socket.
fn inet_socket() -> i32 {
    // SAFETY: a plain system call; the descriptor is left to process exit.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        0
    } else {
        7
    }
}

/// getpid: allowed everywhere (glibc's pthread_kill makes it).
fn getpid_ok() -> bool {
    // SAFETY: a plain system call.
    unsafe { libc::syscall(libc::SYS_getpid) > 0 }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

#[test]
fn every_filter_compiles_in_every_mode_and_fits() {
    for kind in ThreadKind::ALL {
        for mode in [Mode::Trap, Mode::Kill, Mode::Log] {
            let p = compile(kind, mode).unwrap();
            // The kernel's limit is 4096 instructions (BPF_MAXINSNS).
            assert!(p.len() < 4096, "{kind:?}: {} instructions", p.len());
        }
    }
}

#[test]
fn modes_parse() {
    assert_eq!(Mode::parse("trap"), Ok(Mode::Trap));
    assert_eq!(Mode::parse("kill"), Ok(Mode::Kill));
    assert_eq!(Mode::parse("log"), Ok(Mode::Log));
    assert_eq!(Mode::parse("off"), Ok(Mode::Off));
    assert!(Mode::parse("on").unwrap_err().contains("trap, kill, log or off"));
}

#[test]
fn trap_names_the_call_and_the_thread_and_exits_5() {
    for kind in ThreadKind::ALL {
        let (fate, stderr) = in_child(kind, Mode::Trap, || if getpid_ok() { inet_socket() } else { 9 });
        assert_eq!(fate, Fate::Exited(EXIT_SECCOMP), "{kind:?}: {stderr}");
        assert!(
            stderr.contains(&format!("the {} thread made the system call 41 (socket)", kind.name())),
            "{kind:?}: {stderr}"
        );
        assert!(stderr.contains("--seccomp=log"), "{stderr}");
    }
}

#[test]
fn kill_kills_the_process_with_sigsys() {
    for kind in ThreadKind::ALL {
        let (fate, _) = in_child(kind, Mode::Kill, || if getpid_ok() { inet_socket() } else { 9 });
        assert_eq!(fate, Fate::Signaled(libc::SIGSYS), "{kind:?}");
    }
}

#[test]
fn log_lets_the_call_through() {
    for kind in ThreadKind::ALL {
        let (fate, stderr) = in_child(kind, Mode::Log, inet_socket);
        assert_eq!(fate, Fate::Exited(0), "{kind:?}: {stderr}");
    }
}

#[test]
fn execve_and_mount_are_refused_everywhere() {
    for kind in ThreadKind::ALL {
        let (fate, stderr) = in_child(kind, Mode::Trap, || {
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            // SAFETY: valid NUL-terminated strings and arrays.
            unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), std::ptr::null()) };
            9
        });
        assert_eq!(fate, Fate::Exited(EXIT_SECCOMP), "{kind:?}: {stderr}");
        assert!(stderr.contains("(execve)"), "{stderr}");
        let (fate, stderr) = in_child(kind, Mode::Trap, || {
            // SAFETY: a plain system call (refused before it is looked at).
            unsafe { libc::mount(c"none".as_ptr(), c"/mnt".as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null()) };
            9
        });
        assert_eq!(fate, Fate::Exited(EXIT_SECCOMP), "{kind:?}: {stderr}");
        assert!(stderr.contains("(mount)"), "{stderr}");
    }
}

#[test]
fn no_thread_may_map_executable_memory() {
    for kind in ThreadKind::ALL {
        let (fate, stderr) = in_child(kind, Mode::Trap, || {
            // SAFETY: an anonymous mapping, never used.
            let p = unsafe {
                libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
            };
            if p == libc::MAP_FAILED {
                return 8;
            }
            // SAFETY: p is our own mapping.
            unsafe { libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_EXEC) };
            9
        });
        assert_eq!(fate, Fate::Exited(EXIT_SECCOMP), "{kind:?}: {stderr}");
        assert!(stderr.contains("(mprotect)"), "{stderr}");
    }
}

#[test]
fn vcpu_ioctls_are_kvm_run_and_register_reads_only() {
    // KVM_RUN on a bad descriptor: allowed, so EBADF.
    let (fate, stderr) = in_child(ThreadKind::Vcpu, Mode::Trap, || {
        // SAFETY: ioctl on a descriptor that does not exist.
        let rc = unsafe { libc::ioctl(-1, 0xae80, 0) };
        if rc == -1 && errno() == libc::EBADF {
            0
        } else {
            9
        }
    });
    assert_eq!(fate, Fate::Exited(0), "{stderr}");
    // Any other ioctl (here KVM_CREATE_VCPU): refused.
    let (fate, stderr) = in_child(ThreadKind::Vcpu, Mode::Trap, || {
        // SAFETY: as above.
        unsafe { libc::ioctl(-1, 0xae41, 0) };
        9
    });
    assert_eq!(fate, Fate::Exited(EXIT_SECCOMP), "{stderr}");
    assert!(stderr.contains("(ioctl)"), "{stderr}");
}

#[test]
fn vcpu_may_only_create_files_not_open_them() {
    // File::create's flags (console log rotation): allowed (ENOENT here).
    let (fate, stderr) = in_child(ThreadKind::Vcpu, Mode::Trap, || {
        // SAFETY: NUL-terminated path.
        let fd =
            unsafe { libc::openat(libc::AT_FDCWD, c"/nonexistent/dir/log".as_ptr(), CREATE_FLAGS_FOR_TEST, 0o666) };
        if fd == -1 && errno() == libc::ENOENT {
            0
        } else {
            9
        }
    });
    assert_eq!(fate, Fate::Exited(0), "{stderr}");
    let (fate, stderr) = in_child(ThreadKind::Vcpu, Mode::Trap, || {
        // SAFETY: as above.
        unsafe { libc::openat(libc::AT_FDCWD, c"/etc/shadow".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        9
    });
    assert_eq!(fate, Fate::Exited(EXIT_SECCOMP), "{stderr}");
    assert!(stderr.contains("(openat)"), "{stderr}");
}

const CREATE_FLAGS_FOR_TEST: i32 = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC;

#[test]
fn vsock_may_open_unix_sockets_only() {
    let (fate, stderr) = in_child(ThreadKind::Vsock, Mode::Trap, || {
        // SAFETY: a plain system call.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd >= 0 {
            inet_socket()
        } else {
            9
        }
    });
    assert_eq!(fate, Fate::Exited(EXIT_SECCOMP), "{stderr}");
    assert!(stderr.contains("virtio-vsock thread made the system call 41 (socket)"), "{stderr}");
}

#[test]
fn only_the_spawner_creates_threads() {
    for kind in ThreadKind::ALL {
        let allowed = rules::rules(kind).contains_key(&libc::SYS_clone3);
        assert_eq!(allowed, kind == ThreadKind::Spawner, "{kind:?}");
    }
}

#[test]
fn the_spawner_allows_whatever_a_worker_does() {
    // A worker's filter stacks on the spawner's: a call the spawner's list
    // lacks would be refused to the worker whatever its own list says.
    let spawner = rules::rules(ThreadKind::Spawner);
    for kind in ThreadKind::WORKERS {
        for (nr, rules) in rules::rules(kind) {
            let theirs = spawner.get(&nr).unwrap_or_else(|| panic!("{kind:?}: syscall {nr}"));
            assert!(theirs.is_empty() || theirs.len() >= rules.len(), "{kind:?}: syscall {nr}");
            if theirs.is_empty() {
                continue;
            }
            assert!(!rules.is_empty(), "{kind:?}: syscall {nr} is restricted in the spawner");
        }
    }
}

#[test]
fn every_allowed_call_has_a_name() {
    for kind in ThreadKind::ALL {
        for nr in rules::rules(kind).keys() {
            assert!(rules::syscall_name(*nr).is_some(), "{kind:?}: syscall {nr} has no name in rules::NAMES");
        }
    }
}

#[test]
fn worker_kinds_follow_the_devices_thread_names() {
    for (name, kind) in [
        ("virtio-blk", ThreadKind::Block),
        ("virtio-net", ThreadKind::Net),
        ("virtio-vsock", ThreadKind::Vsock),
        ("virtio-fs", ThreadKind::Fs),
        ("virtio-balloon", ThreadKind::Balloon),
    ] {
        assert_eq!(ThreadKind::of_worker(name), Some(kind));
    }
    assert_eq!(ThreadKind::of_worker("vcpu0"), None);
}

/// docs/security.md gives each list's size; it must match the code.
#[test]
fn rules_are_documented() {
    let doc = include_str!("../../../docs/security.md");
    for kind in ThreadKind::ALL {
        let n = rules::rules(kind).len();
        let line = format!("`{}` ({n} system calls)", kind.name());
        assert!(doc.contains(&line), "docs/security.md lacks {line:?}");
        for nr in rules::rules(kind).keys() {
            let name = rules::syscall_name(*nr).unwrap();
            assert!(doc.contains(name), "docs/security.md does not mention {name}");
        }
    }
}

/// Prints the lists in docs/security.md's form:
/// `cargo test -p hearth-vmm print_allow_lists -- --ignored --nocapture`.
#[test]
#[ignore]
fn print_allow_lists() {
    for kind in ThreadKind::ALL {
        let r = rules::rules(kind);
        let mut names: Vec<String> = r
            .iter()
            .map(|(nr, rules)| {
                let name = rules::syscall_name(*nr).unwrap_or("?");
                if rules.is_empty() {
                    format!("`{name}`")
                } else {
                    format!("`{name}`*")
                }
            })
            .collect();
        names.sort();
        println!("- `{}` ({} system calls): {}", kind.name(), r.len(), names.join(", "));
    }
}

/// The console log's rotation (renamed at its cap, created afresh) happens
/// on the vCPU thread that writes the console: its filter must allow it.
#[test]
fn vcpu_filter_allows_console_log_rotation() {
    use std::io::Write;
    let dir = std::env::temp_dir().join(format!("hearth-seccomp-console-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("console.log");
    let mut log = crate::devices::legacy::console_log::ConsoleLog::with_cap(&path, 64).unwrap();
    let (fate, stderr) = in_child(ThreadKind::Vcpu, Mode::Trap, move || {
        for _ in 0..3 {
            if log.write_all(&[b'x'; 40]).is_err() {
                return 9;
            }
        }
        0
    });
    assert_eq!(fate, Fate::Exited(0), "{stderr}");
    assert!(dir.join("console.log.1").exists(), "the log was rotated");
    std::fs::remove_dir_all(&dir).unwrap();
}
