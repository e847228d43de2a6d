//! Root filesystem trees as tars: reading one (its digests, which OS it is,
//! which init it has) and the cache of trees built from a recipe.

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::debian::Recipe;
use crate::progress::Progress;

pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A root filesystem as one image layer blob on this host.
#[derive(Debug, Clone)]
pub struct Layer {
    pub path: PathBuf,
    /// [`LAYER_TAR`] or [`LAYER_TAR_GZIP`].
    pub media_type: String,
    /// sha256 of the blob as stored.
    pub digest: String,
    pub size: u64,
    /// sha256 of the uncompressed tar: the layer's identity in an image
    /// config, and a single layer's snapshot chain id.
    pub diff_id: String,
}

/// What a root filesystem tar holds, as far as hearth cares.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsInfo {
    /// os-release's PRETTY_NAME (or NAME), empty when it has none.
    pub os_name: String,
    /// The init to run as the distro's PID 1 (`/sbin/init`), if it has one.
    pub init: Option<String>,
    /// Whether that init is systemd (stopped with SIGRTMIN+3, not SIGTERM).
    pub systemd: bool,
}

/// A reader that hashes (and counts) what passes through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
    progress: Option<Progress>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        if let Some(p) = self.progress.as_mut() {
            p.advance(n as u64);
        }
        Ok(n)
    }
}

impl<R> Hashing<R> {
    fn new(inner: R, progress: Option<Progress>) -> Self {
        Hashing { inner, hash: Sha256::new(), bytes: 0, progress }
    }

    fn digest(&self) -> String {
        format!("sha256:{:x}", self.hash.clone().finalize())
    }
}

fn normalize(path: &Path) -> String {
    let s = path.to_string_lossy();
    s.trim_start_matches("./").trim_start_matches('/').trim_end_matches('/').to_string()
}

/// Walks a tar stream (reading it to its end, so the hashes see every
/// byte), noting os-release and the init.
fn scan_tar(r: impl Read) -> Result<RootfsInfo> {
    let mut archive = tar::Archive::new(r);
    let mut os_release = None;
    let mut links = std::collections::HashMap::new();
    let mut files = std::collections::HashSet::new();
    for entry in archive.entries().context("reading the tar")? {
        let mut e = entry.context("reading a tar entry: is this a root filesystem tar (optionally gzipped)?")?;
        let path = normalize(&e.path()?);
        if let Ok(Some(target)) = e.link_name() {
            links.insert(path.clone(), target.to_string_lossy().to_string());
        }
        if matches!(path.as_str(), "etc/os-release" | "usr/lib/os-release") && e.header().entry_type().is_file() {
            let mut text = String::new();
            e.read_to_string(&mut text)?;
            os_release.get_or_insert(text);
        }
        files.insert(path);
    }
    let mut inner = archive.into_inner();
    std::io::copy(&mut inner, &mut std::io::sink())?;
    let os_name = os_release.as_deref().map(pretty_name).unwrap_or_default();
    // /sbin/init, through merged-/usr symlinks and the init's own.
    let resolve = |p: &str| -> String {
        let mut p = p.to_string();
        for _ in 0..8 {
            // A symlinked leading directory (sbin -> usr/sbin).
            if let Some((dir, rest)) = p.split_once('/') {
                if let Some(t) = links.get(dir) {
                    p = format!("{}/{rest}", t.trim_start_matches('/'));
                    continue;
                }
            }
            match links.get(&p) {
                Some(t) if t.starts_with('/') => p = t.trim_start_matches('/').to_string(),
                Some(t) => {
                    let base = Path::new(&p).parent().map(|d| d.join(t)).unwrap_or_else(|| PathBuf::from(t));
                    p = normalize_dots(&base);
                }
                None => break,
            }
        }
        p
    };
    let init = ["sbin/init", "usr/sbin/init"].into_iter().find(|p| files.contains(*p) || links.contains_key(*p));
    let systemd = init.map(|i| resolve(i).ends_with("systemd/systemd")).unwrap_or(false);
    Ok(RootfsInfo { os_name, init: init.map(|_| "/sbin/init".to_string()), systemd })
}

/// `a/b/../c` as `a/c`.
fn normalize_dots(p: &Path) -> String {
    let mut out: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(s) => out.push(s.to_string_lossy().into()),
            _ => {}
        }
    }
    out.join("/")
}

fn pretty_name(os_release: &str) -> String {
    let get = |k: &str| {
        os_release
            .lines()
            .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .map(|v| v.trim_matches('"').to_string())
    };
    get("PRETTY_NAME").or_else(|| get("NAME")).unwrap_or_default()
}

/// Reads a root filesystem tar (plain or gzip-compressed): the layer it
/// makes and what it holds.
pub fn inspect(path: &Path, what: &str) -> Result<(Layer, RootfsInfo)> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata()?.len();
    let mut magic = [0u8; 2];
    let gz = std::fs::File::open(path)?.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    let raw = Hashing::new(BufReader::with_capacity(1 << 20, file), Some(Progress::bytes(what, size)));
    let (digest, diff_id, info, progress) = if gz {
        let mut unzipped = Hashing::new(flate2::read::MultiGzDecoder::new(raw), None);
        let info = scan_tar(&mut unzipped)?;
        let diff_id = unzipped.digest();
        let raw = unzipped.inner.into_inner();
        (raw.digest(), diff_id, info, raw.progress)
    } else {
        let mut raw = raw;
        let info = scan_tar(&mut raw)?;
        (raw.digest(), raw.digest(), info, raw.progress)
    };
    if let Some(p) = progress {
        p.finish(if info.os_name.is_empty() { "read" } else { &info.os_name });
    }
    let layer = Layer {
        path: path.to_path_buf(),
        media_type: if gz { LAYER_TAR_GZIP } else { LAYER_TAR }.into(),
        digest,
        size,
        diff_id,
    };
    Ok((layer, info))
}

/// A tree built from a recipe, in the cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Built {
    pub tar: PathBuf,
    pub digest: String,
    pub size: u64,
    pub info: RootfsInfo,
    /// How long the build took, when this call built it.
    #[serde(skip)]
    pub built_now: Option<std::time::Duration>,
}

impl Built {
    pub fn layer(&self) -> Layer {
        Layer {
            path: self.tar.clone(),
            media_type: LAYER_TAR.into(),
            digest: self.digest.clone(),
            size: self.size,
            diff_id: self.digest.clone(),
        }
    }
}

/// The tree `recipe` makes, from `<cache_dir>/rootfs/<key>/`, built first
/// (with mmdebstrap, from the mirror) if it is not there.
pub fn ensure_built(recipe: &Recipe, cache_dir: &Path) -> Result<Built> {
    let parts = recipe.key_parts();
    let key = crate::cache::key(&parts.iter().map(|p| p.as_bytes()).collect::<Vec<_>>());
    let dir = cache_dir.join("rootfs").join(&key);
    let record = dir.join("rootfs.json");
    let cached = || -> Option<Built> {
        let b: Built = serde_json::from_slice(&std::fs::read(&record).ok()?).ok()?;
        b.tar.exists().then_some(b)
    };
    let describe = format!(
        "Debian {} ({} + {})",
        recipe.release,
        recipe.variant,
        if recipe.include.is_empty() { "nothing".into() } else { recipe.include.join(" ") }
    );
    if let Some(b) = cached() {
        eprintln!("==> {describe}: cached in {}", dir.display());
        return Ok(b);
    }
    let _lock = crate::cache::lock(&dir, &describe)?;
    if let Some(b) = cached() {
        return Ok(b);
    }
    let tar = dir.join("rootfs.tar");
    let partial = dir.join("rootfs.tar.partial");
    let mut progress = Progress::new(&format!("building {describe} with mmdebstrap from {}", recipe.mirror));
    if let Err(e) = recipe.build(&partial, &dir.join("mmdebstrap.log"), &mut progress) {
        progress.finish("failed");
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    let took = progress.finish("built");
    let (layer, info) = inspect(&partial, "reading the built tree")?;
    if info.init.is_none() {
        bail!("the tree built for {describe} has no /sbin/init: add systemd-sysv to the packages");
    }
    std::fs::rename(&partial, &tar)?;
    let built = Built { tar, digest: layer.digest, size: layer.size, info, built_now: Some(took) };
    std::fs::write(&record, serde_json::to_vec_pretty(&built)?)?;
    std::fs::write(dir.join("recipe.txt"), format!("{}\nbuild seconds: {}\n", parts.join("\n"), took.as_secs()))?;
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, Option<&str>, &[u8])], gzip: bool) -> PathBuf {
        let mut b = tar::Builder::new(Vec::new());
        for (path, link, data) in entries {
            let mut h = tar::Header::new_gnu();
            match link {
                Some(t) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    h.set_cksum();
                    b.append_link(&mut h, path, t).unwrap();
                }
                None => {
                    h.set_size(data.len() as u64);
                    h.set_mode(0o644);
                    h.set_cksum();
                    b.append_data(&mut h, path, *data).unwrap();
                }
            }
        }
        let bytes = b.into_inner().unwrap();
        let bytes = if gzip {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&bytes).unwrap();
            e.finish().unwrap()
        } else {
            bytes
        };
        // Tests run in parallel in one process: each tar gets a name of its own.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("hearth-rootfs-test-{}-{n}.tar", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn a_merged_usr_systemd_tree_is_recognised_plain_and_gzipped() {
        let entries: &[(&str, Option<&str>, &[u8])] = &[
            ("./sbin", Some("usr/sbin"), b""),
            ("./usr/sbin/init", Some("../lib/systemd/systemd"), b""),
            ("./usr/lib/systemd/systemd", None, b"ELF"),
            ("./etc/os-release", None, b"NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n"),
        ];
        for gz in [false, true] {
            let p = tar_of(entries, gz);
            let (layer, info) = inspect(&p, "test").unwrap();
            assert_eq!(info.os_name, "Debian GNU/Linux 12 (bookworm)");
            assert_eq!(info.init.as_deref(), Some("/sbin/init"));
            assert!(info.systemd, "{info:?}");
            assert_eq!(layer.media_type, if gz { LAYER_TAR_GZIP } else { LAYER_TAR });
            assert_eq!(gz, layer.digest != layer.diff_id, "only a compressed layer has two digests");
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn a_busybox_tree_has_a_non_systemd_init_and_garbage_is_refused() {
        let p = tar_of(&[("bin/busybox", None, b"x"), ("sbin/init", Some("../bin/busybox"), b"")], false);
        let (_, info) = inspect(&p, "test").unwrap();
        assert_eq!((info.init.as_deref(), info.systemd, info.os_name.as_str()), (Some("/sbin/init"), false, ""));
        std::fs::write(&p, vec![b'x'; 2048]).unwrap();
        let e = format!("{:#}", inspect(&p, "test").unwrap_err());
        assert!(e.contains("root filesystem tar"), "{e}");
        std::fs::remove_file(p).unwrap();
    }
}
