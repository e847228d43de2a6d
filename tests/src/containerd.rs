//! A containerd of the tests' own, with the hearth shim on its PATH: used by
//! the `containerd` suite, the demo and the containerd benchmark.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{Env, Scratch};

pub const IMAGE: &str = "docker.io/hearth/busybox:latest";
pub const RUNTIME: &str = "io.containerd.hearth.v2";

pub struct Containerd {
    child: Child,
    pub socket: PathBuf,
    root: PathBuf,
    pub vms: PathBuf,
    log: PathBuf,
    /// How to start it again.
    command: (PathBuf, String, PathBuf),
}

impl Containerd {
    /// Starts containerd with hearth configured (VMs idle out after
    /// `idle_secs`), and imports the busybox image.
    pub fn start(env: &Env, scratch: &Scratch, idle_secs: u64) -> Containerd {
        Self::start_with(env, scratch, &format!("idle_timeout_secs = {idle_secs}\n"))
    }

    /// hearth's configuration for this containerd's VMs, plus `extra` TOML
    /// lines: what HEARTH_CONFIG names, or a file for ConfigPath.
    pub fn hearth_config(env: &Env, vms: &std::path::Path, extra: &str) -> String {
        Self::hearth_config_with(env, vms, 512, extra)
    }

    /// [`Containerd::hearth_config`] with VMs of `memory_mib`.
    pub fn hearth_config_with(env: &Env, vms: &std::path::Path, memory_mib: u32, extra: &str) -> String {
        format!(
            "vmm = \"{}\"\nkernel = \"{}\"\ninitramfs = \"{}\"\nvirtiofsd = \"{}\"\nmemory_mib = {memory_mib}\nvcpus = 2\nstate_dir = \"{}\"\nlog_level = \"debug\"\n{extra}",
            env.vmm.display(),
            env.vmlinux.display(),
            env.agent_initramfs.display(),
            env.virtiofsd.display(),
            vms.display()
        )
    }

    /// The file HEARTH_CONFIG names (rewritten by tests of bad configs).
    pub fn hearth_config_path(&self) -> &std::path::Path {
        &self.command.2
    }

    /// Starts containerd with hearth configured by `hearth_extra` (TOML lines
    /// added to the paths of the built artefacts), and imports the busybox
    /// image.
    pub fn start_with(env: &Env, scratch: &Scratch, hearth_extra: &str) -> Containerd {
        Self::start_configured(env, scratch, hearth_extra, "")
    }

    /// [`Containerd::start_with`], with `containerd_extra` (TOML tables)
    /// added to containerd's own configuration.
    pub fn start_configured(env: &Env, scratch: &Scratch, hearth_extra: &str, containerd_extra: &str) -> Containerd {
        let root = scratch.path("root");
        std::fs::create_dir_all(&root).unwrap();
        // Overlay snapshots need a filesystem that can be an overlay's upper
        // layer (the test host's own root is an overlay).
        crate::host(Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(&root));
        let state = scratch.path("state");
        let socket = scratch.path("containerd.sock");
        let vms = scratch.path("vms");
        let config = scratch.path("containerd.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}\"\n{containerd_extra}",
                root.display(),
                state.display(),
                socket.display()
            ),
        )
        .unwrap();
        let hearth_config = scratch.path("hearth.toml");
        std::fs::write(&hearth_config, Self::hearth_config(env, &vms, hearth_extra)).unwrap();
        let shim_dir = env.shim.parent().unwrap();
        let path = format!("{}:{}", shim_dir.display(), std::env::var("PATH").unwrap_or_default());
        let log = scratch.path("containerd.log");
        let command = (config, path, hearth_config);
        let child = Self::spawn(&command, &log);
        let c = Containerd { child, socket, root, vms, log, command };
        c.wait_ready();
        c.ok(&["images", "import", &env.busybox_image.display().to_string()]);
        c
    }

    fn spawn(command: &(PathBuf, String, PathBuf), log: &std::path::Path) -> Child {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        Command::new("containerd")
            .arg("--config")
            .arg(&command.0)
            .env("PATH", &command.1)
            .env("HEARTH_CONFIG", &command.2)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("starting containerd (installed by `cargo xtask setup`)")
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.ctr(&["version"]).status.success() {
            assert!(Instant::now() < deadline, "containerd did not come up:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops containerd (SIGTERM, as a service manager would) and starts it
    /// again; shims and their containers live on.
    pub fn restart(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        self.child = Self::spawn(&self.command, &self.log);
        self.wait_ready();
    }

    pub fn log_path(&self) -> PathBuf {
        self.log.clone()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `ctr` with these arguments, killed (and the test failed, with
    /// containerd's log) if it has not ended after five minutes.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_within(args, Duration::from_secs(300))
    }

    /// [`Containerd::ctr`] with a hang guard of `guard` (a step that
    /// downloads through the emulated VM's network can be slow).
    pub fn ctr_within(&self, args: &[&str], guard: Duration) -> Output {
        let child = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting ctr (installed by `cargo xtask setup`)");
        crate::output_within(child, guard).unwrap_or_else(|| panic!("ctr {args:?} hung (killed after {guard:?})"))
    }

    /// `ctr` that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
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

    pub fn run(&self, id: &str, extra: &[&str], cmd: &[&str]) -> Output {
        let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
        args.extend_from_slice(extra);
        args.push(IMAGE);
        args.push(id);
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    /// Starts container `id` detached on `runtime`, in the network
    /// namespace at `netns`, running `hearth-guest-tool tcp-echo 8080`
    /// (`addr` when given, every IPv4 address otherwise).
    pub fn echo_server_in(&self, id: &str, runtime: &str, netns: &str, addr: Option<&str>) {
        let with_ns = format!("network:{netns}");
        let mut args = vec![
            "run",
            "-d",
            "--runtime",
            runtime,
            "--with-ns",
            &with_ns,
            IMAGE,
            id,
            "hearth-guest-tool",
            "tcp-echo",
            "8080",
        ];
        args.extend(addr);
        self.ok(&args);
    }

    /// Waits until none of the tasks `ids` runs, then removes each task and
    /// its container.
    pub fn remove_stopped(&self, ids: &[&str]) {
        wait_until(&format!("{ids:?} stopped"), Duration::from_secs(60), || {
            !self.ok(&["task", "ls"]).lines().any(|l| {
                let mut w = l.split_whitespace();
                w.next().is_some_and(|id| ids.contains(&id)) && l.contains("RUNNING")
            })
        });
        for id in ids {
            self.ok(&["task", "rm", id]);
            self.ok(&["containers", "rm", id]);
        }
    }

    /// SIGKILL to each task `ids`, then [`Containerd::remove_stopped`].
    pub fn kill_and_remove(&self, ids: &[&str]) {
        for id in ids {
            self.ok(&["task", "kill", "-s", "SIGKILL", id]);
        }
        self.remove_stopped(ids);
    }

    pub fn vmm_pids(&self) -> Vec<i32> {
        pids_matching(&self.vms.display().to_string(), "hearth-vmm")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What containerd and the shims said (the shim logs through
            // containerd), for whatever the failed assertion did not show.
            let log: Vec<String> =
                self.log_text().lines().filter(|l| !l.contains("loading plugin")).map(String::from).collect();
            eprintln!("--- containerd (last 150 lines) ---\n{}", tail(&log.join("\n"), 150));
            // Where each shim's threads are blocked, and what it holds open.
            for pid in pids_matching("containerd-shim-hearth-v2", &self.socket.display().to_string()) {
                let mut threads = Vec::new();
                for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
                    let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
                    threads.push(format!("{} {}", read("comm").trim(), read("wchan").trim()));
                }
                let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| {
                        format!(
                            "{}->{}",
                            e.file_name().to_string_lossy(),
                            std::fs::read_link(e.path()).map(|p| p.display().to_string()).unwrap_or_default()
                        )
                    })
                    .collect();
                eprintln!("--- shim {pid}: threads (comm wchan) {threads:?}\n    fds {fds:?}");
                // Their stacks, where gdb is installed; bounded, since gdb
                // reading our debug info under emulation can take minutes.
                if let Ok(o) = Command::new("timeout")
                    .args(["60", "gdb", "-batch", "-p", &pid.to_string(), "-ex", "thread apply all bt 25"])
                    .stdin(Stdio::null())
                    .output()
                {
                    let bt = String::from_utf8_lossy(&o.stdout);
                    // The threads, and their frames in our code or at a
                    // blocking point: enough to see what waits for what.
                    let keep = ["shim/src", "wait_pid", "libc_write", "mount_linux", "handle_signals", "logger"];
                    let frames: Vec<&str> = bt
                        .lines()
                        .filter(|l| l.starts_with("Thread") || keep.iter().any(|k| l.contains(k)))
                        .map(|l| l.get(..200).unwrap_or(l))
                        .collect();
                    eprintln!("{}", frames.join("\n"));
                }
            }
            for dir in std::fs::read_dir(&self.vms).into_iter().flatten().flatten() {
                let console = std::fs::read_to_string(dir.path().join("jail/console.log")).unwrap_or_default();
                eprintln!("--- {} console (last 40 lines) ---\n{}", dir.path().display(), tail(&console, 40));
            }
        }
        for pid in self.vmm_pids() {
            // SAFETY: kill(2) on a VMM this containerd's shim started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("umount").arg("-R").arg("-l").arg(&self.root).status();
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Pids of processes whose command line contains both words.
pub fn pids_matching(a: &str, b: &str) -> Vec<i32> {
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

pub fn wait_until(what: &str, guard: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + guard;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not after {guard:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}
