//! Cached artefacts (built root filesystems): one directory each, named by
//! a hash of its inputs, built under a lock.

use std::path::Path;

use anyhow::{Context, Result};

/// Hex SHA-256 of some byte strings, shortened: the cache key of an artefact.
pub fn key(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Takes an exclusive lock on `<dir>/.lock`, held until the returned file is
/// dropped, while an artefact is built in `dir`: two builds of the same
/// thing at once build it once, the later one waiting and then finding it.
pub fn lock(dir: &Path, what: &str) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!("==> waiting for another build of {what} ({})", path.display());
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("locking {}", path.display()));
        }
    }
    Ok(file)
}
