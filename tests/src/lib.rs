//! Helpers of hearth's end-to-end suites. The suites are run by
//! `cargo xtask e2e <suite>`, which builds the binaries and guest images,
//! decides whether this host can run them directly (hardware KVM) or needs
//! the test host, and passes every path in `HEARTH_*` environment variables.
//! Run by hand without those, a suite fails and says how to run it.

pub mod agent;
pub mod cni;
pub mod containerd;
pub mod cri;
pub mod devmapper;
pub mod distro;
pub mod docker;

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The reference of the image in [`Env::debian_image`]: Debian 12 minbase
/// (bash, coreutils, apt, dpkg), made by mmdebstrap, no registry needed.
pub const DEBIAN_IMAGE: &str = "docker.io/hearth/debian:bookworm";
/// A CRI pod's sandbox image (the pause process), built locally.
pub const PAUSE_IMAGE: &str = "docker.io/hearth/pause:latest";

/// Paths the xtask hands to the suites.
pub struct Env {
    pub vmm: PathBuf,
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub kernel_release: String,
    pub boot_initramfs: PathBuf,
    /// tests/guest-tools, statically linked, to copy into guests.
    pub guest_tool: PathBuf,
    /// hearth-agent, statically linked (the VM's /init, and the native agent).
    pub agent: PathBuf,
    /// The initramfs whose /init is hearth-agent.
    pub agent_initramfs: PathBuf,
    /// containerd-shim-hearth-v2.
    pub shim: PathBuf,
    /// The busybox OCI image archive (docker.io/hearth/busybox:latest).
    pub busybox_image: PathBuf,
    /// The pause image archive ([`PAUSE_IMAGE`]), a CRI pod's sandbox.
    pub pause_image: PathBuf,
    /// The directory of containerd 1.7's binaries (Debian 13's, unpacked by
    /// setup), which the cri suite runs; the others run Debian 12's 1.6.
    pub containerd_cri: PathBuf,
    /// The Debian minbase OCI image archive ([`DEBIAN_IMAGE`]).
    pub debian_image: PathBuf,
    pub virtiofsd: PathBuf,
    /// The `hearth` CLI.
    pub cli: PathBuf,
    /// hearth's cache (`~/.cache/hearth`), where setup built the suite's
    /// distro root filesystem.
    pub cache: PathBuf,
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: the end-to-end suites need the built VMM, kernel and guest \
             images; run them with `cargo xtask e2e <suite>` (or `cargo xtask test`)"
        )
    })
}

impl Env {
    pub fn get() -> Env {
        Env {
            vmm: var("HEARTH_VMM").into(),
            vmlinux: var("HEARTH_KERNEL_VMLINUX").into(),
            bzimage: var("HEARTH_KERNEL_BZIMAGE").into(),
            kernel_release: var("HEARTH_KERNEL_RELEASE"),
            boot_initramfs: var("HEARTH_BOOT_INITRAMFS").into(),
            guest_tool: var("HEARTH_GUEST_TOOL").into(),
            agent: var("HEARTH_AGENT").into(),
            agent_initramfs: var("HEARTH_AGENT_INITRAMFS").into(),
            shim: var("HEARTH_SHIM").into(),
            busybox_image: var("HEARTH_BUSYBOX_IMAGE").into(),
            pause_image: var("HEARTH_PAUSE_IMAGE").into(),
            containerd_cri: var("HEARTH_CONTAINERD_CRI").into(),
            debian_image: var("HEARTH_DEBIAN_IMAGE").into(),
            virtiofsd: var("HEARTH_VIRTIOFSD").into(),
            cli: var("HEARTH_CLI").into(),
            cache: var("HEARTH_CACHE").into(),
        }
    }
}

/// What a finished (or killed) process left behind.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// True when the hang guard had to kill it.
    pub killed: bool,
}

impl Finished {
    /// `HEARTH-<FACT>: value` lines the guest printed.
    pub fn facts(&self) -> HashMap<String, String> {
        self.stdout
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("HEARTH-"))
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect()
    }

    pub fn fact(&self, name: &str) -> String {
        self.facts().remove(name).unwrap_or_else(|| {
            panic!("the guest did not report {name}\n--- stdout ---\n{}\n--- stderr ---\n{}", self.stdout, self.stderr)
        })
    }

    pub fn describe(&self) -> String {
        format!("{}\n--- stdout ---\n{}\n--- stderr ---\n{}", self.status, self.stdout, self.stderr)
    }
}

/// Runs `cmd` to its end, killing it after `hang_guard` (a guard against a
/// hang, not a timing assertion: it is generous on purpose).
pub fn run(cmd: &mut Command, hang_guard: Duration) -> Finished {
    run_streaming(cmd, hang_guard, |_, _| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_are_parsed_from_console_lines() {
        let f = run(
            Command::new("/bin/sh")
                .args(["-c", "echo 'noise'; printf 'HEARTH-UNAME: 6.12-hearth\\r\\n'; echo 'HEARTH-NPROC: 2'"]),
            Duration::from_secs(60),
        );
        assert!(f.status.success() && !f.killed);
        assert_eq!(f.fact("UNAME"), "6.12-hearth");
        assert_eq!(f.fact("NPROC"), "2");
        assert!(!f.facts().contains_key("noise"));
    }

    #[test]
    fn hang_guard_kills() {
        let f = run(Command::new("/bin/sleep").arg("30"), Duration::from_millis(200));
        assert!(f.killed);
        assert!(!f.status.success());
    }
}

/// A scratch directory, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("hearth-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a host command that must succeed, returning its stdout.
pub fn host(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes an ext4 image of `size_mib` holding the files of `dir`.
pub fn ext4_image(dir: &std::path::Path, image: &std::path::Path, size_mib: u64) {
    host(Command::new("mke2fs").args(["-q", "-F", "-t", "ext4", "-d"]).arg(dir).arg(image).arg(format!("{size_mib}M")));
}

/// Reads a file out of an ext4 image (debugfs, no mount needed).
pub fn ext4_read(image: &std::path::Path, file: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat /{file}")])
        .arg(image)
        .stderr(Stdio::null())
        .output()
        .expect("running debugfs");
    out.stdout
}

/// A VM of the boot initramfs that runs `script` (as run.sh, with the files
/// of `extra` beside it) from a disk it mounts at start, plus more disks.
pub struct GuestRun<'a> {
    pub env: &'a Env,
    pub script: String,
    pub files: Vec<(String, Vec<u8>)>,
    pub disks: Vec<String>,
    pub extra_args: Vec<String>,
    pub cpus: u8,
    pub memory_mib: u64,
    /// More kernel command line, after `hearth.run=/dev/vda` (hearth-vmm
    /// takes one `--cmdline`, so this is the way to add to it).
    pub cmdline: String,
}

impl<'a> GuestRun<'a> {
    pub fn new(env: &'a Env, script: &str) -> Self {
        GuestRun {
            env,
            script: script.to_string(),
            files: Vec::new(),
            disks: Vec::new(),
            extra_args: Vec::new(),
            cpus: 2,
            memory_mib: 256,
            cmdline: String::new(),
        }
    }

    /// Boots the VM; the run disk is /dev/vda, `disks` follow as vdb, vdc...
    /// Asserts that the VMM and the guest script both succeeded.
    pub fn run(&self, scratch: &Scratch) -> Finished {
        let f = run(&mut self.command(scratch), Duration::from_secs(600));
        assert!(!f.killed, "the VM hung:\n{}", f.describe());
        assert_eq!(f.status.code(), Some(0), "the VMM did not exit 0:\n{}", f.describe());
        assert_eq!(f.fact("RUN-EXIT"), "0", "the guest script failed:\n{}", f.describe());
        f
    }

    /// The hearth-vmm command line, with the run disk built.
    pub fn command(&self, scratch: &Scratch) -> Command {
        let dir = scratch.path("run");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("run.sh"), &self.script).unwrap();
        for (name, data) in &self.files {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.join(name);
            std::fs::write(&path, data).unwrap();
            // Scripts and static programs alike must be runnable in the guest.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let image = scratch.path("run.img");
        ext4_image(&dir, &image, 64);
        let mut cmd = Command::new(&self.env.vmm);
        cmd.arg("--kernel").arg(&self.env.vmlinux).arg("--initramfs").arg(&self.env.boot_initramfs);
        cmd.args(["--cpus", &self.cpus.to_string(), "--memory", &self.memory_mib.to_string()]);
        cmd.arg("--disk").arg(&image);
        for d in &self.disks {
            cmd.args(["--disk", d]);
        }
        cmd.args(&self.extra_args);
        cmd.arg("--cmdline").arg(format!("hearth.run=/dev/vda {}", self.cmdline).trim_end());
        cmd
    }
}

/// Collects a spawned child's piped stdout and stderr and waits for it, up
/// to `guard` (a hang guard): None if it had to be killed.
pub fn output_within(mut child: std::process::Child, guard: Duration) -> Option<std::process::Output> {
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    wait_timeout(&mut child, guard)?;
    let status = child.wait().ok()?;
    Some(std::process::Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}

/// Runs `cmd` to its end like [`run`], handing each stdout line to `on_line`
/// as it arrives, with the process's pid: to look at the process (its
/// memory, say) at the moment the guest reports something.
pub fn run_streaming(cmd: &mut Command, hang_guard: Duration, mut on_line: impl FnMut(u32, &str)) -> Finished {
    use std::io::BufRead;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let pid = child.id();
    let out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let out_t = std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).split(b'\n').map_while(Result::ok) {
            if lines_tx.send(String::from_utf8_lossy(&line).into_owned()).is_err() {
                break;
            }
        }
    });
    let (err_tx, err_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        let _ = err_tx.send(String::from_utf8_lossy(&s).into_owned());
    });
    let started = Instant::now();
    let mut stdout = String::new();
    let mut killed = false;
    let mut take = |line: String, stdout: &mut String| {
        on_line(pid, line.trim_end_matches('\r'));
        stdout.push_str(&line);
        stdout.push('\n');
    };
    let status = loop {
        match lines.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => take(line, &mut stdout),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(50)),
        }
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            break status;
        }
        if started.elapsed() > hang_guard && !killed {
            let _ = child.kill();
            killed = true;
        }
    };
    // The pipes end when the last process holding them does. A child the
    // process left behind (killed without cleaning up) may hold them for
    // ever: drain for a while, then go on rather than hang the suite.
    let drain_until = Instant::now() + Duration::from_secs(10);
    let mut leftover = false;
    loop {
        match lines.recv_timeout(drain_until.saturating_duration_since(Instant::now())) {
            Ok(line) => take(line, &mut stdout),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                leftover = true;
                break;
            }
        }
    }
    if !leftover {
        let _ = out_t.join();
    }
    let mut stderr = match err_rx.recv_timeout(drain_until.saturating_duration_since(Instant::now())) {
        Ok(s) => s,
        Err(_) => {
            leftover = true;
            String::new()
        }
    };
    if leftover {
        stderr.push_str("\n[hearth-e2e: the process ended but something it started still holds its output]\n");
    }
    Finished { status, stdout, stderr, killed }
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `RssShmem`...), if the
/// process is alive and has it.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

/// Bytes the host file system holds for `path` (a sparse image's real size).
pub fn allocated_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Prints a measured figure so that it shows in the suite's output even
/// when the test passes (the test harness captures `println!`, not writes
/// to the stderr handle).
pub fn figure(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[cfg(test)]
mod streaming_tests {
    use super::*;

    #[test]
    fn lines_arrive_while_the_process_runs() {
        let mut seen = Vec::new();
        let f = run_streaming(
            Command::new("/bin/sh").args(["-c", "echo one; sleep 0.3; echo 'HEARTH-TWO: 2'"]),
            Duration::from_secs(60),
            |pid, line| seen.push((line.to_string(), proc_status_kib(pid, "VmRSS").is_some())),
        );
        assert!(f.status.success() && !f.killed);
        assert_eq!(seen.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>(), ["one", "HEARTH-TWO: 2"]);
        assert!(seen[0].1, "the process is alive (and has an RSS) when its first line arrives");
        assert_eq!(f.fact("TWO"), "2");
        assert!(proc_status_kib(std::process::id(), "VmRSS").unwrap() > 0);
        assert_eq!(proc_status_kib(std::process::id(), "NoSuchField"), None);
    }

    #[test]
    fn streaming_hang_guard_kills() {
        let f = run_streaming(Command::new("/bin/sleep").arg("30"), Duration::from_millis(200), |_, _| {});
        assert!(f.killed);
    }
}

/// Waits for a child at most `guard` (a hang guard), killing it after; the
/// exit code, or None if it had to be killed or died of a signal.
pub fn wait_timeout(child: &mut std::process::Child, guard: Duration) -> Option<i32> {
    let deadline = Instant::now() + guard;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A tap with an address, removed when dropped.
pub struct TapDevice(String);

impl TapDevice {
    pub fn new(name: &str, cidr: &str) -> TapDevice {
        let _ = Command::new("ip").args(["link", "del", name]).output();
        host(Command::new("ip").args(["tuntap", "add", "dev", name, "mode", "tap"]));
        host(Command::new("ip").args(["addr", "add", cidr, "dev", name]));
        host(Command::new("ip").args(["link", "set", name, "up"]));
        TapDevice(name.to_string())
    }
}

impl Drop for TapDevice {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}
