//! A container process's stdio: streams to the caller, pipes or a PTY to the
//! process, and the threads that copy between them.
//!
//! The caller listens on the ports it names in the request and the agent
//! connects, writing each stream's token first (see
//! hearth_agent_protocol::transport). The process gets pipes,
//! not the streams themselves, so that it sees what it would see under runc
//! (`/dev/stdout` can be opened, for one) and so the agent can close stdin on
//! request and know when the output has all been delivered.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hearth_agent_protocol::agent::Stdio;
use hearth_agent_protocol::transport::{present_token, stdio_socket_path, HOST_CID};
use nix::sys::socket::{
    connect, recvmsg, socket, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, VsockAddr,
};

/// Where stdio ports lead.
#[derive(Debug, Clone)]
pub enum Dialer {
    /// In the VM: vsock to the host.
    Vsock,
    /// Natively: `<agent socket>_<port>`.
    Unix(PathBuf),
}

impl Dialer {
    /// Connects stdio `port` and presents the stream's token, first thing
    /// (the caller takes no other connection: see
    /// hearth_agent_protocol::transport).
    pub fn dial(&self, port: u32, token: &[u8]) -> io::Result<UnixStream> {
        let mut stream = self.connect(port)?;
        present_token(&mut stream, token).map_err(|e| io::Error::new(e.kind(), format!("stdio port {port}: {e}")))?;
        Ok(stream)
    }

    fn connect(&self, port: u32) -> io::Result<UnixStream> {
        match self {
            Dialer::Unix(sock) => {
                let path = stdio_socket_path(sock, port);
                UnixStream::connect(&path)
                    .map_err(|e| io::Error::new(e.kind(), format!("stdio port {port} ({}): {e}", path.display())))
            }
            Dialer::Vsock => {
                let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
                connect(fd.as_raw_fd(), &VsockAddr::new(HOST_CID, port))
                    .map_err(|e| io::Error::other(format!("stdio: vsock port {port} on the host: {e}")))?;
                // Plain read/write/shutdown on a stream socket: UnixStream's
                // methods are the generic syscalls.
                Ok(UnixStream::from(fd))
            }
        }
    }
}

/// The process's ends, handed to libcontainer.
pub struct ProcessEnds {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// With a terminal: the socket libcontainer sends the PTY master to.
    pub console_socket: Option<PathBuf>,
}

/// The agent's side of a process's stdio.
pub struct StdioSession {
    stdin: Arc<Mutex<Option<File>>>,
    pty: Arc<Mutex<Option<File>>>,
    /// Output copiers; each sends once when its source is drained.
    output_done: Vec<mpsc::Receiver<()>>,
    pending_terminal: Option<PendingTerminal>,
    threads: Vec<JoinHandle<()>>,
    /// Set once the process has exited (or the session is dropped): the
    /// end of a terminal's output (see copy_pty_out).
    exited: Arc<AtomicBool>,
}

struct PendingTerminal {
    master: JoinHandle<io::Result<OwnedFd>>,
    stream: UnixStream,
    socket_path: PathBuf,
}

fn devnull(write: bool) -> io::Result<OwnedFd> {
    Ok(std::fs::OpenOptions::new().read(!write).write(write).open("/dev/null")?.into())
}

fn pipe() -> io::Result<(File, File)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((File::from(r), File::from(w)))
}

impl StdioSession {
    /// Connects the requested streams and makes the process's ends.
    /// `scratch` is a directory for the console socket.
    pub fn open(dialer: &Dialer, req: &Stdio, scratch: &Path, name: &str) -> io::Result<(StdioSession, ProcessEnds)> {
        let mut session = StdioSession {
            stdin: Arc::new(Mutex::new(None)),
            pty: Arc::new(Mutex::new(None)),
            output_done: Vec::new(),
            pending_terminal: None,
            threads: Vec::new(),
            exited: Arc::new(AtomicBool::new(false)),
        };
        if req.terminal {
            if req.stdin_port != 0 || req.stderr_port != 0 || req.stdout_port == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "with a terminal, one stream on stdout_port carries input and output: set only stdout_port",
                ));
            }
            let stream = dialer.dial(req.stdout_port, &req.stdout_token)?;
            let socket_path = scratch.join(format!("{name}.console"));
            let _ = std::fs::remove_file(&socket_path);
            let listener = UnixListener::bind(&socket_path)?;
            let master = std::thread::spawn(move || receive_pty_master(listener));
            session.pending_terminal = Some(PendingTerminal { master, stream, socket_path: socket_path.clone() });
            let ends = ProcessEnds { stdin: None, stdout: None, stderr: None, console_socket: Some(socket_path) };
            return Ok((session, ends));
        }

        let stdin = if req.stdin_port != 0 {
            let stream = dialer.dial(req.stdin_port, &req.stdin_token)?;
            let (r, w) = pipe()?;
            *session.stdin.lock().unwrap() = Some(w);
            let sink = session.stdin.clone();
            session.threads.push(std::thread::spawn(move || copy_into_shared(stream, sink)));
            r.into()
        } else {
            devnull(false)?
        };
        let mut output = |port: u32, token: &[u8]| -> io::Result<OwnedFd> {
            if port == 0 {
                return devnull(true);
            }
            let stream = dialer.dial(port, token)?;
            let (r, w) = pipe()?;
            let (tx, rx) = mpsc::channel();
            session.output_done.push(rx);
            session.threads.push(std::thread::spawn(move || {
                copy_out(r, &stream);
                let _ = stream.shutdown(Shutdown::Both);
                let _ = tx.send(());
            }));
            Ok(w.into())
        };
        let stdout = output(req.stdout_port, &req.stdout_token)?;
        let stderr = output(req.stderr_port, &req.stderr_token)?;
        Ok((
            session,
            ProcessEnds { stdin: Some(stdin), stdout: Some(stdout), stderr: Some(stderr), console_socket: None },
        ))
    }

    /// After libcontainer has created the process: with a terminal, takes the
    /// PTY master it sent and starts copying.
    pub fn attach_terminal(&mut self) -> io::Result<()> {
        let Some(pending) = self.pending_terminal.take() else { return Ok(()) };
        let master = pending.master.join().map_err(|_| io::Error::other("the console socket thread panicked"))??;
        let _ = std::fs::remove_file(&pending.socket_path);
        let master = File::from(master);
        let master_in = master.try_clone()?;
        *self.pty.lock().unwrap() = Some(master);
        let input = pending.stream.try_clone()?;
        let out_stream = pending.stream;
        let (tx, rx) = mpsc::channel();
        self.output_done.push(rx);
        // Input: caller -> PTY master.
        let sink = Arc::new(Mutex::new(Some(master_in)));
        self.threads.push(std::thread::spawn(move || copy_into_shared(input, sink)));
        // Output: PTY master -> caller, until the process has exited.
        let pty = self.pty.clone();
        let exited = self.exited.clone();
        self.threads.push(std::thread::spawn(move || {
            let reader = pty.lock().unwrap().as_ref().and_then(|m| m.try_clone().ok());
            if let Some(r) = reader {
                copy_pty_out(r, &out_stream, &exited);
            }
            let _ = out_stream.shutdown(Shutdown::Both);
            let _ = tx.send(());
        }));
        Ok(())
    }

    /// Stops a terminal set-up that never got its process.
    pub fn abandon(&mut self) {
        if let Some(p) = self.pending_terminal.take() {
            // Unblock the accept with a connection of our own.
            let _ = UnixStream::connect(&p.socket_path);
            let _ = p.master.join();
            let _ = std::fs::remove_file(&p.socket_path);
        }
        self.close_stdin();
    }

    pub fn close_stdin(&self) {
        self.stdin.lock().unwrap().take();
    }

    pub fn resize(&self, width: u16, height: u16) -> io::Result<()> {
        let pty = self.pty.lock().unwrap();
        let master = pty
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the process has no terminal to resize"))?;
        let ws = libc::winsize { ws_row: height, ws_col: width, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The process has exited: a terminal's output ends once drained.
    pub fn process_exited(&self) {
        self.exited.store(true, Ordering::Release);
    }

    /// Waits until the output has been delivered, at most `grace`: a
    /// daemonised grandchild may hold the pipe open for ever.
    pub fn drain(&mut self, grace: Duration) {
        let deadline = std::time::Instant::now() + grace;
        for rx in self.output_done.drain(..) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let _ = rx.recv_timeout(left);
        }
    }
}

impl Drop for StdioSession {
    fn drop(&mut self) {
        self.process_exited();
        self.abandon();
        self.pty.lock().unwrap().take();
    }
}

/// Copies from the caller's stream into a shared writer until the stream
/// ends or the writer is taken away (stdin closed).
fn copy_into_shared(mut from: UnixStream, sink: Arc<Mutex<Option<File>>>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut guard = sink.lock().unwrap();
        let Some(w) = guard.as_mut() else { break };
        if w.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    // End of input: the process reads EOF.
    sink.lock().unwrap().take();
}

/// Copies a process's output to the caller until it ends.
fn copy_out(from: File, to: &UnixStream) {
    copy_output(from, to, None)
}

/// Copies a PTY's output. Reading the master fails with EIO whenever no
/// slave is open, which is the end of the output for a shell, but not for
/// an init like systemd, which opens /dev/console for each message and
/// closes it in between: so EIO ends the copy only once the process has
/// exited, and otherwise the copy waits for the next writer.
fn copy_pty_out(from: File, to: &UnixStream, exited: &AtomicBool) {
    copy_output(from, to, Some(exited))
}

fn copy_output(mut from: File, mut to: &UnixStream, eio_until_exited: Option<&AtomicBool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if e.raw_os_error() == Some(libc::EIO)
                    && eio_until_exited.is_some_and(|x| !x.load(Ordering::Acquire)) =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(_) => break, // EIO from a PTY master whose slave is gone
        }
    }
}

/// Accepts libcontainer's connection on the console socket and receives the
/// PTY master it passes with SCM_RIGHTS.
fn receive_pty_master(listener: UnixListener) -> io::Result<OwnedFd> {
    let (conn, _) = listener.accept()?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut data = [0u8; 4096];
    let mut iov = [io::IoSliceMut::new(&mut data)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(conn.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this fd for us.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(io::Error::other("the console socket carried no PTY master"))
}
