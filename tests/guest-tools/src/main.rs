//! `hearth-guest-tool`: what the e2e suites run inside the guest, where
//! busybox has no AF_VSOCK. Built statically (`-C target-feature=+crt-static`)
//! by the xtask and copied onto the guest's run disk.
//!
//! - `vsock-echo-server PORT CONNS`: accepts CONNS connections on vsock port
//!   PORT, echoes each until EOF, then prints `HEARTH-VSOCK-SERVED: CONNS`.
//! - `vsock-echo-client CID PORT CONNS BYTES`: opens CONNS concurrent
//!   connections to CID:PORT, sends BYTES of pseudo-random data on each while
//!   reading the echo, checks every byte, prints `HEARTH-VSOCK-ECHOED: N`.
//! - `vsock-sink PORT`: reads one connection to its end, prints the bytes
//!   and seconds (the vsock benchmark).
//! - `fuse-hello MOUNTPOINT`: mounts and serves a one-file FUSE filesystem
//!   over /dev/fuse (see `fuse_hello`).
//! - `vsock-flood CID PORT N`: opens N connections to CID:PORT one after
//!   another and keeps them all open, then prints `HEARTH-VSOCK-FLOOD:
//!   connected=A refused=B` (the escape suite: the VMM's connection cap).
//! - `hog MIB`: allocates and dirties MIB MiB, to get OOM-killed in a
//!   memory-limited container (see `hog`).
//! - `tcp-echo PORT [ADDR]`: listens on TCP port PORT (at ADDR, by default
//!   every address) and echoes every connection until its end, each on a
//!   thread of its own, forever (the network suite: the host reaches a
//!   server in the VM).
//! - `tcp-check ADDR PORT BYTES`: sends BYTES pseudo-random bytes to a
//!   `tcp-echo` while reading them back and checks each, then prints
//!   `HEARTH-TCP-CHECK: ok BYTES` (container to container).
//! - `pause`, or the binary run under the name `pause`: a pod sandbox's
//!   process (see `pause`), the pause image's entry point.

mod fuse_hello;
mod hog;
mod pause;
mod time_runs;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::ExitCode;

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid start.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn socket() -> std::io::Result<File> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor, owned from here on.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// SO_VM_SOCKETS_CONNECT_TIMEOUT (in its timeval form) at level AF_VSOCK.
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;
/// Linux gives a vsock connect 2 s by default; a guest under software
/// emulation on a busy machine can need longer to see the answer.
const CONNECT_TIMEOUT_SECS: libc::time_t = 30;

fn connect(cid: u32, port: u32) -> std::io::Result<File> {
    let s = socket()?;
    let tv = libc::timeval { tv_sec: CONNECT_TIMEOUT_SECS, tv_usec: 0 };
    // SAFETY: setsockopt with a timeval of the right size on our socket.
    check(unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::AF_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of_val(&tv) as u32,
        )
    })?;
    let a = vsock_addr(cid, port);
    // SAFETY: a valid sockaddr_vm of the given size.
    check(unsafe {
        libc::connect(s.as_raw_fd(), &a as *const _ as *const libc::sockaddr, std::mem::size_of_val(&a) as u32)
    })?;
    Ok(s)
}

/// A vsock listener on `port` of any local CID.
fn listen(port: u32, backlog: libc::c_int) -> std::io::Result<File> {
    let l = socket()?;
    let a = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: valid address and size; bind and listen on our own socket.
    check(unsafe {
        libc::bind(l.as_raw_fd(), &a as *const _ as *const libc::sockaddr, std::mem::size_of_val(&a) as u32)
    })?;
    check(unsafe { libc::listen(l.as_raw_fd(), backlog) })?;
    Ok(l)
}

fn accept(l: &File) -> std::io::Result<File> {
    // SAFETY: accept(2) without peer address.
    let fd = unsafe { libc::accept4(l.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from accept, owned from here on.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn shutdown_write(f: &File) {
    // SAFETY: shutdown(2) on a socket we own.
    unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_WR) };
}

/// The same stream of bytes on both sides of a test: xorshift from a seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn echo_server(port: u32, conns: usize) -> std::io::Result<()> {
    let l = listen(port, 64)?;
    let mut threads = Vec::new();
    for _ in 0..conns {
        let mut s = accept(&l)?;
        threads.push(std::thread::spawn(move || -> std::io::Result<u64> {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n])?;
                total += n as u64;
            }
            shutdown_write(&s);
            Ok(total)
        }));
    }
    let mut total = 0;
    for t in threads {
        total += t.join().unwrap()?;
    }
    println!("HEARTH-VSOCK-SERVED: {conns}");
    println!("HEARTH-VSOCK-SERVED-BYTES: {total}");
    Ok(())
}

fn echo_client(cid: u32, port: u32, conns: usize, bytes: usize) -> std::io::Result<()> {
    let mut threads = Vec::new();
    for i in 0..conns {
        threads.push(std::thread::spawn(move || -> std::io::Result<()> {
            let s = connect(cid, port)?;
            let data = pattern(i as u64 + 1, bytes);
            let mut w = s.try_clone()?;
            let sent = data.clone();
            let writer = std::thread::spawn(move || -> std::io::Result<()> {
                w.write_all(&sent)?;
                shutdown_write(&w);
                Ok(())
            });
            let mut back = Vec::with_capacity(bytes);
            (&s).read_to_end(&mut back)?;
            writer.join().unwrap()?;
            if back != data {
                return Err(std::io::Error::other(format!(
                    "connection {i}: echo differs ({} of {bytes} bytes back)",
                    back.len()
                )));
            }
            Ok(())
        }));
    }
    for t in threads {
        t.join().unwrap()?;
    }
    println!("HEARTH-VSOCK-ECHOED: {conns}x{bytes}");
    Ok(())
}

/// Accepts one connection on vsock port PORT and reads it to the end.
fn sink(port: u32) -> std::io::Result<()> {
    let l = listen(port, 1)?;
    let mut s = accept(&l)?;
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    println!("HEARTH-VSOCK-SINK-BYTES: {total}");
    println!("HEARTH-VSOCK-SINK-SECS: {:.3}", started.elapsed().as_secs_f64());
    Ok(())
}

/// Opens `n` connections and holds them; the refusals are the point.
fn flood(cid: u32, port: u32, n: usize) -> std::io::Result<()> {
    let (mut held, mut refused) = (Vec::new(), 0usize);
    for _ in 0..n {
        match connect(cid, port) {
            Ok(s) => held.push(s),
            Err(_) => refused += 1,
        }
    }
    println!("HEARTH-VSOCK-FLOOD: connected={} refused={refused}", held.len());
    Ok(())
}

/// Connects to a host stdio port before the agent does (retrying until
/// the caller listens), sends a made-up token and forged output, and reports
/// what it read back: a shim that checks tokens closes it unread.
fn stdio_impostor(cid: u32, port: u32) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut s = loop {
        match connect(cid, port) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    };
    println!("HEARTH-IMPOSTOR: connected");
    // The stream may already be closed: what matters is what comes back.
    let _ = s.write_all(&[b'X'; 32]);
    let _ = s.write_all(b"FORGED\n");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    println!("HEARTH-IMPOSTOR: read {} bytes", got.len());
    Ok(())
}

fn tcp_echo(port: u16, addr: &str) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind((addr, port))?;
    for conn in listener.incoming() {
        let mut conn = conn?;
        let mut back = conn.try_clone()?;
        std::thread::spawn(move || std::io::copy(&mut conn, &mut back));
    }
    Ok(())
}

/// Sends `bytes` pseudo-random bytes to a `tcp-echo` at ADDR:PORT while
/// reading them back, and checks that every byte came back in order.
fn tcp_check(addr: &str, port: u16, bytes: usize) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect((addr, port))?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
    let data: Vec<u8> = pattern(0x7463_7063, bytes);
    let mut writer = conn.try_clone()?;
    let sent = data.clone();
    let w = std::thread::spawn(move || writer.write_all(&sent));
    let mut back = vec![0u8; bytes];
    conn.read_exact(&mut back)?;
    w.join().map_err(|_| std::io::Error::other("the writer panicked"))??;
    if back != data {
        let at = back.iter().zip(&data).position(|(a, b)| a != b).unwrap_or(0);
        return Err(std::io::Error::other(format!("the echo differs from byte {at} on")));
    }
    println!("HEARTH-TCP-CHECK: ok {bytes}");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize| args.get(i).and_then(|s| s.parse::<usize>().ok());
    let called_pause = args.first().is_some_and(|a| a.rsplit('/').next() == Some("pause"));
    let command = if called_pause { Some("pause") } else { args.get(1).map(String::as_str) };
    let result = match command {
        Some("pause") => pause::run(),
        Some("vsock-echo-server") => match (num(2), num(3)) {
            (Some(port), Some(conns)) => echo_server(port as u32, conns),
            _ => Err(std::io::Error::other("usage: vsock-echo-server PORT CONNS")),
        },
        Some("vsock-sink") => match num(2) {
            Some(port) => sink(port as u32),
            _ => Err(std::io::Error::other("usage: vsock-sink PORT")),
        },
        Some("vsock-echo-client") => match (num(2), num(3), num(4), num(5)) {
            (Some(cid), Some(port), Some(conns), Some(bytes)) => echo_client(cid as u32, port as u32, conns, bytes),
            _ => Err(std::io::Error::other("usage: vsock-echo-client CID PORT CONNS BYTES")),
        },
        Some("fuse-hello") => match args.get(2) {
            Some(mountpoint) => fuse_hello::run(std::path::Path::new(mountpoint)),
            _ => Err(std::io::Error::other("usage: fuse-hello MOUNTPOINT")),
        },
        Some("vsock-flood") => match (num(2), num(3), num(4)) {
            (Some(cid), Some(port), Some(n)) => flood(cid as u32, port as u32, n),
            _ => Err(std::io::Error::other("usage: vsock-flood CID PORT N")),
        },
        Some("stdio-impostor") => match (num(2), num(3)) {
            (Some(cid), Some(port)) => stdio_impostor(cid as u32, port as u32),
            _ => Err(std::io::Error::other("usage: stdio-impostor CID PORT")),
        },
        Some("tcp-echo") => match num(2) {
            Some(port) => tcp_echo(port as u16, args.get(3).map(String::as_str).unwrap_or("0.0.0.0")),
            _ => Err(std::io::Error::other("usage: tcp-echo PORT [ADDR]")),
        },
        Some("tcp-check") => match (args.get(2), num(3), num(4)) {
            (Some(addr), Some(port), Some(bytes)) => tcp_check(addr, port as u16, bytes),
            _ => Err(std::io::Error::other("usage: tcp-check ADDR PORT BYTES")),
        },
        Some("hog") => match num(2) {
            Some(mib) => hog::run(mib),
            _ => Err(std::io::Error::other("usage: hog MIB")),
        },
        Some("time-runs") => match (num(2), args.get(3), args.get(4).map(String::as_str)) {
            (Some(n), Some(label), Some("--")) => time_runs::run(n, label, &args[5..]),
            _ => Err(std::io::Error::other("usage: time-runs N LABEL -- COMMAND...")),
        },
        _ => Err(std::io::Error::other(
            "usage: hearth-guest-tool vsock-echo-server|vsock-echo-client|vsock-sink|vsock-flood|stdio-impostor|fuse-hello|hog|tcp-echo|tcp-check|time-runs|pause ...",
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hearth-guest-tool: {e}");
            ExitCode::FAILURE
        }
    }
}
