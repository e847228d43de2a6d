//! Transport conventions between the agent and its callers.
//!
//! * The agent's ttrpc service listens on vsock port [`AGENT_PORT`] in a VM,
//!   or on a Unix socket in native mode.
//! * hearth-vmm exposes the guest's vsock to the host as a Unix socket
//!   ("hybrid vsock", as Firecracker does): a host caller connects to it and
//!   writes `CONNECT <port>\n`; the VMM answers `OK <host port>\n`.
//! * A process's stdio streams go the other way: the caller listens and the
//!   agent connects. In a VM the agent connects to vsock CID 2 (the host) at
//!   the port named in the request, which hearth-vmm forwards to the Unix
//!   socket `<vsock socket>_<port>`; in native mode the agent connects to
//!   `<agent socket>_<port>` itself. Either way the caller listens on
//!   [`stdio_socket_path`] of the socket it reached the agent through.

use std::io::{self, Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::AgentClient;

/// The vsock port the agent's ttrpc service listens on inside the VM.
pub const AGENT_PORT: u32 = 1024;
/// The host's vsock context id.
pub const HOST_CID: u32 = 2;

/// How a caller reaches an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddress {
    /// A native-mode agent listening on a Unix socket.
    Unix(PathBuf),
    /// An agent in a VM, through hearth-vmm's hybrid vsock socket.
    HybridVsock { socket: PathBuf, port: u32 },
}

impl AgentAddress {
    /// The Unix socket whose `_<port>` siblings carry stdio streams.
    pub fn socket(&self) -> &Path {
        match self {
            AgentAddress::Unix(p) => p,
            AgentAddress::HybridVsock { socket, .. } => socket,
        }
    }

    /// Opens one stream to the agent's service.
    pub fn connect_stream(&self) -> io::Result<UnixStream> {
        match self {
            AgentAddress::Unix(p) => UnixStream::connect(p),
            AgentAddress::HybridVsock { socket, port } => connect_hybrid_vsock(socket, *port),
        }
    }

    /// A ttrpc client on a new stream.
    pub fn connect(&self) -> io::Result<AgentClient> {
        let stream = self.connect_stream()?;
        let client = ttrpc::Client::new(stream.into_raw_fd()).map_err(io::Error::other)?;
        Ok(AgentClient::new(client))
    }

    /// Connects, retrying until the agent answers `Health` or `timeout`
    /// passes: a VM that is still booting refuses connections at first.
    pub fn connect_when_ready(&self, timeout: Duration) -> io::Result<AgentClient> {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = self.connect().and_then(|c| {
                c.health(ttrpc::context::with_timeout(2_000_000_000), &Default::default()).map_err(io::Error::other)?;
                Ok(c)
            });
            match attempt {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() >= deadline => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the agent at {self:?} did not answer within {timeout:?}: {e}"),
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// Connects to guest vsock `port` through hearth-vmm's Unix socket.
pub fn connect_hybrid_vsock(socket: &Path, port: u32) -> io::Result<UnixStream> {
    let stream = UnixStream::connect(socket)?;
    handshake(stream, port).map_err(|e| match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof => io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("nothing listens on guest vsock port {port} (the VMM closed the connection)"),
        ),
        _ => e,
    })
}

fn handshake(mut stream: UnixStream, port: u32) -> io::Result<UnixStream> {
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Read the answer a byte at a time: anything after the newline is the
    // service's own data and must stay in the socket.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    loop {
        let n = stream.read(&mut byte)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > 64 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "overlong hybrid vsock answer"));
        }
    }
    stream.set_read_timeout(None)?;
    if !line.starts_with(b"OK ") {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("guest vsock port {port}: {}", String::from_utf8_lossy(&line)),
        ));
    }
    Ok(stream)
}

/// Where the stream for stdio `port` is to be found on the host.
pub fn stdio_socket_path(agent_socket: &Path, port: u32) -> PathBuf {
    let mut s = agent_socket.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Accepts the agent's connection on a stdio listener, giving up after
/// `timeout` (if the request failed, the agent never connects).
pub fn accept_within(listener: &UnixListener, timeout: Duration) -> io::Result<UnixStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(e),
        }
    }
}

/// Listens for the agent's stdio stream on `port` (replacing a stale socket).
pub fn listen_stdio(agent_socket: &Path, port: u32) -> io::Result<UnixListener> {
    let path = stdio_socket_path(agent_socket, port);
    let _ = std::fs::remove_file(&path);
    UnixListener::bind(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdio_path_appends_the_port() {
        assert_eq!(stdio_socket_path(Path::new("/run/x/vsock.sock"), 70), PathBuf::from("/run/x/vsock.sock_70"));
    }

    #[test]
    fn hybrid_handshake_accepts_ok_and_keeps_following_bytes() {
        let dir = std::env::temp_dir().join(format!("hearth-proto-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("v.sock");
        let _ = std::fs::remove_file(&sock);
        let l = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            s.write_all(b"OK 1073741824\nhello").unwrap();
        });
        let mut s = connect_hybrid_vsock(&sock, 1024).unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "hello");
        t.join().unwrap();

        // A VMM that closes the connection means nothing listens there.
        let l = UnixListener::bind({
            let _ = std::fs::remove_file(&sock);
            &sock
        })
        .unwrap();
        let t = std::thread::spawn(move || drop(l.accept().unwrap()));
        let err = connect_hybrid_vsock(&sock, 9).unwrap_err();
        assert!(err.to_string().contains("nothing listens on guest vsock port 9"), "{err}");
        t.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
