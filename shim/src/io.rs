//! Process stdio between containerd and the agent: containerd hands the shim
//! FIFO paths (or log files); the agent connects one stream per stdio port to
//! `<vsock socket>_<port>`, where the shim listens. Threads copy between them.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use hearth_agent_protocol::agent::Stdio;
use hearth_agent_protocol::transport::{accept_within, listen_stdio, stdio_socket_path};

static NEXT_PORT: AtomicU32 = AtomicU32::new(0x1_0000);

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
    stdin: Option<(u32, UnixListener)>,
    stdout: Option<(u32, UnixListener)>,
    stderr: Option<(u32, UnixListener)>,
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

fn port() -> u32 {
    NEXT_PORT.fetch_add(1, Ordering::SeqCst)
}

pub fn prepare(vsock: &Path, paths: &StdioPaths) -> Result<(Stdio, Pending)> {
    let mut req = Stdio { terminal: paths.terminal, ..Default::default() };
    let listen = |p: u32| -> Result<(u32, UnixListener)> { Ok((p, listen_stdio(vsock, p)?)) };
    let mut pending =
        Pending { socket: vsock.to_path_buf(), paths: paths.clone(), stdin: None, stdout: None, stderr: None };
    if paths.terminal {
        // One stream carries the PTY both ways.
        let p = port();
        req.stdout_port = p;
        pending.stdout = Some(listen(p)?);
        return Ok((req, pending));
    }
    if !paths.stdin.is_empty() {
        let p = port();
        req.stdin_port = p;
        pending.stdin = Some(listen(p)?);
    }
    if !paths.stdout.is_empty() {
        let p = port();
        req.stdout_port = p;
        pending.stdout = Some(listen(p)?);
    }
    if !paths.stderr.is_empty() {
        let p = port();
        req.stderr_port = p;
        pending.stderr = Some(listen(p)?);
    }
    Ok((req, pending))
}

fn accept(l: &(u32, UnixListener)) -> Result<UnixStream> {
    accept_within(&l.1, Duration::from_secs(30))
        .with_context(|| format!("the agent never connected stdio port {}", l.0))
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
            let _ = std::fs::remove_file(stdio_socket_path(&self.socket, p.0));
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
