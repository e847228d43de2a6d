//! The console log file (`--console PATH`), with a size cap: the guest can
//! print forever, and an unbounded log would fill the host's disk.
//!
//! When the file reaches [`MAX_BYTES`] it is rotated once: renamed to
//! `PATH.1` (replacing an older one) and started afresh with a marker line
//! saying so. At most twice the cap is ever on disk, and the newest output
//! (the part that explains a crash) is always kept.

use crate::devices::ratelimit::LogLimit;
use crate::warn_limited;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Guest-triggerable warnings go through a rate limit (see ratelimit.rs).
static ROTATE_WARN: LogLimit = LogLimit::new();

/// Size at which the log is rotated.
pub const MAX_BYTES: u64 = 32 << 20;

pub struct ConsoleLog {
    path: PathBuf,
    file: File,
    written: u64,
    max: u64,
}

impl ConsoleLog {
    /// Creates (truncates) the log at `path`.
    pub fn create(path: &Path) -> io::Result<ConsoleLog> {
        ConsoleLog::with_cap(path, MAX_BYTES)
    }

    pub fn with_cap(path: &Path, max: u64) -> io::Result<ConsoleLog> {
        Ok(ConsoleLog { path: path.to_path_buf(), file: File::create(path)?, written: 0, max })
    }

    /// The log's path from now on, for rotation: where the jail puts it
    /// (see [`crate::jail`]); the open file is kept.
    pub fn reached_at(&mut self, path: PathBuf) {
        self.path = path;
    }

    fn rotated_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".1");
        p.into()
    }

    fn rotate(&mut self) -> io::Result<()> {
        let old = self.rotated_path();
        std::fs::rename(&self.path, &old)?;
        self.file = File::create(&self.path)?;
        let marker = format!(
            "[hearth-vmm: the console log reached {} bytes; earlier output was moved to {}]\n",
            self.max,
            old.display()
        );
        self.file.write_all(marker.as_bytes())?;
        self.written = marker.len() as u64;
        Ok(())
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written.saturating_add(buf.len() as u64) > self.max && self.written > 0 {
            if let Err(e) = self.rotate() {
                // Keep the cap even if rotating fails: drop the output.
                warn_limited!(
                    ROTATE_WARN,
                    "rotating the console log {}: {e}; console output dropped",
                    self.path.display()
                );
                return Ok(buf.len());
            }
        }
        // A single write bigger than the cap (the serial port writes a byte
        // at a time, so only in tests) is cut to the cap.
        let n = buf.len().min(self.max.saturating_sub(self.written).max(1) as usize);
        let n = self.file.write(&buf[..n])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_is_rotated_at_its_cap_with_a_marker() {
        let dir = std::env::temp_dir().join(format!("hearth-console-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let mut log = ConsoleLog::with_cap(&path, 1000).unwrap();
        for i in 0..10_000u32 {
            log.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        let now = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(dir.join("console.log.1")).unwrap();
        assert!(now.len() <= 1000 && old.len() <= 1000, "{} and {} bytes", now.len(), old.len());
        assert!(now.starts_with("[hearth-vmm: the console log reached 1000 bytes"));
        assert!(now.ends_with("line 9999\n"), "the newest output is kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
