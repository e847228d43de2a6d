//! The test host: where /dev/kvm is not hardware-backed (PVM, or no KVM at
//! all), end-to-end suites run inside QEMU under software emulation with AMD
//! SVM, booting Debian's generic kernel with kvm_amd loaded, so our VMM runs
//! unchanged inside it (design.md, fact 2). The test host sees this machine's
//! whole root filesystem read-only over 9p (with a tmpfs overlay, so it can
//! write), hence the freshly built binaries, the tuned kernel and the suite's
//! assets; a run directory shared read-write carries the command in and the
//! exit status out. The command's output streams to the test host's console,
//! which is our stdout.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cpio::Archive;
use crate::paths;
use crate::sh::{self, cmd};
use hearth_rootfs::progress::Progress;

const INIT: &str = include_str!("../../tests/testhost/init.sh");
const MODULES: &str = include_str!("../../tests/testhost/modules.txt");
/// The meta-package whose dependency names the current generic kernel.
const KERNEL_METAPACKAGE: &str = "linux-image-amd64";
pub const BUSYBOX: &str = "/bin/busybox";

pub struct Assets {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// Where a suite runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// This machine's /dev/kvm is hardware-backed.
    Direct,
    /// Inside the test host.
    TestHost,
}

/// Hardware KVM means direct; PVM or no KVM means the test host.
/// `HEARTH_TESTHOST=always|never` overrides the choice.
pub fn place() -> Place {
    match std::env::var("HEARTH_TESTHOST").as_deref() {
        Ok("always") => return Place::TestHost,
        Ok("never") => return Place::Direct,
        _ => {}
    }
    let sys = Path::new("/sys/module");
    let hardware = sys.join("kvm_intel").exists() || sys.join("kvm_amd").exists();
    let usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if hardware && usable {
        Place::Direct
    } else {
        Place::TestHost
    }
}

pub fn describe(place: Place) -> &'static str {
    match place {
        Place::Direct => "directly on this host (hardware-backed /dev/kvm)",
        Place::TestHost => {
            "inside the test host (this host's /dev/kvm is PVM or absent: QEMU with emulated AMD SVM instead)"
        }
    }
}

/// The generic kernel package and its .deb file name, from apt's lists.
fn kernel_package() -> Result<(String, String)> {
    let deps = sh::output(cmd("apt-cache").args(["depends", KERNEL_METAPACKAGE]))?;
    let pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|d| d.starts_with("linux-image-"))
        .with_context(|| format!("apt knows no dependency of {KERNEL_METAPACKAGE}: run `apt-get update`"))?
        .to_string();
    let uris = sh::output(cmd("apt-get").args(["download", "--print-uris", &pkg]))?;
    let file = uris
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("apt-get download --print-uris {pkg} printed nothing usable"))?
        .to_string();
    Ok((pkg, file))
}

/// The test host's assets, prepared (or found in the cache) once per xtask
/// run however many suites use them.
pub fn assets() -> Result<&'static Assets> {
    static ASSETS: std::sync::OnceLock<Assets> = std::sync::OnceLock::new();
    if let Some(a) = ASSETS.get() {
        return Ok(a);
    }
    let a = ensure_assets()?;
    Ok(ASSETS.get_or_init(|| a))
}

/// The QEMU that runs the test host: `HEARTH_TESTHOST_QEMU` names another
/// binary (to compare QEMU versions, docs/testing.md), else the one on PATH.
fn qemu() -> String {
    std::env::var("HEARTH_TESTHOST_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// Downloads and unpacks the test host's kernel and builds its initramfs,
/// unless the cache has them for the same inputs.
pub fn ensure_assets() -> Result<Assets> {
    let (pkg, deb) = kernel_package()?;
    let busybox = std::fs::read(BUSYBOX).context("busybox-static is not installed: run `cargo xtask setup`")?;
    let key = sh::key(&[deb.as_bytes(), INIT.as_bytes(), MODULES.as_bytes(), &busybox]);
    let dir = paths::cache().join("testhost").join(&key);
    let assets = Assets { kernel: dir.join("vmlinuz"), initramfs: dir.join("initramfs.cpio") };
    if dir.join(".complete").exists() {
        eprintln!("==> test host assets ({pkg}, cached in {})", dir.display());
        return Ok(assets);
    }
    let p = Progress::new(&format!("preparing the test host from {pkg}"));
    let debs = paths::cache().join("testhost/debs");
    std::fs::create_dir_all(&debs)?;
    if !debs.join(&deb).exists() {
        sh::run(cmd("apt-get").args(["download", "-q", &pkg]).current_dir(&debs))?;
    }
    let unpacked = dir.join("unpacked");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&unpacked)?;
    sh::run(cmd("dpkg-deb").arg("-x").arg(debs.join(&deb)).arg(&unpacked))?;
    let version = pkg.trim_start_matches("linux-image-");
    std::fs::copy(unpacked.join(format!("boot/vmlinuz-{version}")), &assets.kernel)?;

    let mut a = Archive::default();
    for d in ["bin", "dev", "proc", "sys", "modules"] {
        a.dir(d);
    }
    a.char_dev("dev/console", 0o600, 5, 1);
    a.file("bin/busybox", 0o755, &busybox);
    a.symlink("bin/sh", "busybox");
    a.file("init", 0o755, INIT.as_bytes());
    a.file("modules.txt", 0o644, MODULES.as_bytes());
    let moddir = unpacked.join(format!("lib/modules/{version}/kernel"));
    for m in MODULES.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let name = Path::new(m).file_name().unwrap().to_string_lossy();
        a.file_from(&format!("modules/{name}.ko"), 0o644, &moddir.join(format!("{m}.ko")))?;
    }
    std::fs::write(&assets.initramfs, a.finish())?;
    std::fs::remove_dir_all(&unpacked)?;
    std::fs::write(dir.join(".complete"), &pkg)?;
    p.finish(&format!("kernel {version}, initramfs {} KiB", std::fs::metadata(&assets.initramfs)?.len() / 1024));
    Ok(assets)
}

/// Where the lines a run prints go: stdout, or a suite's own handler (the
/// test runner prefixes each line with the suite and times its tests).
pub type Console<'a> = &'a (dyn Fn(&str) + Sync);

/// A [`Console`] that prints each line to stdout as it comes.
pub fn stdout_console(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// One command to run in the test host.
pub struct Run<'a> {
    /// A short name, for the run directory and messages.
    pub name: &'a str,
    /// Shell script body, run with /bin/sh in the run directory.
    pub script: String,
    pub memory_mib: u64,
    /// Hang guard: the test host is killed after this long.
    pub timeout: Duration,
    /// Where the test host's console lines go.
    pub console: Console<'a>,
}

/// Boots the test host, runs the script, streams its console to stdout and
/// returns the script's exit status.
pub fn run(assets: &Assets, run: &Run) -> Result<i32> {
    let dir = std::env::temp_dir().join(format!("hearth-testhost-{}-{}", run.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("run.sh"), &run.script)?;
    let result = boot(assets, run, &dir);
    let status = std::fs::read_to_string(dir.join("status"));
    let _ = std::fs::remove_dir_all(&dir);
    let timed_out = result?;
    if timed_out {
        bail!("the test host did not finish within {}s and was killed", run.timeout.as_secs());
    }
    let status = status.context("the test host ended without reporting a status (its console is above)")?;
    status.trim().parse().with_context(|| format!("bad status {status:?} from the test host"))
}

fn boot(assets: &Assets, run: &Run, dir: &Path) -> Result<bool> {
    let started = Instant::now();
    // One CPU by default: with two, QEMU's emulation of nested SVM under
    // sustained interrupt load triple-faults the test host itself or its
    // guests' second vCPU now and then (docs/testing.md has the evidence);
    // with one it has not. HEARTH_TESTHOST_CPUS=N overrides.
    let cpus = std::env::var("HEARTH_TESTHOST_CPUS").ok().and_then(|c| c.parse::<usize>().ok()).unwrap_or(1);
    let qemu = qemu();
    let mut child = cmd(&qemu)
        .args(["-accel", "tcg,thread=multi", "-cpu", "EPYC,+svm", "-smp", &cpus.to_string()])
        .args(["-m", &run.memory_mib.to_string()])
        .args(["-nodefaults", "-no-user-config", "-no-reboot", "-display", "none"])
        // The human monitor on a socket in the run directory, for looking
        // into a test host that seems stuck (`info registers`, `info lapic`:
        // docs/testing.md).
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", dir.join("monitor.sock").display()))
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(&assets.kernel)
        .arg("-initrd")
        .arg(&assets.initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 loglevel={} panic=-1 hearth.run={}",
            // The test host's own kernel messages stay off the console unless
            // asked for (HEARTH_TESTHOST_LOGLEVEL=7 when debugging it).
            std::env::var("HEARTH_TESTHOST_LOGLEVEL").unwrap_or_else(|_| "1".into()),
            dir.display()
        ))
        .args(["-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap"])
        .args(["-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"])
        .arg("-fsdev")
        .arg(format!("local,id=run,path={},security_model=none", dir.display()))
        .args(["-device", "virtio-9p-pci,fsdev=run,mount_tag=hearthrun"])
        // A NIC on QEMU's user-mode network (10.0.2.15, gateway 10.0.2.2),
        // so that what runs inside reaches this machine's package registry:
        // the network suite's distros run apt-get through it.
        .args(["-nic", "user,model=virtio-net-pci"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {qemu} (run `cargo xtask setup`)"))?;
    // TCG lists each EPYC feature it does not emulate; those lines say
    // nothing about the run, everything else QEMU says is passed on.
    let stderr = child.stderr.take().unwrap();
    let name = run.name.to_string();
    let noise = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !line.contains("TCG doesn't support requested feature") {
                eprintln!("[{name}] qemu: {line}");
            }
        }
    });

    let pid = child.id() as libc::pid_t;
    let done = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (done, killed, timeout) = (done.clone(), killed.clone(), run.timeout);
        std::thread::spawn(move || {
            while started.elapsed() < timeout {
                if done.load(Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            killed.store(true, Ordering::Release);
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        })
    };
    for line in BufReader::new(child.stdout.take().unwrap()).split(b'\n') {
        let mut line = line?;
        line.retain(|b| *b != b'\r');
        (run.console)(&String::from_utf8_lossy(&line));
    }
    let status = child.wait()?;
    let _ = noise.join();
    done.store(true, Ordering::Release);
    let _ = watchdog.join();
    (run.console)(&format!(
        "    test host {} ended after {:.1}s ({status})",
        run.name,
        started.elapsed().as_secs_f64()
    ));
    Ok(killed.load(Ordering::Acquire))
}
