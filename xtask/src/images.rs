//! Container images built locally (no registry is reachable): OCI image
//! archives that `ctr images import` takes, cached under
//! `<cache>/images/<key>/`, the key hashing their inputs.
//!
//! - `docker.io/hearth/busybox:latest`: busybox with hearth's guest tool, the
//!   test and demo image.
//! - `docker.io/hearth/pause:latest`: a pod sandbox's image for the CRI
//!   (`sandbox_image`), whose one file `/pause` is the guest tool, which
//!   acts as Kubernetes' pause when run under that name.
//! - `docker.io/hearth/debian:bookworm`: a Debian minbase made by mmdebstrap
//!   from deb.debian.org, for tests that need a real distribution (glibc,
//!   bash, apt, dpkg). [`Debian`] describes more such images (other releases,
//!   more packages).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::{paths, sh};
use hearth_rootfs::cache::lock;
use hearth_rootfs::debian::{self, Recipe};
use hearth_rootfs::progress::Progress;

pub const BUSYBOX_IMAGE: &str = "docker.io/hearth/busybox:latest";
pub const PAUSE_IMAGE: &str = hearth_e2e::PAUSE_IMAGE;

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn sha256(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

/// Writes a blob into the layout and returns its descriptor fields.
fn blob(layout: &Path, data: &[u8]) -> Result<(String, usize)> {
    let digest = sha256(data);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(&digest), data)?;
    Ok((format!("sha256:{digest}"), data.len()))
}

/// Moves a file into the layout as a blob and returns its descriptor fields.
fn blob_file(layout: &Path, file: &Path) -> Result<(String, usize)> {
    let digest = sha256_file(file)?;
    let size = std::fs::metadata(file)?.len() as usize;
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir)?;
    std::fs::rename(file, dir.join(&digest))?;
    Ok((format!("sha256:{digest}"), size))
}

/// Makes `out`, an OCI image layout in a tar that `docker load` also takes,
/// of one layer (`layer_tar`, an
/// uncompressed tar of the root filesystem, consumed) tagged `reference`,
/// running `cmd` by default. `work` is scratch space.
fn write_archive(work: &Path, layer_tar: &Path, reference: &str, cmd: &[&str], out: &Path) -> Result<()> {
    let tag = reference.rsplit_once(':').map(|(_, t)| t).context("an image reference needs a tag")?;
    let diff_id = format!("sha256:{}", sha256_file(layer_tar)?);
    sh::run(Command::new("gzip").args(["-n", "-f"]).arg(layer_tar))?;
    let layout = work.join("layout");
    let (layer_digest, layer_size) = blob_file(&layout, &layer_tar.with_extension("tar.gz"))?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": [PATH_ENV], "Cmd": cmd},
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
            "annotations": {"io.containerd.image.name": reference, "org.opencontainers.image.ref.name": tag}
        }]
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion": "1.0.0"}"#)?;
    // What `docker load` reads (Docker 26 needs it beside the OCI layout,
    // as its own `docker save` writes it); containerd reads index.json.
    let blob_path = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    let docker_manifest = serde_json::json!([{
        "Config": blob_path(&config_digest),
        "RepoTags": [reference],
        "Layers": [blob_path(&layer_digest)]
    }]);
    std::fs::write(layout.join("manifest.json"), serde_json::to_vec(&docker_manifest)?)?;
    let tmp = out.with_extension("tmp");
    reproducible_tar(&layout, &tmp)?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// Tars `dir`'s contents into `out` the same way every time: sorted names,
/// owner 0, mtime 0.
fn reproducible_tar(dir: &Path, out: &Path) -> Result<()> {
    sh::run(
        Command::new("tar")
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner", "--mtime=@0", "-C"])
            .arg(dir)
            .arg("-cf")
            .arg(out)
            .arg("."),
    )
}

/// The busybox image archive, cached by its inputs.
pub fn ensure_busybox(guest_tool: &Path) -> Result<PathBuf> {
    let busybox =
        std::fs::read(crate::testhost::BUSYBOX).context("busybox-static is not installed: run `cargo xtask setup`")?;
    let tool = std::fs::read(guest_tool)?;
    let key = sh::key(&[b"busybox-image-v2", &busybox, &tool]);
    ensure_one_layer(&key, "busybox-oci.tar", BUSYBOX_IMAGE, &["sh"], |rootfs| {
        hearth_e2e::agent::busybox_rootfs(rootfs, guest_tool)
    })
}

/// The pause image archive, cached by its inputs.
pub fn ensure_pause(guest_tool: &Path) -> Result<PathBuf> {
    let tool = std::fs::read(guest_tool)?;
    let key = sh::key(&[b"pause-image-v1", &tool]);
    ensure_one_layer(&key, "pause-oci.tar", PAUSE_IMAGE, &["/pause"], |rootfs| {
        std::fs::create_dir_all(rootfs)?;
        std::fs::copy(guest_tool, rootfs.join("pause")).context("copying hearth-guest-tool as /pause")?;
        Ok(())
    })
}

/// An image archive of one layer, `<cache>/images/<key>/<file>`, tagged
/// `reference` and running `cmd`, whose root `fill` makes; built once
/// (under a lock, for concurrent callers) and cached by `key`.
fn ensure_one_layer(
    key: &str,
    file: &str,
    reference: &str,
    cmd: &[&str],
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let out = paths::cache().join("images").join(key).join(file);
    if out.exists() {
        return Ok(out);
    }
    let _lock = lock(out.parent().unwrap(), reference)?;
    if out.exists() {
        return Ok(out);
    }
    let work = out.with_file_name("work");
    let _ = std::fs::remove_dir_all(&work);
    let rootfs = work.join("rootfs");
    fill(&rootfs)?;
    // The layer: a reproducible tar (fixed owner and times).
    let layer_tar = work.join("layer.tar");
    reproducible_tar(&rootfs, &layer_tar)?;
    write_archive(&work, &layer_tar, reference, cmd, &out)?;
    let _ = std::fs::remove_dir_all(&work);
    eprintln!("==> image {reference}: {} ({} KiB)", out.display(), std::fs::metadata(&out)?.len() / 1024);
    Ok(out)
}

/// A Debian image that mmdebstrap makes from deb.debian.org.
pub struct Debian<'a> {
    /// What the archive is tagged (`ctr images import` names it so).
    pub reference: &'a str,
    /// The suite: bookworm, trixie...
    pub release: &'a str,
    /// mmdebstrap's package set: minbase (Essential and Priority: required),
    /// important, standard...
    pub variant: &'a str,
    /// More packages (`--include`), e.g. systemd for an image booting it.
    pub include: &'a [&'a str],
    /// The image's default command.
    pub cmd: &'a [&'a str],
}

/// The test image: plain Debian 12 minbase, bash by default.
pub const DEBIAN: Debian<'static> = Debian {
    reference: hearth_e2e::DEBIAN_IMAGE,
    release: "bookworm",
    variant: "minbase",
    include: &[],
    cmd: &["/bin/bash"],
};

/// A Debian image archive, cached by its recipe (release, variant, packages,
/// tag, command); the mirror's later changes to the suite do not rebuild it.
/// Needs root, mmdebstrap (`cargo xtask setup` installs it) and the mirror.
pub fn ensure_debian(image: &Debian) -> Result<PathBuf> {
    let recipe = Recipe::new(image.release, image.variant, image.include, debian::MIRROR);
    let mut parts = recipe.key_parts();
    // v2: with docker load's manifest.json.
    parts.push("image-v2".to_string());
    parts.push(image.reference.to_string());
    parts.push(image.cmd.join("\0"));
    let key = sh::key(&parts.iter().map(|p| p.as_bytes()).collect::<Vec<_>>());
    // docker.io/hearth/debian:bookworm -> debian-oci.tar
    let name = image.reference.rsplit_once(':').map_or(image.reference, |(r, _)| r);
    let name = name.rsplit('/').next().unwrap_or(name);
    let out = paths::cache().join("images").join(key).join(format!("{name}-oci.tar"));
    let cached = |out: &Path| {
        let hit = out.exists();
        if hit {
            eprintln!("==> image {} (cached in {})", image.reference, out.display());
        }
        hit
    };
    if cached(&out) {
        return Ok(out);
    }
    let _lock = lock(out.parent().unwrap(), image.reference)?;
    if cached(&out) {
        return Ok(out);
    }
    let work = out.with_file_name("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let layer_tar = work.join("layer.tar");
    let packages = if recipe.include.is_empty() { String::new() } else { format!(" + {}", recipe.include.join(" ")) };
    let mut progress = Progress::new(&format!(
        "building {} (mmdebstrap {} {}{packages}, ~1 min)",
        image.reference, image.release, image.variant
    ));
    if let Err(e) = recipe.build(&layer_tar, &work.join("mmdebstrap.log"), &mut progress) {
        progress.finish("failed");
        return Err(e);
    }
    let rootfs_bytes = std::fs::metadata(&layer_tar)?.len();
    progress.tick("compressing the layer");
    write_archive(&work, &layer_tar, image.reference, image.cmd, &out)?;
    let archive_bytes = std::fs::metadata(&out)?.len();
    let took =
        progress.finish(&format!("{} MiB root filesystem, {} MiB archive", rootfs_bytes >> 20, archive_bytes >> 20));
    std::fs::write(
        out.with_file_name("build-info.txt"),
        format!(
            "reference: {}\nrelease: {}\nvariant: {}\ninclude: {}\ncmd: {:?}\nmirror: {}\nrecipe: {}\n\
             build seconds: {}\nrootfs tar bytes: {rootfs_bytes}\narchive bytes: {archive_bytes}\n",
            image.reference,
            image.release,
            image.variant,
            recipe.include.join(" "),
            image.cmd,
            debian::MIRROR,
            debian::RECIPE,
            took.as_secs(),
        ),
    )?;
    let _ = std::fs::remove_dir_all(&work);
    eprintln!("==> image {}: {}", image.reference, out.display());
    Ok(out)
}

/// The root filesystem of the `distro` suite's Debian (systemd, Docker,
/// FUSE), in the cache where `hearth distro install` looks: built here, so
/// that the suite, in the test host without a route to the mirror, finds it.
pub fn ensure_suite_distro() -> Result<PathBuf> {
    use hearth_e2e::distro::{DISTRO_INCLUDE, DISTRO_RELEASE};
    let include: Vec<String> = DISTRO_INCLUDE.iter().map(|s| s.to_string()).collect();
    let recipe = debian::distro_recipe(DISTRO_RELEASE, &include, debian::MIRROR);
    Ok(hearth_rootfs::tree::ensure_built(&recipe, &paths::cache())?.tar)
}
