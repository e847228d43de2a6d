//! The shim's log, in containerd's log through a container's `log` FIFO.
//!
//! containerd reads the `log` FIFO of the bundle whose `start` launched the
//! shim, and stops when that container is deleted. A hearth shim outlives its
//! first container (it serves every container of its VM), so the log moves
//! to the newest container's FIFO (containerd reads each task's), and the
//! FIFO is written without blocking.
//!
//! A FIFO nobody reads any more must also be let go at once: a write to it
//! raises SIGPIPE, which containerd-shim's signal thread (also the reaper of
//! every child) logs, which raises SIGPIPE again... That loop kept the
//! reaper from ever reaping, and the next create hung in mount_rootfs.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};

static SINK: RwLock<Option<(PathBuf, File)>> = RwLock::new(None);

struct Switching;

impl Log for Switching {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // containerd's logfmt: it re-logs the line with the shim's fields.
        let now = time::OffsetDateTime::now_utc();
        let stamp = now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        let msg = record.args().to_string().replace('\\', "\\\\").replace('"', "\\\"");
        let line = format!("time=\"{stamp}\" level={} msg=\"{msg}\"\n", record.level().as_str().to_lowercase());
        let broken = match SINK.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            // One write: a FIFO takes a line of up to PIPE_BUF whole; a full
            // one (EAGAIN) drops it.
            Some((_, f)) => matches!((&*f).write(line.as_bytes()), Err(e) if e.raw_os_error() == Some(libc::EPIPE)),
            None => false,
        };
        if broken {
            // Nobody reads it any more (its container was deleted).
            SINK.write().unwrap_or_else(|e| e.into_inner()).take();
        }
    }

    fn flush(&self) {}
}

fn open(path: &Path) -> std::io::Result<File> {
    // Non-blocking: a full FIFO drops lines rather than stop the shim.
    OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(path)
}

/// Installs the logger on the FIFO `log` in the current directory (the
/// bundle of the container that started the shim).
pub fn init(level: &str, debug: bool) {
    attach(Path::new("log"));
    let level = if debug { LevelFilter::Debug } else { level.parse().unwrap_or(LevelFilter::Info) };
    if log::set_logger(&Switching).is_ok() {
        log::set_max_level(level);
    }
}

/// Logs to `path` (a bundle's `log` FIFO) from now on, if it can be opened.
pub fn attach(path: &Path) {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if let Ok(f) = open(&path) {
        *SINK.write().unwrap_or_else(|e| e.into_inner()) = Some((path, f));
    }
}

/// The FIFO logged to now.
pub fn current() -> Option<PathBuf> {
    SINK.read().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(p, _)| p.clone())
}
