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
//! * Any guest process can connect to a host vsock port, so a stdio stream
//!   is authenticated: the caller makes a [`StdioToken`] per stream and
//!   hands it to the agent in the request, the agent writes it first on the
//!   stream ([`present_token`]), and the caller takes only the connection
//!   that presents it ([`accept_stdio`]); ports are random besides
//!   ([`listen_stdio_random`]), so they are not known in advance either.

use std::io::{self, Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::AgentClient;

/// The vsock port the agent's ttrpc service listens on inside the VM.
pub const AGENT_PORT: u32 = 1024;
/// The agent's relay for localhost forwarding: a host connection to this
/// vsock port sends the TCP port it wants (2 bytes, big-endian), the agent
/// connects to that port on the VM's loopback, answers one byte (0: connected,
/// 1: refused) and then copies bytes both ways (docs/networking.md).
pub const FORWARD_PORT: u32 = 1025;
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

/// Listens for the agent's stdio stream on `port` (replacing a stale socket).
pub fn listen_stdio(agent_socket: &Path, port: u32) -> io::Result<UnixListener> {
    let path = stdio_socket_path(agent_socket, port);
    let _ = std::fs::remove_file(&path);
    UnixListener::bind(&path)
}

/// The lowest port [`listen_stdio_random`] picks: below it are the agent's
/// and the well-known services'.
pub const STDIO_PORT_MIN: u32 = 0x1_0000;

/// Listens for a stdio stream on a random free port in
/// [`STDIO_PORT_MIN`]..2^31. A socket already there (another process's
/// listener) is left alone and another port tried.
pub fn listen_stdio_random(agent_socket: &Path) -> io::Result<(u32, UnixListener)> {
    let mut last = None;
    for _ in 0..32 {
        let mut b = [0u8; 4];
        random_bytes(&mut b)?;
        let port = STDIO_PORT_MIN + u32::from_le_bytes(b) % (0x8000_0000 - STDIO_PORT_MIN);
        let path = stdio_socket_path(agent_socket, port);
        match UnixListener::bind(&path) {
            Ok(l) => {
                // hearth-vmm, which connects to it for the guest, runs as
                // an unprivileged user: the directory the socket is in
                // (its jail, 0700) keeps others out, the token the rest.
                std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
                return Ok((port, l));
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free stdio port")))
}

/// How long a stdio token is, in bytes.
pub const STDIO_TOKEN_LEN: usize = 32;

/// A stdio stream's secret (see the module's docs).
#[derive(Clone, PartialEq, Eq)]
pub struct StdioToken([u8; STDIO_TOKEN_LEN]);

impl StdioToken {
    /// A fresh token from the kernel's random source.
    pub fn random() -> io::Result<StdioToken> {
        let mut b = [0u8; STDIO_TOKEN_LEN];
        random_bytes(&mut b)?;
        Ok(StdioToken(b))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Compares in time independent of where the bytes differ.
    fn matches(&self, other: &[u8]) -> bool {
        other.len() == STDIO_TOKEN_LEN && self.0.iter().zip(other).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl std::fmt::Debug for StdioToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A secret: never in a log.
        f.write_str("StdioToken(..)")
    }
}

fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// The agent's side: writes the stream's token (if the caller set one)
/// before anything else.
pub fn present_token(stream: &mut impl Write, token: &[u8]) -> io::Result<()> {
    if token.is_empty() {
        return Ok(());
    }
    stream.write_all(token)
}

/// At most this many connections are read from at once while waiting for
/// the one with the token; more are dropped unread, oldest first.
const MAX_CANDIDATES: usize = 64;

/// What [`accept_stdio`] turned away, for the caller's log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Connections closed or timed out before sending a whole token, or
    /// pushed out by newer ones.
    pub incomplete: usize,
    /// Connections that sent a wrong token.
    pub wrong: usize,
}

/// Accepts the connection on a stdio listener that presents `token`, giving
/// up after `timeout` (if the request failed, the agent never connects).
/// Every other connection is closed unread beyond its first
/// [`STDIO_TOKEN_LEN`] bytes: it gets nothing of the stream and puts nothing
/// into it. Connections are read side by side, so one that connects and
/// sends nothing holds up nobody.
pub fn accept_stdio(
    listener: &UnixListener,
    token: &StdioToken,
    timeout: Duration,
) -> io::Result<(UnixStream, Refused)> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let mut refused = Refused::default();
    // Each candidate with the bytes of its token read so far.
    let mut candidates: Vec<(UnixStream, Vec<u8>)> = Vec::new();
    loop {
        let mut progress = false;
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(true)?;
                    if candidates.len() == MAX_CANDIDATES {
                        candidates.remove(0);
                        refused.incomplete += 1;
                    }
                    candidates.push((s, Vec::with_capacity(STDIO_TOKEN_LEN)));
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let mut i = 0;
        while i < candidates.len() {
            let (s, got) = &mut candidates[i];
            let mut buf = [0u8; STDIO_TOKEN_LEN];
            let want = STDIO_TOKEN_LEN - got.len();
            match s.read(&mut buf[..want]) {
                Ok(0) => {
                    candidates.swap_remove(i);
                    refused.incomplete += 1;
                    continue;
                }
                Ok(n) => {
                    progress = true;
                    got.extend_from_slice(&buf[..n]);
                    if got.len() == STDIO_TOKEN_LEN {
                        let (s, got) = candidates.swap_remove(i);
                        if token.matches(&got) {
                            refused.incomplete += candidates.len();
                            s.set_nonblocking(false)?;
                            return Ok((s, refused));
                        }
                        refused.wrong += 1;
                        continue;
                    }
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                Err(_) => {
                    candidates.swap_remove(i);
                    refused.incomplete += 1;
                    continue;
                }
            }
            i += 1;
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no connection presented the stream's token within {timeout:?} ({} closed early, {} with a wrong token, {} still silent)",
                    refused.incomplete,
                    refused.wrong,
                    candidates.len()
                ),
            ));
        }
        if !progress {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A byte stream that localhost forwarding relays: a TCP connection on one
/// side, a vsock (or hybrid vsock) connection on the other.
pub trait RelayStream: Read + Write + Send + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;
    /// Tells the peer that nothing more comes (half-close).
    fn shutdown_write(&self);
}

impl RelayStream for std::net::TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        std::net::TcpStream::try_clone(self)
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

impl RelayStream for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

/// Copies bytes both ways between `a` and `b` until both sides ended,
/// passing each side's end on as a half-close: the two halves of both
/// localhost-forwarding relays (the agent's and the shim's).
pub fn relay_both_ways<A: RelayStream, B: RelayStream>(a: A, b: B) -> io::Result<()> {
    let (mut a_r, mut b_w) = (a.try_clone()?, b.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut a_r, &mut b_w);
        b_w.shutdown_write();
    });
    let (mut b_r, mut a_w) = (b, a);
    let _ = io::copy(&mut b_r, &mut a_w);
    a_w.shutdown_write();
    let _ = up.join();
    Ok(())
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

    #[test]
    fn only_the_connection_with_the_token_is_accepted() {
        let dir = std::env::temp_dir().join(format!("hearth-proto-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("v.sock");
        let (port, l) = listen_stdio_random(&sock).unwrap();
        assert!((STDIO_PORT_MIN..0x8000_0000).contains(&port));
        let path = stdio_socket_path(&sock, port);
        // A second random listener never takes the first one's socket.
        let (port2, _l2) = listen_stdio_random(&sock).unwrap();
        assert_ne!(port, port2);
        let token = StdioToken::random().unwrap();
        assert_ne!(token, StdioToken::random().unwrap());
        assert_eq!(format!("{token:?}"), "StdioToken(..)");

        // Impostors first: one silent (holds nobody up), one with a wrong
        // token, one that sends half a token and closes.
        let silent = UnixStream::connect(&path).unwrap();
        let mut wrong = UnixStream::connect(&path).unwrap();
        wrong.write_all(&[0u8; STDIO_TOKEN_LEN]).unwrap();
        wrong.write_all(b"fake output").unwrap();
        let mut half = UnixStream::connect(&path).unwrap();
        half.write_all(&token.as_bytes()[..10]).unwrap();
        drop(half);
        let mut agent = UnixStream::connect(&path).unwrap();
        present_token(&mut agent, token.as_bytes()).unwrap();
        agent.write_all(b"real output").unwrap();
        drop(agent);

        let (mut s, refused) = accept_stdio(&l, &token, Duration::from_secs(10)).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert_eq!(out, "real output");
        assert_eq!(refused.wrong, 1, "{refused:?}");
        assert!(refused.incomplete >= 1, "{refused:?}");
        // The impostors were closed: they read the end, nothing else.
        for mut s in [silent, wrong] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = Vec::new();
            // Closed with its own bytes unread, the peer may see a reset.
            if let Err(e) = s.read_to_end(&mut got) {
                assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
            }
            assert!(got.is_empty());
        }

        // Nobody with the token: a clear timeout naming what came.
        let mut x = UnixStream::connect(&path).unwrap();
        x.write_all(&[1u8; STDIO_TOKEN_LEN]).unwrap();
        let err = accept_stdio(&l, &token, Duration::from_millis(200)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("1 with a wrong token"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
