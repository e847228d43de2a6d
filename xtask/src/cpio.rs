//! A writer for the "newc" cpio format the kernel unpacks as an initramfs.
//! Written here rather than shelling out to cpio(1) so that device nodes
//! (/dev/console) can be added without root and the archive is reproducible
//! (fixed mtimes and inode numbers).

use std::path::Path;

use anyhow::{Context, Result};

#[derive(Default)]
pub struct Archive {
    data: Vec<u8>,
    ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Archive {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        self.ino += 1;
        let name = name.trim_start_matches('/');
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & S_IFDIR != 0 { 2 } else { 1 },
            0, // mtime
            body.len() as u32,
            0,
            0, // dev major, minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.data.extend_from_slice(b"070701");
        for f in fields {
            self.data.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(name, S_IFDIR | 0o755, (0, 0), &[]);
        self
    }

    pub fn file(&mut self, name: &str, mode: u32, body: &[u8]) -> &mut Self {
        self.entry(name, S_IFREG | mode, (0, 0), body);
        self
    }

    pub fn file_from(&mut self, name: &str, mode: u32, src: &Path) -> Result<&mut Self> {
        let body = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        Ok(self.file(name, mode, &body))
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes());
        self
    }

    pub fn char_dev(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> &mut Self {
        self.entry(name, S_IFCHR | mode, (major, minor), &[]);
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_terminated() {
        let mut a = Archive::default();
        a.dir("bin").file("init", 0o755, b"#!/bin/sh\n").char_dev("dev/console", 0o600, 5, 1);
        let data = a.finish();
        assert_eq!(data.len() % 4, 0);
        assert!(data.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&data);
        assert!(text.contains("TRAILER!!!"));
        assert!(text.contains("#!/bin/sh"));
        // The file's size field (7th) is 10 bytes.
        let second = text.find("init").unwrap();
        let header = &text[..second];
        let start = header.rfind("070701").unwrap();
        let size = &header[start + 6 + 6 * 8..start + 6 + 7 * 8];
        assert_eq!(u32::from_str_radix(size, 16).unwrap(), 10);
    }
}
