//! Container images built locally (no registry is reachable): an OCI image
//! archive that `ctr images import` takes. The test and demo image is busybox
//! with hearth's guest tool, tagged `docker.io/hearth/busybox:latest`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::{paths, sh};

pub const BUSYBOX_IMAGE: &str = "docker.io/hearth/busybox:latest";

fn sha256(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// Writes a blob into the layout and returns its descriptor fields.
fn blob(layout: &Path, data: &[u8]) -> Result<(String, usize)> {
    let digest = sha256(data);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(&digest), data)?;
    Ok((format!("sha256:{digest}"), data.len()))
}

/// The busybox image archive, cached by its inputs.
pub fn ensure_busybox(guest_tool: &Path) -> Result<PathBuf> {
    let busybox =
        std::fs::read(crate::testhost::BUSYBOX).context("busybox-static is not installed: run `cargo xtask setup`")?;
    let tool = std::fs::read(guest_tool)?;
    let key = sh::key(&[b"busybox-image-v1", &busybox, &tool]);
    let out = paths::cache().join("images").join(key).join("busybox-oci.tar");
    if out.exists() {
        return Ok(out);
    }
    let work = out.with_file_name("work");
    let _ = std::fs::remove_dir_all(&work);
    let rootfs = work.join("rootfs");
    hearth_e2e::agent::busybox_rootfs(&rootfs, guest_tool)?;
    // The layer: a reproducible tar (fixed owner and times), gzipped.
    let layer_tar = work.join("layer.tar");
    sh::run(
        Command::new("tar")
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner", "--mtime=@0", "-C"])
            .arg(&rootfs)
            .arg("-cf")
            .arg(&layer_tar)
            .arg("."),
    )?;
    let diff_id = format!("sha256:{}", sha256(&std::fs::read(&layer_tar)?));
    sh::run(Command::new("gzip").args(["-n", "-f"]).arg(&layer_tar))?;
    let layer = std::fs::read(work.join("layer.tar.gz"))?;
    let layout = work.join("layout");
    let (layer_digest, layer_size) = blob(&layout, &layer)?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]}
    });
    let (config_digest, config_size) = blob(&layout, &serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}]
    });
    let (manifest_digest, manifest_size) = blob(&layout, &serde_json::to_vec(&manifest)?)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": BUSYBOX_IMAGE, "org.opencontainers.image.ref.name": "latest"}
        }]
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion": "1.0.0"}"#)?;
    let tmp = out.with_extension("tmp");
    sh::run(Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(&tmp).arg("."))?;
    std::fs::rename(&tmp, &out)?;
    let _ = std::fs::remove_dir_all(&work);
    eprintln!("==> image {BUSYBOX_IMAGE}: {} ({} KiB)", out.display(), std::fs::metadata(&out)?.len() / 1024);
    Ok(out)
}
