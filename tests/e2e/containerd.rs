//! e2e suite `containerd`: Debian's containerd and `ctr` run containers with
//! the runtime `io.containerd.hearth.v2`. The test starts its own containerd
//! (its root on a tmpfs, its socket in a scratch directory) with the shim on
//! its PATH and a hearth config naming the built VMM, kernel and initramfs,
//! imports the locally built busybox image, and drives everything through
//! `ctr`, as a user would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hearth_e2e::{Env, Scratch};

const IMAGE: &str = "docker.io/hearth/busybox:latest";
const RUNTIME: &str = "io.containerd.hearth.v2";

struct Containerd {
    child: Child,
    socket: PathBuf,
    root: PathBuf,
    vms: PathBuf,
    log: PathBuf,
}

impl Containerd {
    fn start(env: &Env, scratch: &Scratch) -> Containerd {
        let root = scratch.path("root");
        std::fs::create_dir_all(&root).unwrap();
        // Overlay snapshots need a filesystem that can be an overlay's upper
        // layer (the test host's own root is an overlay).
        hearth_e2e::host(Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(&root));
        let state = scratch.path("state");
        let socket = scratch.path("containerd.sock");
        let vms = scratch.path("vms");
        let config = scratch.path("containerd.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}\"\n",
                root.display(),
                state.display(),
                socket.display()
            ),
        )
        .unwrap();
        let hearth_config = scratch.path("hearth.toml");
        std::fs::write(
            &hearth_config,
            format!(
                "vmm = \"{}\"\nkernel = \"{}\"\ninitramfs = \"{}\"\nvirtiofsd = \"{}\"\nmemory_mib = 512\nvcpus = 2\nidle_timeout_secs = 10\nstate_dir = \"{}\"\nlog_level = \"debug\"\n",
                env.vmm.display(),
                env.vmlinux.display(),
                env.agent_initramfs.display(),
                env.virtiofsd.display(),
                vms.display()
            ),
        )
        .unwrap();
        let shim_dir = env.shim.parent().unwrap();
        let path = format!("{}:{}", shim_dir.display(), std::env::var("PATH").unwrap_or_default());
        let log = scratch.path("containerd.log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .env("HEARTH_CONFIG", &hearth_config)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting containerd (installed by `cargo xtask setup`)");
        let c = Containerd { child, socket, root, vms, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !c.ctr(&["version"]).status.success() {
            assert!(Instant::now() < deadline, "containerd did not come up:\n{}", c.log_text());
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr").arg("--address").arg(&self.socket).args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// `ctr` that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.ctr(args);
        assert!(
            o.status.success(),
            "ctr {args:?} failed ({}): {}{}\n--- containerd ---\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            tail(&self.log_text(), 40)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn run(&self, id: &str, extra: &[&str], cmd: &[&str]) -> Output {
        let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
        args.extend_from_slice(extra);
        args.push(IMAGE);
        args.push(id);
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    fn vmm_pids(&self) -> Vec<i32> {
        pids_matching(&self.vms.display().to_string(), "hearth-vmm")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for pid in self.vmm_pids() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("umount").arg("-R").arg("-l").arg(&self.root).status();
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Pids of processes whose command line contains both words.
fn pids_matching(a: &str, b: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(a) && cmd.contains(b) {
            out.push(pid);
        }
    }
    out
}

fn wait_until(what: &str, guard: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + guard;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not after {guard:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn containers_through_containerd() {
    let env = Env::get();
    let scratch = Scratch::new("containerd");
    let c = Containerd::start(&env, &scratch);
    c.ok(&["images", "import", &env.busybox_image.display().to_string()]);
    assert!(c.ok(&["images", "ls", "-q"]).contains(IMAGE), "the image was not imported");

    // Output and exit code, through the VM booted on first use.
    let o = c.run("hello", &[], &["sh", "-c", "echo hello from $(uname -r); exit 3"]);
    assert_eq!(o.status.code(), Some(3), "{}\n--- containerd ---\n{}", text(&o), tail(&c.log_text(), 60));
    assert_eq!(String::from_utf8_lossy(&o.stdout), format!("hello from {}\n", env.kernel_release));
    // `ctr task kill`: the attached `ctr run` ends with 128 + the signal.
    let mut attached = Command::new("ctr")
        .arg("--address")
        .arg(&c.socket)
        .args(["run", "--rm", "--runtime", RUNTIME, IMAGE, "killed", "sleep", "1000"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("container killed running", Duration::from_secs(60), || {
        c.ok(&["task", "ls"]).lines().any(|l| l.starts_with("killed ") && l.contains("RUNNING"))
    });
    c.ok(&["task", "kill", "-s", "SIGKILL", "killed"]);
    assert_eq!(hearth_e2e::wait_timeout(&mut attached, Duration::from_secs(60)), Some(137));

    // Two long-running containers: exec, one VM, isolation, stats, kill.
    c.ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, "one", "sleep", "1000"]);
    c.ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, "two", "sleep", "1000"]);
    let o = c.ctr(&["task", "exec", "--exec-id", "e1", "one", "sh", "-c", "echo exec-ok; exit 5"]);
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned()),
        (Some(5), "exec-ok\n".into()),
        "{}",
        text(&o)
    );
    let boot = |id: &str| c.ok(&["task", "exec", "--exec-id", "boot", id, "cat", "/proc/sys/kernel/random/boot_id"]);
    let (b1, b2) = (boot("one"), boot("two"));
    assert_eq!(b1, b2, "the two containers run in different VMs");
    assert_eq!(c.vmm_pids().len(), 1, "one utility VM for both");
    c.ok(&["task", "exec", "--exec-id", "mark", "one", "touch", "/marker"]);
    // Each sees its own sleep only (pid namespace), and not the other's
    // files (mount namespace, own rootfs).
    let script = "ps -o comm | grep -c sleep; if test -e /marker; then echo shared; else echo private; fi";
    let ps = c.ok(&["task", "exec", "--exec-id", "ps", "two", "sh", "-c", script]);
    assert_eq!(ps, "1\nprivate\n", "container two sees the other's processes or files");
    let metrics = c.ok(&["task", "metrics", "one"]);
    assert!(metrics.contains("memory") && metrics.contains("pids"), "metrics: {metrics}");
    c.ok(&["task", "kill", "-s", "SIGKILL", "two"]);
    wait_until("container two stopped after SIGKILL", Duration::from_secs(60), || {
        c.ok(&["task", "ls"]).lines().any(|l| l.starts_with("two ") && l.contains("STOPPED"))
    });
    c.ok(&["task", "rm", "two"]);
    c.ok(&["containers", "rm", "two"]);

    // A memory limit: the OOM kill is seen as an event and as 137.
    let mut events = Command::new("ctr")
        .arg("--address")
        .arg(&c.socket)
        .arg("events")
        .stdout(std::fs::File::create(scratch.path("events.log")).unwrap())
        .spawn()
        .unwrap();
    let o = c.run("oom", &["--memory-limit", "33554432"], &["hearth-guest-tool", "hog", "512"]);
    assert_eq!(o.status.code(), Some(137), "{}", text(&o));
    wait_until("the OOM event", Duration::from_secs(30), || {
        std::fs::read_to_string(scratch.path("events.log")).unwrap_or_default().contains("/tasks/oom")
    });
    let _ = events.kill();
    let _ = events.wait();

    // A terminal: ctr -t sends its size; the container sees it.
    let o = Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "stty rows 40 cols 100; ctr --address {} run -t --rm --runtime {RUNTIME} {IMAGE} tty stty size",
            c.socket.display()
        ))
        .arg("/dev/null")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("40 100"), "tty: {}", text(&o));

    // The VM crashing: the task exits, the shim keeps answering, the next
    // container boots a new VM.
    let vmm = c.vmm_pids();
    assert_eq!(vmm.len(), 1);
    let _ = Command::new("kill").args(["-9", &vmm[0].to_string()]).status();
    wait_until("container one reported stopped after its VM died", Duration::from_secs(60), || {
        c.ok(&["task", "ls"]).lines().any(|l| l.starts_with("one ") && l.contains("STOPPED"))
    });
    c.ok(&["task", "rm", "one"]);
    c.ok(&["containers", "rm", "one"]);
    let o = c.run("after-crash", &[], &["true"]);
    let shim_log: Vec<String> =
        c.log_text().lines().filter(|l| !l.contains("loading plugin")).map(String::from).collect();
    assert_eq!(o.status.code(), Some(0), "{}\n--- containerd ---\n{}", text(&o), tail(&shim_log.join("\n"), 80));

    // Idle: with no containers left the VM and the shim go away, leaving
    // nothing behind.
    wait_until("the VM shut down after the idle time", Duration::from_secs(120), || c.vmm_pids().is_empty());
    wait_until("the shim exited", Duration::from_secs(60), || {
        pids_matching("containerd-shim-hearth-v2", "").is_empty()
    });
    assert!(pids_matching("virtiofsd", &c.vms.display().to_string()).is_empty(), "virtiofsd left running");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let leftover: Vec<&str> = mounts.lines().filter(|l| l.contains(&*c.vms.display().to_string())).collect();
    assert!(leftover.is_empty(), "mounts left: {leftover:?}");
    let vm_dirs: Vec<_> =
        std::fs::read_dir(&c.vms).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(vm_dirs.is_empty(), "VM state left: {vm_dirs:?}");
    let _ = Path::new("");
}
