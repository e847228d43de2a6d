//! The typed client of the control socket.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::protocol::{DiskInfo, NicInfo, Reply, Request, VmInfo};
use crate::devices::virtio::tap::Tap;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the VMM's control socket {path}: {source} (is the VM running with --api-socket?)")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("talking to the VMM's control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot open the disk image {path}: {source}")]
    Image { path: PathBuf, source: std::io::Error },
    #[error("cannot open the tap {name}: {source}")]
    Tap { name: String, source: std::io::Error },
    #[error("the VMM's reply is not understood: {0}")]
    BadReply(String),
    /// The VMM refused the request; its message says why.
    #[error("the VMM refused: {0}")]
    Refused(String),
}

pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Client {
        // A pause waits up to 5 s for the vCPUs: leave room for it.
        Client { path: path.into(), timeout: Duration::from_secs(15) }
    }

    /// Sends `request` (with `file`'s descriptor, for attach-disk and
    /// attach-nic) and returns the reply; an error reply is [`Error::Refused`].
    pub fn call(&self, request: &Request, file: Option<&dyn AsFd>) -> Result<Reply, Error> {
        let conn =
            UnixStream::connect(&self.path).map_err(|source| Error::Connect { path: self.path.clone(), source })?;
        conn.set_read_timeout(Some(self.timeout))?;
        conn.set_write_timeout(Some(self.timeout))?;
        let mut line = serde_json::to_vec(request).map_err(|e| Error::BadReply(e.to_string()))?;
        line.push(b'\n');
        let sent = match file {
            Some(f) => conn
                .send_with_fd(&line[..], f.as_fd().as_raw_fd())
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?,
            None => {
                (&conn).write_all(&line)?;
                line.len()
            }
        };
        (&conn).write_all(&line[sent..])?;
        let mut reply = String::new();
        BufReader::new(&conn).read_line(&mut reply)?;
        if reply.is_empty() {
            return Err(Error::BadReply("the VMM closed the connection without a reply".into()));
        }
        match serde_json::from_str(&reply).map_err(|e| Error::BadReply(format!("{e}: {}", reply.trim_end())))? {
            Reply::Error(msg) => Err(Error::Refused(msg)),
            r => Ok(r),
        }
    }

    pub fn info(&self) -> Result<VmInfo, Error> {
        match self.call(&Request::Info {}, None)? {
            Reply::Info(i) => Ok(i),
            other => Err(unexpected(other)),
        }
    }

    pub fn pause(&self) -> Result<(), Error> {
        self.done(&Request::Pause {})
    }

    pub fn resume(&self) -> Result<(), Error> {
        self.done(&Request::Resume {})
    }

    pub fn set_balloon(&self, target_mib: u64) -> Result<(), Error> {
        self.done(&Request::SetBalloon { target_mib })
    }

    /// Attaches an open image (read-write unless `read_only`) as disk `id`.
    pub fn attach_disk(&self, image: &File, id: &str, read_only: bool) -> Result<DiskInfo, Error> {
        match self.call(&Request::AttachDisk { id: id.into(), read_only }, Some(image as &dyn AsFd))? {
            Reply::Attached(d) => Ok(d),
            other => Err(unexpected(other)),
        }
    }

    /// Opens the image at `path` here (with the caller's rights, never the
    /// VMM's) and attaches it.
    pub fn attach_disk_path(&self, path: &Path, id: &str, read_only: bool) -> Result<DiskInfo, Error> {
        let image = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| Error::Image { path: path.to_path_buf(), source })?;
        self.attach_disk(&image, id, read_only)
    }

    /// Detaches disk `id`; returns it as it was, with its final counters.
    pub fn detach_disk(&self, id: &str) -> Result<DiskInfo, Error> {
        match self.call(&Request::DetachDisk { id: id.into() }, None)? {
            Reply::Detached(d) => Ok(d),
            other => Err(unexpected(other)),
        }
    }

    /// Attaches an open tap (IFF_TAP | IFF_NO_PI) to a free NIC slot as `id`.
    pub fn attach_nic(&self, tap: &impl AsFd, id: &str) -> Result<NicInfo, Error> {
        match self.call(&Request::AttachNic { id: id.into() }, Some(tap as &dyn AsFd))? {
            Reply::NicAttached(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    /// Opens the tap `name` here (in the caller's network namespace, with
    /// the caller's rights: creating it needs CAP_NET_ADMIN) and attaches it.
    pub fn attach_nic_tap(&self, name: &str, id: &str) -> Result<NicInfo, Error> {
        let tap = Tap::open(name).map_err(|source| Error::Tap { name: name.into(), source })?;
        self.attach_nic(&tap, id)
    }

    /// Detaches NIC `id`; returns it as it was, with its final counters.
    pub fn detach_nic(&self, id: &str) -> Result<NicInfo, Error> {
        match self.call(&Request::DetachNic { id: id.into() }, None)? {
            Reply::NicDetached(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    fn done(&self, request: &Request) -> Result<(), Error> {
        match self.call(request, None)? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(reply: Reply) -> Error {
    Error::BadReply(format!("unexpected reply {reply:?}"))
}
