//! The control socket's server: one thread, one connection at a time, one
//! request per connection (see the module docs of [`crate::api`]).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::control::Control;
use super::protocol::{Reply, Request, MAX_REQUEST_BYTES};

/// A client has this long to send its request and take its reply.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the control socket. An existing file is refused rather than
/// removed: it may be another VMM's socket.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if path.symlink_metadata().is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "it exists: remove it if no VMM uses it (or choose another path)",
        ));
    }
    UnixListener::bind(path)
}

/// Serves `listener` on a thread of its own (seccomp kind `api`) until the
/// process ends.
pub fn spawn(listener: UnixListener, control: Arc<Control>) -> io::Result<()> {
    std::thread::Builder::new().name("api".into()).spawn(move || {
        crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Api);
        loop {
            match listener.accept() {
                Ok((conn, _)) => serve(conn, &control),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!("control socket: accept: {e}; the control socket is closed");
                    return;
                }
            }
        }
    })?;
    Ok(())
}

/// Reads one request from `conn`, serves it and writes the reply.
pub fn serve(mut conn: UnixStream, control: &Control) {
    if conn.set_read_timeout(Some(IO_TIMEOUT)).is_err() || conn.set_write_timeout(Some(IO_TIMEOUT)).is_err() {
        return;
    }
    let reply = match read_request(&mut conn) {
        Ok(None) => return, // connected and left without a word
        Ok(Some((request, file))) => {
            tracing::debug!(?request, "control request");
            control.handle(request, file)
        }
        Err(e) => Reply::Error(e),
    };
    let mut line = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"error\":\"reply not encodable\"}".to_vec());
    line.push(b'\n');
    if let Err(e) = conn.write_all(&line) {
        tracing::warn!("control socket: the client left before its reply: {e}");
    }
}

/// One request line and the descriptor sent with it. None: the client
/// closed without sending anything.
pub fn read_request(conn: &mut UnixStream) -> Result<Option<(Request, Option<File>)>, String> {
    let mut buf = vec![0u8; 4096];
    // The descriptor travels with the first bytes.
    let (mut len, file) = conn.recv_with_fd(&mut buf).map_err(|e| format!("reading the request: {e}"))?;
    if let Some(f) = &file {
        // The VMM execs nothing once running, but keep it private anyway.
        // SAFETY: F_SETFD on a descriptor we own.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    if len == 0 {
        return Ok(None);
    }
    let end = loop {
        if let Some(i) = buf[..len].iter().position(|b| *b == b'\n') {
            break i;
        }
        if len >= MAX_REQUEST_BYTES {
            return Err(format!("the request is longer than {MAX_REQUEST_BYTES} bytes"));
        }
        if buf.len() == len {
            buf.resize((len * 2).min(MAX_REQUEST_BYTES), 0);
        }
        match conn.read(&mut buf[len..]) {
            Ok(0) => return Err("the request has no end of line: end it with \\n".into()),
            Ok(n) => len += n,
            Err(e) => return Err(format!("reading the request: {e}")),
        }
    };
    let request = serde_json::from_slice::<Request>(&buf[..end])
        .map_err(|e| format!("bad request: {e} (docs/vmm.md lists the requests)"))?;
    Ok(Some((request, file)))
}
