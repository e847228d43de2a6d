//! Process stdio between containerd and the agent: containerd hands the shim
//! FIFO paths (or log files); the agent connects one stream per stdio port to
//! `<vsock socket>_<port>`, where the shim listens. Threads copy between them.
//!
//! Any process in the guest can connect to those ports, and in a VM shared by
//! several containers the one that connects first must not become another
//! container's stdin or stdout. So each stream gets a random port and a
//! random token, which the shim hands the agent in the request over the
//! agent's own channel; the agent writes the token first, and the shim takes
//! only the connection that presents it and closes every other one unread.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use hearth_agent_protocol::agent::Stdio;
use hearth_agent_protocol::transport::{accept_stdio, listen_stdio_random, stdio_socket_path, StdioToken};

/// What containerd asked for one process.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Listeners made before the agent is asked to create the process.
pub struct Pending {
    socket: PathBuf,
    paths: StdioPaths,
    stdin: Option<Listener>,
    stdout: Option<Listener>,
    stderr: Option<Listener>,
}

/// One stream's listener and the token its connection must present.
struct Listener {
    port: u32,
    listener: UnixListener,
    token: StdioToken,
}

/// The copying for one running process.
pub struct ProcessIo {
    stdin: Mutex<Option<UnixStream>>,
    done: Mutex<Vec<mpsc::Receiver<()>>>,
    /// A second handle on the process's stderr (its terminal with a PTY),
    /// kept until the process ends, so that the shim can say why a process
    /// ended when it, not the process, decided it: by the time the shim
    /// learns that the VM died, the copying threads have closed theirs and
    /// the reader, seeing the end of the output, may have closed its end.
    notice: Mutex<Option<(File, bool)>>,
}

/// Listens on a random port with a fresh token; returns what the agent is
/// told (port, token).
fn listen(vsock: &Path) -> Result<(u32, Vec<u8>, Listener)> {
    let (port, listener) = listen_stdio_random(vsock).context("listening for a stdio stream")?;
    let token = StdioToken::random().context("making a stdio token")?;
    Ok((port, token.as_bytes().to_vec(), Listener { port, listener, token }))
}

pub fn prepare(vsock: &Path, paths: &StdioPaths) -> Result<(Stdio, Pending)> {
    let mut req = Stdio { terminal: paths.terminal, ..Default::default() };
    let mut pending =
        Pending { socket: vsock.to_path_buf(), paths: paths.clone(), stdin: None, stdout: None, stderr: None };
    if paths.terminal {
        // One stream carries the PTY both ways.
        let (p, t, l) = listen(vsock)?;
        (req.stdout_port, req.stdout_token, pending.stdout) = (p, t, Some(l));
        return Ok((req, pending));
    }
    if !paths.stdin.is_empty() {
        let (p, t, l) = listen(vsock)?;
        (req.stdin_port, req.stdin_token, pending.stdin) = (p, t, Some(l));
    }
    if !paths.stdout.is_empty() {
        let (p, t, l) = listen(vsock)?;
        (req.stdout_port, req.stdout_token, pending.stdout) = (p, t, Some(l));
    }
    if !paths.stderr.is_empty() {
        let (p, t, l) = listen(vsock)?;
        (req.stderr_port, req.stderr_token, pending.stderr) = (p, t, Some(l));
    }
    Ok((req, pending))
}

fn accept(l: &Listener) -> Result<UnixStream> {
    let (stream, refused) = accept_stdio(&l.listener, &l.token, Duration::from_secs(30))
        .with_context(|| format!("the agent never connected stdio port {}", l.port))?;
    if refused.wrong + refused.incomplete > 0 {
        // A guest process raced the agent to this port.
        log::warn!(
            "stdio port {}: closed {} connection(s) with a wrong token and {} that sent none, \
             from guest processes racing the agent",
            l.port,
            refused.wrong,
            refused.incomplete
        );
    }
    Ok(stream)
}

/// Opens containerd's side of an output: a FIFO (opened for writing; ctr
/// holds the reading end) or a file (`binary://` and other schemes are not
/// supported).
fn open_output(path: &str) -> Result<File> {
    let p = path.strip_prefix("file://").unwrap_or(path);
    OpenOptions::new()
        .write(true)
        .create(!is_fifo(p))
        .append(!is_fifo(p))
        .open(p)
        .with_context(|| format!("opening {p}"))
}

fn is_fifo(p: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).map(|m| m.file_type().is_fifo()).unwrap_or(false)
}

fn open_input(path: &str) -> Result<File> {
    // Non-blocking open: a FIFO has no writer until the client attaches.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("opening {path}"))?;
    // Reads block from now on.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&f), libc::F_GETFL);
        libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&f), libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
    Ok(f)
}

fn copy(mut from: impl Read, mut to: impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
}

impl Pending {
    /// After the agent created the process: accepts its streams and starts
    /// copying.
    pub fn start(self) -> Result<ProcessIo> {
        let io = ProcessIo { stdin: Mutex::new(None), done: Mutex::new(Vec::new()), notice: Mutex::new(None) };
        let mut done = Vec::new();
        if self.paths.terminal {
            let stream = accept(self.stdout.as_ref().unwrap())?;
            if !self.paths.stdin.is_empty() {
                let input = open_input(&self.paths.stdin)?;
                let to = stream.try_clone()?;
                std::thread::spawn(move || copy(input, to));
            }
            let out = open_output(&self.paths.stdout)?;
            *io.notice.lock().unwrap() = Some((out.try_clone()?, true));
            let (tx, rx) = mpsc::channel();
            done.push(rx);
            std::thread::spawn(move || {
                copy(&stream, out);
                let _ = tx.send(());
            });
        } else {
            if let Some(l) = &self.stdin {
                let stream = accept(l)?;
                let input = open_input(&self.paths.stdin)?;
                *io.stdin.lock().unwrap() = Some(stream.try_clone()?);
                std::thread::spawn(move || {
                    copy(input, &stream);
                    let _ = stream.shutdown(Shutdown::Write);
                });
            }
            for (l, path) in [(&self.stdout, &self.paths.stdout), (&self.stderr, &self.paths.stderr)] {
                if let Some(l) = l {
                    let stream = accept(l)?;
                    let out = open_output(path)?;
                    // stderr if there is one, else stdout.
                    if path == &self.paths.stderr || io.notice.lock().unwrap().is_none() {
                        *io.notice.lock().unwrap() = Some((out.try_clone()?, false));
                    }
                    let (tx, rx) = mpsc::channel();
                    done.push(rx);
                    std::thread::spawn(move || {
                        copy(stream, out);
                        let _ = tx.send(());
                    });
                }
            }
        }
        *io.done.lock().unwrap() = done;
        Ok(io)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        for p in [&self.stdin, &self.stdout, &self.stderr].into_iter().flatten() {
            let _ = std::fs::remove_file(stdio_socket_path(&self.socket, p.port));
        }
    }
}

impl ProcessIo {
    /// Ends the process's input after what was sent (containerd's CloseIO).
    pub fn close_stdin(&self) {
        if let Some(s) = self.stdin.lock().unwrap().take() {
            let _ = s.shutdown(Shutdown::Write);
        }
    }

    /// Waits until the output reached containerd, at most `grace`.
    pub fn drain(&self, grace: Duration) {
        let deadline = std::time::Instant::now() + grace;
        for rx in self.done.lock().unwrap().drain(..) {
            let _ = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
        }
        self.notice.lock().unwrap().take();
    }

    /// Writes a line from hearth to the process's stderr (or terminal), and
    /// lets the output end.
    pub fn notify(&self, msg: &str) {
        if let Some((mut f, terminal)) = self.notice.lock().unwrap().take() {
            let nl = if terminal { "\r\n" } else { "\n" };
            let _ = write!(f, "hearth: {msg}{nl}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest process that reaches a stdio port before the agent gets
    /// nothing of the stream and puts nothing into it.
    #[test]
    fn impostors_on_stdio_ports_get_and_give_nothing() {
        let dir = std::env::temp_dir().join(format!("hearth-shim-io-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let vsock = dir.join("vsock.sock");
        let input = dir.join("stdin");
        std::fs::write(&input, "the secret input").unwrap();
        let paths = StdioPaths {
            stdin: input.display().to_string(),
            stdout: dir.join("stdout").display().to_string(),
            stderr: dir.join("stderr").display().to_string(),
            terminal: false,
        };
        let (req, pending) = prepare(&vsock, &paths).unwrap();
        let ports = [req.stdin_port, req.stdout_port, req.stderr_port];
        assert!(ports.iter().all(|&p| p >= 0x1_0000), "{ports:?}");
        for t in [&req.stdin_token, &req.stdout_token, &req.stderr_token] {
            assert_eq!(t.len(), 32);
        }
        assert_ne!(req.stdout_token, req.stderr_token);

        // The impostors come first: without a token, with another stream's
        // token, with a guessed one.
        let connect = |p: u32| UnixStream::connect(stdio_socket_path(&vsock, p)).unwrap();
        let mut thief = connect(req.stdin_port);
        thief.write_all(&req.stdout_token).unwrap();
        let mut forger = connect(req.stdout_port);
        forger.write_all(&[7u8; 32]).unwrap();
        forger.write_all(b"forged output\n").unwrap();
        let silent = connect(req.stderr_port);

        // Then the agent, as the guest runtime does it.
        let agent = |p: u32, t: &[u8]| {
            let mut s = connect(p);
            s.write_all(t).unwrap();
            s
        };
        let mut stdin = agent(req.stdin_port, &req.stdin_token);
        let mut stdout = agent(req.stdout_port, &req.stdout_token);
        let mut stderr = agent(req.stderr_port, &req.stderr_token);
        let io = pending.start().unwrap();
        stdout.write_all(b"real output\n").unwrap();
        stderr.write_all(b"real error\n").unwrap();
        drop((stdout, stderr));
        let mut got = String::new();
        stdin.read_to_string(&mut got).unwrap();
        assert_eq!(got, "the secret input");
        io.drain(Duration::from_secs(10));

        assert_eq!(std::fs::read_to_string(&paths.stdout).unwrap(), "real output\n");
        assert_eq!(std::fs::read_to_string(&paths.stderr).unwrap(), "real error\n");
        for mut s in [thief, forger, silent] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = Vec::new();
            // Closed with its own bytes unread, a Unix socket's peer may
            // see a reset rather than the end: either way, nothing came.
            match s.read_to_end(&mut got) {
                Ok(_) => {}
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            }
            assert!(got.is_empty(), "an impostor read {got:?}");
        }
        // The listeners are gone once the streams are taken.
        for p in ports {
            assert!(!stdio_socket_path(&vsock, p).exists());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
