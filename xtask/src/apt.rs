//! Debian packages for `cargo xtask setup`: Debian 12's own, and any that
//! must come from another suite of the same mirror (bookworm-backports,
//! trixie), pinned so that only the packages named here come from there.

use anyhow::{Context, Result};

use crate::sh::{self, cmd};

/// The release our machines run.
const RELEASE: &str = "bookworm";

/// Debian packages, each with why it is needed.
const PACKAGES: &[(&str, &str)] = &[
    ("linux-source-6.12", "source of the tuned guest kernel"),
    ("build-essential", "kernel build"),
    ("flex", "kernel build"),
    ("bison", "kernel build"),
    ("bc", "kernel build"),
    ("libelf-dev", "kernel build (objtool)"),
    ("libssl-dev", "kernel build"),
    ("lz4", "the bzImage is lz4-compressed for a fast boot"),
    ("xz-utils", "unpacking the kernel source"),
    ("busybox-static", "userland of the boot initramfs and of the test host"),
    ("runc", "the reference that `cargo xtask bench agent` measures hearth-agent against"),
    ("containerd", "containerd and ctr, which drive the shim (e2e containerd, the demo)"),
    ("qemu-system-x86", "the test host, and the reference VMM of `bench boot`"),
    ("e2fsprogs", "ext4 images for the guest's disks (mke2fs -d, debugfs)"),
    ("erofs-utils", "mkfs.erofs: the shim's erofs images of containers' layers (shim/src/layers.rs)"),
    ("dmsetup", "device-mapper thin pools for containerd's devmapper snapshotter (e2e containerd)"),
    ("libseccomp-dev", "building virtiofsd, and libseccomp.a for the static hearth-agent"),
    ("libcap-ng-dev", "building virtiofsd"),
    ("iproute2", "taps for virtio-net in the e2e suites; the shim's bridge and taps for the VM's network"),
    ("nftables", "nft, with which the shim masquerades the VMs' network (docs/networking.md)"),
    (
        "containernetworking-plugins",
        "CNI's bridge, host-local and portmap, run by the network suite as the CRI runs them",
    ),
    ("iptables", "CNI's portmap plugin programs the host's NAT with it (iptables-nft)"),
    ("curl", "Docker's API over its socket in the docker suite (a terminal's resize)"),
    ("docker-registry", "a local registry on loopback, which the docker suite pushes to and pulls from"),
    ("mmdebstrap", "the Debian test image (docker.io/hearth/debian) and the distros, made as root from the mirror"),
    (
        "protobuf-compiler",
        "protoc, which generates containerd's gRPC API bindings for the hearth CLI (containerd-client)",
    ),
];

/// Packages taken from another suite of the same mirror.
struct Pin {
    suite: &'static str,
    /// Only these come from `suite`; everything else stays Debian 12's.
    packages: &'static [&'static str],
    why: &'static str,
}

/// Docker 26 from Debian 13: Debian 12's docker.io is 20.10, which cannot
/// name a shim v2 runtime. Its own dependencies (containerd, runc, tini,
/// iptables) stay Debian 12's. QEMU stays Debian 12's 7.2: QEMU 10 from
/// bookworm-backports ran the suites no faster (docs/testing.md). A pin
/// names the package and every dependency that must come at the suite's
/// version.
const PINS: &[Pin] = &[Pin {
    suite: "trixie",
    packages: &["docker.io", "docker-cli"],
    why: "Docker 26 (docker.io, docker-cli), which runs hearth as a shim v2 runtime (e2e docker)",
}];

/// A package of a pinned suite that is unpacked into the cache rather than
/// installed, so that Debian 12's own version stays the system's.
pub struct Unpacked {
    pub package: &'static str,
    /// One of the [`PINS`]' suites (apt knows it, at priority 1).
    pub suite: &'static str,
    pub why: &'static str,
}

/// containerd 1.7 for the cri suite: the issue asks for hearth to work with
/// both Debian 12's 1.6 (what `ctr` users there have, which the containerd
/// and docker suites run) and 1.7; installing 1.7 would leave 1.6 untried.
/// Its binaries need only glibc 2.34 and run on Debian 12.
pub const CONTAINERD_CRI: Unpacked = Unpacked {
    package: "containerd",
    suite: "trixie",
    why: "containerd 1.7 with its CRI plugin, which the cri suite runs beside Debian 12's 1.6",
};

/// The version of `u.package` in its suite, from `apt-cache madison`.
fn suite_version(u: &Unpacked) -> Result<String> {
    let out = sh::output(cmd("apt-cache").args(["madison", u.package]))?;
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').map(str::trim).collect();
            (f.len() == 3 && f[2].contains(&format!(" {}/", u.suite))).then(|| f[1].to_string())
        })
        .next()
        .with_context(|| {
            format!(
                "apt knows no {} in {}: run `cargo xtask setup` (it adds the {} sources)",
                u.package, u.suite, u.suite
            )
        })
}

/// The directory `u`'s package is unpacked in (its `usr/bin` holds the
/// binaries), downloaded and unpacked once per version.
pub fn unpacked(u: &Unpacked) -> Result<std::path::PathBuf> {
    let cache = crate::paths::cache().join("debs");
    // Offline, the newest one unpacked before serves.
    let version = match suite_version(u) {
        Ok(v) => v,
        Err(e) => {
            let prefix = format!("{}_", u.package);
            let mut have: Vec<_> = std::fs::read_dir(&cache)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join(".unpacked").exists())
                .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix)))
                .collect();
            have.sort();
            return have.pop().ok_or(e);
        }
    };
    let dir = cache.join(format!("{}_{}", u.package, version.replace([':', '~'], "_")));
    if dir.join(".unpacked").exists() {
        return Ok(dir);
    }
    eprintln!("==> {} {version} from {}, unpacked into {} ({})", u.package, u.suite, dir.display(), u.why);
    let download = cache.join("download");
    let _ = std::fs::remove_dir_all(&download);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&download)?;
    // apt's sandbox user cannot write into root's cache.
    sh::run(
        cmd("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root", &format!("{}={version}", u.package)])
            .current_dir(&download),
    )
    .with_context(|| format!("downloading {} {version} from {}", u.package, u.suite))?;
    let deb = std::fs::read_dir(&download)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    sh::run(cmd("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
    std::fs::write(dir.join(".unpacked"), &version)?;
    let _ = std::fs::remove_dir_all(&download);
    Ok(dir)
}

/// The URI apt already fetches Debian 12 from, so that the pinned suites
/// come from the same mirror.
fn mirror() -> Result<String> {
    let mut texts = vec![std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in dir.flatten() {
            let p = e.path();
            let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
            if !name.starts_with("hearth-") && (name.ends_with(".sources") || name.ends_with(".list")) {
                texts.push(std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
    }
    texts.iter().find_map(|t| find_mirror(t)).with_context(|| {
        format!("no apt source serves Debian {RELEASE}'s main component: check /etc/apt/sources.list*")
    })
}

/// The URI of a `deb` entry for RELEASE's main component, in the one-line
/// format or deb822 (stanzas of `Key: value` lines).
fn find_mirror(text: &str) -> Option<String> {
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        // deb [options] URI SUITE COMPONENTS...
        let mut rest: Vec<&str> = words.collect();
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            let Some(end) = rest.iter().position(|w| w.ends_with(']')) else { continue };
            rest.drain(..=end);
        }
        if rest.len() >= 3 && rest[1] == RELEASE && rest[2..].contains(&"main") {
            return Some(rest[0].to_string());
        }
    }
    for stanza in text.split("\n\n") {
        let field = |k: &str| {
            stanza.lines().find_map(|l| {
                let (key, v) = l.split_once(':')?;
                key.trim().eq_ignore_ascii_case(k).then(|| v.trim().to_string())
            })
        };
        let types = field("Types").unwrap_or_default();
        let suites = field("Suites").unwrap_or_default();
        let components = field("Components").unwrap_or_default();
        if types.split_whitespace().any(|t| t == "deb")
            && suites.split_whitespace().any(|s| s == RELEASE)
            && components.split_whitespace().any(|c| c == "main")
        {
            return field("URIs")?.split_whitespace().next().map(String::from);
        }
    }
    None
}

/// The source and preference files of a pin.
fn pin_files(pin: &Pin, mirror: &str) -> [(String, String); 2] {
    let sources = format!(
        "# Written by `cargo xtask setup` (hearth): {why}.\nTypes: deb\nURIs: {mirror}\nSuites: {suite}\n\
         Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        why = pin.why,
        suite = pin.suite
    );
    // Everything of the suite at priority 1 (never chosen by itself), the
    // named packages above Debian 12's own.
    let prefs = format!(
        "# Written by `cargo xtask setup` (hearth): only these packages come from {suite}.\n\
         Package: *\nPin: release n={suite}\nPin-Priority: 1\n\n\
         Package: {pkgs}\nPin: release n={suite}\nPin-Priority: 990\n",
        suite = pin.suite,
        pkgs = pin.packages.join(" ")
    );
    [
        (format!("/etc/apt/sources.list.d/hearth-{}.sources", pin.suite), sources),
        (format!("/etc/apt/preferences.d/hearth-{}.pref", pin.suite), prefs),
    ]
}

/// Writes the pins' apt files; true if any changed (apt's lists are then stale).
fn write_pins() -> Result<bool> {
    if PINS.is_empty() {
        return Ok(false);
    }
    let mirror = mirror()?;
    let mut changed = false;
    for pin in PINS {
        for (path, text) in pin_files(pin, &mirror) {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                std::fs::write(&path, text).with_context(|| format!("writing {path} (setup needs root)"))?;
                changed = true;
            }
        }
    }
    Ok(changed)
}

fn installed_version(pkg: &str) -> Option<String> {
    let out = cmd("dpkg-query").args(["-W", "-f", "${db:Status-Status} ${Version}", pkg]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.strip_prefix("installed ").map(str::to_string)
}

/// apt's candidate of `pkg` (the pinned suite's version, for a pinned one).
fn candidate(pkg: &str) -> Option<String> {
    let out = sh::output(cmd("apt-cache").args(["policy", pkg])).ok()?;
    out.lines().find_map(|l| l.trim().strip_prefix("Candidate: ")).map(str::to_string).filter(|v| v != "(none)")
}

/// The packages to install: missing ones, and pinned ones missing or at
/// another version than their pin's.
fn wanted() -> Vec<&'static str> {
    let mut want: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).filter(|p| installed_version(p).is_none()).collect();
    for pin in PINS {
        for p in pin.packages {
            let have = installed_version(p);
            if (have.is_none() || have != candidate(p)) && !want.contains(p) {
                want.push(p);
            }
        }
    }
    want
}

fn apt_get(args: &[&str]) -> Result<()> {
    sh::run(cmd("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive"))
        .with_context(|| format!("apt-get {} (setup needs root)", args.join(" ")))
}

/// Installs what is missing, pins included; idempotent and quiet when all is there.
pub fn ensure() -> Result<()> {
    let lists_stale = write_pins()?;
    if lists_stale {
        eprintln!(
            "==> apt: {} pinned; updating the package lists",
            PINS.iter().map(|p| p.suite).collect::<Vec<_>>().join(", ")
        );
        apt_get(&["update", "-q"])?;
    }
    let mut want = wanted();
    if want.is_empty() {
        eprintln!("==> Debian packages: all {} present, pins at their versions", PACKAGES.len());
        return Ok(());
    }
    if !lists_stale {
        apt_get(&["update", "-q"])?;
        want = wanted();
    }
    eprintln!("==> installing Debian packages: {}", want.join(" "));
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&want);
    apt_get(&args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mirror_is_found_in_deb822_and_one_line_sources() {
        let deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
                      Components: main\n\nTypes: deb\nURIs: http://sec.example/debian-security\n\
                      Suites: bookworm-security\nComponents: main\n";
        assert_eq!(find_mirror(deb822).as_deref(), Some("http://mirror.example/debian"));
        let one_line = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main contrib\n";
        assert_eq!(find_mirror(one_line).as_deref(), Some("http://m.example/debian"));
        assert_eq!(find_mirror("deb http://m.example/debian bookworm-updates main\n"), None);
        assert_eq!(find_mirror("Types: deb-src\nURIs: http://x/\nSuites: bookworm\nComponents: main\n"), None);
    }

    #[test]
    fn a_pin_names_only_its_packages_above_debian_12() {
        let pin = Pin {
            suite: "bookworm-backports",
            packages: &["qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios"],
            why: "a test",
        };
        let [(src_path, src), (pref_path, pref)] = pin_files(&pin, "http://m.example/debian");
        assert!(src_path.ends_with("hearth-bookworm-backports.sources"));
        assert!(src.contains("URIs: http://m.example/debian\nSuites: bookworm-backports\n"));
        assert!(pref_path.ends_with("hearth-bookworm-backports.pref"));
        assert!(pref.contains("Package: *\nPin: release n=bookworm-backports\nPin-Priority: 1\n"));
        assert!(pref.contains("Package: qemu-system-x86 qemu-system-common qemu-system-data seabios\n"));
    }
}
