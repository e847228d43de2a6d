//! The tuned guest kernel: Debian's linux-source-6.12, `make tinyconfig`,
//! plus kernel/hearth.config, built out of tree and cached under
//! `<cache>/kernel/<key>/`, the key hashing the fragment, the source package
//! version and this recipe.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::paths;
use crate::sh::{self, cmd};
use hearth_rootfs::progress::Progress;

pub const SOURCE_PACKAGE: &str = "linux-source-6.12";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";
/// Bump when the recipe below changes in a way that changes the output.
const RECIPE: &str = "tinyconfig+fragment+olddefconfig v1";

/// A built kernel.
pub struct Kernel {
    pub dir: PathBuf,
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    /// What `uname -r` prints in the guest.
    pub release: String,
}

pub fn fragment_path() -> PathBuf {
    paths::workspace().join("kernel/hearth.config")
}

fn source_version() -> Result<String> {
    sh::output(cmd("dpkg-query").args(["-W", "-f", "${Version}", SOURCE_PACKAGE]))
        .with_context(|| format!("{SOURCE_PACKAGE} is not installed: run `cargo xtask setup`"))
}

fn cache_dir() -> Result<PathBuf> {
    let fragment = std::fs::read(fragment_path()).context("reading kernel/hearth.config")?;
    let key = sh::key(&[&fragment, source_version()?.as_bytes(), RECIPE.as_bytes()]);
    Ok(paths::cache().join("kernel").join(key))
}

/// The cached kernel, if it was built for the current inputs.
pub fn find() -> Result<Kernel> {
    let dir = cache_dir()?;
    let release = std::fs::read_to_string(dir.join("release"))
        .with_context(|| format!("no tuned kernel in {}: run `cargo xtask setup`", dir.display()))?;
    Ok(Kernel { vmlinux: dir.join("vmlinux"), bzimage: dir.join("bzImage"), release: release.trim().to_string(), dir })
}

/// Builds the kernel unless the cache already has it.
pub fn ensure() -> Result<Kernel> {
    if let Ok(k) = find() {
        eprintln!("==> tuned kernel {} (cached in {})", k.release, k.dir.display());
        return Ok(k);
    }
    let dir = cache_dir()?;
    let version = source_version()?;
    let src = unpack_source(&version)?;
    let build = paths::cache().join("kernel").join(format!("build-{}", dir.file_name().unwrap().to_string_lossy()));
    std::fs::create_dir_all(&build)?;
    let make = |args: &[&str]| {
        let mut c = cmd("make");
        c.current_dir(&src).arg("ARCH=x86_64").arg(format!("O={}", build.display())).args(args);
        c
    };

    sh::run(make(&["-s", "tinyconfig"]).stdout(Stdio::null()))?;
    sh::run(
        cmd(src.join("scripts/kconfig/merge_config.sh"))
            .current_dir(&build)
            .args(["-m", ".config"])
            .arg(fragment_path())
            .stdout(Stdio::null()),
    )?;
    sh::run(make(&["-s", "olddefconfig"]).stdout(Stdio::null()))?;
    verify_config(&build.join(".config"))?;

    let jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let started = Instant::now();
    let mut progress =
        Progress::new(&format!("building the tuned kernel from {SOURCE_PACKAGE} {version} (~10 min on 2 cores)"));
    let mut child = make(&[&format!("-j{jobs}"), "vmlinux", "bzImage"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting make")?;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        if let Some(file) = line.trim_start().strip_prefix("CC") {
            progress.tick(file.trim());
        }
    }
    if !child.wait()?.success() {
        bail!("the kernel build failed; the log is above, the build tree in {}", build.display());
    }
    let took = progress.finish("done");
    let release = sh::output(&mut make(&["-s", "kernelrelease"]))?;

    std::fs::create_dir_all(&dir)?;
    std::fs::copy(build.join("vmlinux"), dir.join("vmlinux"))?;
    std::fs::copy(build.join("arch/x86/boot/bzImage"), dir.join("bzImage"))?;
    std::fs::copy(build.join(".config"), dir.join("config"))?;
    let info = format!(
        "source: {SOURCE_PACKAGE} {version}\nrelease: {release}\nbuild seconds: {}\njobs: {jobs}\nvmlinux bytes: {}\nbzImage bytes: {}\n",
        took.as_secs(),
        std::fs::metadata(dir.join("vmlinux"))?.len(),
        std::fs::metadata(dir.join("bzImage"))?.len(),
    );
    std::fs::write(dir.join("build-info.txt"), &info)?;
    // Written last: its presence marks a complete artefact.
    sh::write_atomic(&dir.join("release"), release.as_bytes())?;
    eprintln!("{info}    built in {:.0}s", started.elapsed().as_secs_f64());
    find()
}

fn unpack_source(version: &str) -> Result<PathBuf> {
    let root = paths::cache().join("kernel").join(format!("src-{version}"));
    let src = root.join("linux-source-6.12");
    if root.join(".unpacked").exists() {
        return Ok(src);
    }
    if !Path::new(SOURCE_TARBALL).exists() {
        bail!("{SOURCE_TARBALL} is missing: run `cargo xtask setup` (it installs {SOURCE_PACKAGE})");
    }
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let p = Progress::new(&format!("unpacking {SOURCE_TARBALL}"));
    sh::run(cmd("tar").arg("-xf").arg(SOURCE_TARBALL).arg("-C").arg(&root))?;
    std::fs::write(root.join(".unpacked"), "")?;
    p.finish("done");
    Ok(src)
}

/// Every `CONFIG_X=...` line of the fragment must be in the final .config: a
/// line Kconfig dropped means a dependency is missing, and the guest would
/// silently lack a feature. A `# CONFIG_X is not set` line only fails if X
/// ended up set (a symbol whose dependencies are off is absent: also unset).
pub fn verify_config(config: &Path) -> Result<()> {
    let fragment = std::fs::read_to_string(fragment_path())?;
    let final_cfg = std::fs::read_to_string(config)?;
    let have: std::collections::HashSet<&str> = final_cfg.lines().collect();
    let mut wrong = Vec::new();
    for line in fragment.lines().map(str::trim) {
        if line.starts_with("CONFIG_") {
            if !have.contains(line) {
                wrong.push(format!("{line} (wanted, but not in the final config)"));
            }
        } else if let Some(sym) = line.strip_prefix("# ").and_then(|l| l.strip_suffix(" is not set")) {
            if let Some(set) = final_cfg.lines().find(|l| l.starts_with(&format!("{sym}="))) {
                wrong.push(format!("{set} (the fragment turns it off)"));
            }
        }
    }
    if !wrong.is_empty() {
        bail!(
            "kernel/hearth.config and the final config disagree (a dependency is off, or something selects it):\n  {}",
            wrong.join("\n  ")
        );
    }
    Ok(())
}
