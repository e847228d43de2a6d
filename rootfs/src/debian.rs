//! Debian root filesystems made by mmdebstrap from a Debian mirror: the
//! `debian` distro's recipe, and the xtask's Debian test images.
//!
//! The output is an uncompressed tar of the root filesystem: merged /usr,
//! documentation, man pages and locales left out as in Debian's -slim images
//! (the dpkg filters stay for later installs), no device nodes (the runtime
//! makes /dev), no /etc/hostname or /etc/resolv.conf (the runtime provides
//! them). With a fixed `SOURCE_DATE_EPOCH`, the same mirror contents give
//! the same tar.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::progress::Progress;

pub const MIRROR: &str = "http://deb.debian.org/debian";
/// Bump when the recipe below changes in a way that changes the output.
pub const RECIPE: &str = "mmdebstrap root merged-usr slim no-dev v1";
/// mmdebstrap clamps every mtime to this and removes unreproducible files.
const SOURCE_DATE_EPOCH: &str = "1704067200";
/// dpkg path filters, as Debian's -slim images have them.
const DPKG_PATHS: &[&str] = &[
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/locale/*",
];
/// The runtime provides these: mmdebstrap copies the build host's.
const CUSTOMIZE_HOOK: &str = r#"rm -f "$1/etc/resolv.conf" "$1/etc/hostname""#;

/// The packages every `debian` distro gets beside minbase: systemd as init
/// with logind and D-Bus, and the tools people reach for first.
pub const DISTRO_PACKAGES: &[&str] =
    &["systemd", "systemd-sysv", "dbus", "libpam-systemd", "procps", "iproute2", "less", "ca-certificates"];

/// Units a distro in hearth's VM has no use for, masked so that its boot
/// does not spend time on them: the tuned kernel has every module built in
/// (modprobe@, systemd-modules-load), and there is no LVM to scrub
/// (e2scrub_reap, when e2fsprogs is installed).
pub const DISTRO_MASKED_UNITS: &[&str] = &["modprobe@.service", "systemd-modules-load.service", "e2scrub_reap.service"];

/// The recipe of `hearth distro install debian --release R --include P`.
pub fn distro_recipe(release: &str, include: &[String], mirror: &str) -> Recipe {
    let mut packages: Vec<&str> = DISTRO_PACKAGES.to_vec();
    packages.extend(include.iter().map(String::as_str));
    let mut r = Recipe::new(release, "minbase", &packages, mirror);
    r.customize =
        DISTRO_MASKED_UNITS.iter().map(|u| format!(r#"ln -sf /dev/null "$1/etc/systemd/system/{u}""#)).collect();
    r
}

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    /// The suite: bookworm, trixie...
    pub release: String,
    /// mmdebstrap's package set: minbase (Essential and Priority: required),
    /// important, standard...
    pub variant: String,
    /// More packages (`--include`), sorted and without duplicates.
    pub include: Vec<String>,
    pub mirror: String,
    /// Shell commands run in the finished tree (`--customize-hook`), `$1`
    /// being its root.
    pub customize: Vec<String>,
}

impl Recipe {
    pub fn new(release: &str, variant: &str, include: &[&str], mirror: &str) -> Recipe {
        let mut include: Vec<String> = include.iter().map(|s| s.to_string()).collect();
        include.sort_unstable();
        include.dedup();
        Recipe { release: release.into(), variant: variant.into(), include, mirror: mirror.into(), customize: vec![] }
    }

    /// The parts that decide the output, for a cache key. The mirror's later
    /// changes to the suite are not among them: a new point release does not
    /// rebuild a cached tree.
    pub fn key_parts(&self) -> Vec<String> {
        let mut parts = vec![
            RECIPE.into(),
            self.mirror.clone(),
            self.release.clone(),
            self.variant.clone(),
            self.include.join(","),
        ];
        if !self.customize.is_empty() {
            parts.push(self.customize.join("\n"));
        }
        parts
    }

    /// Runs mmdebstrap (as root, from the mirror), writing the root
    /// filesystem as a tar to `out` and mmdebstrap's log to `log`; each log
    /// line ticks `progress`.
    pub fn build(&self, out: &Path, log_path: &Path, progress: &mut Progress) -> Result<()> {
        let mut mm = Command::new("mmdebstrap");
        mm.arg("--verbose")
            .arg(format!("--variant={}", self.variant))
            .args(["--mode=root", "--format=tar"])
            // Merged /usr by symlinks, without the usrmerge package (and the perl it pulls in).
            .arg("--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr")
            .arg(r#"--aptopt=Acquire::Languages "none""#)
            .args(DPKG_PATHS.iter().map(|p| format!("--dpkgopt={p}")))
            .arg(format!("--customize-hook={CUSTOMIZE_HOOK}"))
            .args(self.customize.iter().map(|h| format!("--customize-hook={h}")));
        if !self.include.is_empty() {
            mm.arg(format!("--include={}", self.include.join(",")));
        }
        mm.args([self.release.as_str(), "-", self.mirror.as_str()])
            .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = mm.spawn().context(
            "starting mmdebstrap (is it installed? `apt-get install mmdebstrap`; `cargo xtask setup` installs it)",
        )?;
        // mmdebstrap's tar starts with device nodes for /dev; the runtime
        // mounts its own /dev, so the tree keeps only the empty directory.
        let mut filter = Command::new("mmtarfilter")
            .arg("--path-exclude=/dev/*")
            .stdin(child.stdout.take().unwrap())
            .stdout(std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?)
            .spawn()
            .context("starting mmtarfilter (part of mmdebstrap)")?;
        let mut log = std::io::BufWriter::new(std::fs::File::create(log_path)?);
        let mut tail = VecDeque::new();
        for line in BufReader::new(child.stderr.take().unwrap()).split(b'\n') {
            let line = String::from_utf8_lossy(&line?).trim_end().to_string();
            writeln!(log, "{line}")?;
            progress.tick(&line);
            if tail.len() == 40 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        log.flush()?;
        let status = child.wait()?;
        let filtered = filter.wait()?;
        if !status.success() || !filtered.success() {
            for line in &tail {
                eprintln!("    {line}");
            }
            bail!(
                "mmdebstrap ({status}) | mmtarfilter ({filtered}) failed building Debian {} (its last lines are above; \
                 the whole log: {}). Is {} reachable, and does the release exist?",
                self.release,
                log_path.display(),
                self.mirror
            );
        }
        Ok(())
    }
}
