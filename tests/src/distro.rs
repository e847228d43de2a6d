//! Driving the `hearth` CLI against a containerd of the tests' own: the
//! `distro` suite and `cargo xtask bench distro`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::containerd::{tail, Containerd};
use crate::{Env, Scratch};

/// The packages the suite's distro has beside the `debian` recipe's own:
/// Docker, a FUSE filesystem and what makes its image. `cargo xtask setup`
/// builds the same tree into the cache, so the suite's install finds it.
pub const DISTRO_INCLUDE: &[&str] = &["docker.io", "fuse2fs", "e2fsprogs"];
pub const DISTRO_RELEASE: &str = "bookworm";

/// The hearth CLI, configured for one containerd.
pub struct Hearth {
    pub bin: PathBuf,
    /// The system config file (HEARTH_CLI_CONFIG).
    pub config: PathBuf,
    /// XDG_CONFIG_HOME: where the per-user file goes.
    pub user_config_home: PathBuf,
    /// The host directory shared into distros.
    pub share: PathBuf,
    pub log_dir: PathBuf,
    /// The distros' VM configuration (vm_config): its state_dir.
    pub vm_state: PathBuf,
    /// Where the containerd's logs can be read on failure.
    containerd_log: PathBuf,
}

impl Hearth {
    /// Writes the CLI's config for `c` (distros' VMs with `memory_mib`) and
    /// the VM config it names.
    pub fn new(env: &Env, scratch: &Scratch, c: &Containerd, memory_mib: u32) -> Hearth {
        let vm_state = scratch.path("distro-vms");
        let vm_config = scratch.path("distro-vm.toml");
        let disks = format!("disk_images_dir = \"{}\"\n", scratch.path("disks").display());
        std::fs::write(&vm_config, Containerd::hearth_config_with(env, &vm_state, memory_mib, &disks)).unwrap();
        let share = scratch.path("share");
        let log_dir = scratch.path("distro-logs");
        std::fs::create_dir_all(&share).unwrap();
        let config = scratch.path("cli.toml");
        std::fs::write(
            &config,
            format!(
                "containerd_address = \"{}\"\nvm_config = \"{}\"\ncache_dir = \"{}\"\nlog_dir = \"{}\"\nhost_share = \"{}\"\nstop_timeout_secs = 120\n",
                c.socket.display(),
                vm_config.display(),
                env.cache.display(),
                log_dir.display(),
                share.display()
            ),
        )
        .unwrap();
        let user_config_home = scratch.path("xdg");
        Hearth {
            bin: env.cli.clone(),
            config,
            user_config_home,
            share,
            log_dir,
            vm_state,
            containerd_log: c.log_path(),
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("HEARTH_CLI_CONFIG", &self.config)
            .env("XDG_CONFIG_HOME", &self.user_config_home)
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("HEARTH_NAMESPACE");
        cmd
    }

    /// Runs hearth with `stdin` as its input, killed (and the test failed)
    /// after `guard`.
    pub fn run_with(&self, args: &[&str], stdin: &[u8], guard: Duration) -> Output {
        self.run_in(args, stdin, guard, None)
    }

    pub fn run_in(&self, args: &[&str], stdin: &[u8], guard: Duration, dir: Option<&Path>) -> Output {
        use std::io::Write;
        let mut cmd = self.command(args);
        if let Some(d) = dir {
            cmd.current_dir(d);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting hearth (built by the xtask)");
        let mut input = child.stdin.take().unwrap();
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let out = crate::output_within(child, guard);
        let _ = writer.join();
        out.unwrap_or_else(|| panic!("hearth {args:?} hung (killed after {guard:?})\n{}", self.diagnostics()))
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, b"", Duration::from_secs(900))
    }

    /// hearth that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "hearth {args:?} failed ({}):\n{}\n{}", o.status, text(&o), self.diagnostics());
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// hearth that must fail as hearth's own failures do (status 125),
    /// saying `want` on stderr.
    pub fn fails(&self, args: &[&str], want: &str) {
        let o = self.run(args);
        assert_eq!(o.status.code(), Some(125), "hearth {args:?}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "hearth {args:?} should say {want:?}: {err}");
    }

    /// A shell script in distro `name`, which must succeed; its stdout.
    pub fn sh(&self, name: &str, script: &str) -> String {
        self.ok(&["-d", name, "--", "sh", "-c", script])
    }

    /// The distro's console log, the VMs' consoles and containerd's log.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        for dir in [&self.log_dir] {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                s.push_str(&format!("--- {} (last 40 lines) ---\n{}\n", e.path().display(), tail(&text, 40)));
            }
        }
        for e in std::fs::read_dir(&self.vm_state).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(e.path().join("jail/console.log")).unwrap_or_default();
            s.push_str(&format!("--- {} console (last 40 lines) ---\n{}\n", e.path().display(), tail(&text, 40)));
        }
        let log = std::fs::read_to_string(&self.containerd_log).unwrap_or_default();
        let log: Vec<&str> = log.lines().filter(|l| !l.contains("loading plugin")).collect();
        s.push_str(&format!("--- containerd (last 60 lines) ---\n{}\n", tail(&log.join("\n"), 60)));
        s
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "--- stdout ---\n{}--- stderr ---\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// systemd's verdict once its boot is over: `running`, or `degraded` with
/// the failed units (none is expected: the suite fails on any, naming it).
pub fn wait_for_systemd(h: &Hearth, name: &str) {
    // Its manager's socket first (before it, systemctl cannot ask), then
    // the end of the boot.
    let wait = "for i in $(seq 600); do [ -S /run/systemd/private ] && break; sleep 2; done; \
                systemctl is-system-running --wait";
    let o = h.run_with(&["-d", name, "--", "sh", "-c", wait], b"", Duration::from_secs(1500));
    let state = String::from_utf8_lossy(&o.stdout).trim().to_string();
    if state != "running" {
        let failed = h.run(&["-d", name, "--", "systemctl", "--failed", "--no-pager", "--no-legend"]);
        panic!(
            "systemd in {name} is {state:?}, not running; failed units:\n{}\n{}\n{}",
            String::from_utf8_lossy(&failed.stdout),
            text(&o),
            h.diagnostics()
        );
    }
}
