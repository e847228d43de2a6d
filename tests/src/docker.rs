//! A dockerd of the tests' own (Docker 26 from Debian 13, which `cargo
//! xtask setup` pins), on a containerd of the tests' own with the hearth
//! shim on its PATH: used by the `docker` suite. Its data root is a tmpfs
//! (overlay2 needs a filesystem that can be an overlay's upper layer), its
//! exec root, socket and log are in the scratch directory, and its
//! configuration names hearth as a runtime the way docs/usage.md shows.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::containerd::{tail, Containerd};
use crate::{Env, Scratch};

/// Debian 13's Docker CLI (a Docker CLI elsewhere on the PATH may be
/// another version).
pub const DOCKER: &str = "/usr/bin/docker";
pub const IMAGE: &str = "hearth/busybox:latest";
/// The name daemon.json gives hearth, as docs/usage.md shows.
pub const HEARTH: &str = "hearth";

/// The daemon.json of the suite: hearth as a named runtime (docs/usage.md).
pub const DAEMON_JSON: &str = r#"{ "runtimes": { "hearth": { "runtimeType": "io.containerd.hearth.v2" } } }"#;

pub struct Dockerd {
    child: Child,
    pub socket: PathBuf,
    root: PathBuf,
    log: PathBuf,
    pub containerd: Containerd,
}

impl Dockerd {
    /// Starts containerd (hearth's VMs idle out after 30 s), then dockerd
    /// on it, and loads the busybox image.
    pub fn start(env: &Env, scratch: &Scratch) -> Dockerd {
        let containerd = Containerd::start(env, scratch, 30);
        let root = scratch.path("docker-root");
        std::fs::create_dir_all(&root).unwrap();
        crate::host(Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(&root));
        let config = scratch.path("daemon.json");
        std::fs::write(&config, DAEMON_JSON).unwrap();
        let socket = scratch.path("docker.sock");
        let log = scratch.path("dockerd.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("dockerd")
            .arg("--config-file")
            .arg(&config)
            .arg("--data-root")
            .arg(&root)
            .arg("--exec-root")
            .arg(scratch.path("docker-exec"))
            .arg("--pidfile")
            .arg(scratch.path("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("--containerd")
            .arg(&containerd.socket)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("starting dockerd (docker.io, installed by `cargo xtask setup`)");
        let d = Dockerd { child, socket, root, log, containerd };
        let deadline = Instant::now() + Duration::from_secs(120);
        while !d.docker(&["version"]).status.success() {
            assert!(Instant::now() < deadline, "dockerd did not come up:\n{}", tail(&d.log_text(), 40));
            std::thread::sleep(Duration::from_millis(300));
        }
        d.ok(&["load", "-q", "-i", &env.busybox_image.display().to_string()]);
        d
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn command(&self) -> Command {
        let mut c = Command::new(DOCKER);
        c.env("DOCKER_HOST", format!("unix://{}", self.socket.display()));
        c
    }

    /// `docker` with these arguments, killed (and the test failed) if it
    /// has not ended after five minutes.
    pub fn docker(&self, args: &[&str]) -> Output {
        self.docker_in(args, b"")
    }

    /// [`Dockerd::docker`] with `input` on its stdin, then its end.
    pub fn docker_in(&self, args: &[&str], input: &[u8]) -> Output {
        self.run(args, input, false)
    }

    /// [`Dockerd::docker`] with `input` on its stdin, which stays open
    /// until the command ends: Docker 26 can drop input that arrives with
    /// its end-of-file before `docker run -i` has attached (with runc too).
    pub fn docker_reading(&self, args: &[&str], input: &[u8]) -> Output {
        self.run(args, input, true)
    }

    fn run(&self, args: &[&str], input: &[u8], hold_stdin: bool) -> Output {
        let guard = Duration::from_secs(300);
        let mut child = self
            .command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting docker (docker-cli, installed by `cargo xtask setup`)");
        let mut stdin = child.stdin.take().unwrap();
        let held = if hold_stdin {
            stdin.write_all(input).unwrap();
            Some(stdin)
        } else {
            // A thread, so that a command that does not read cannot block us.
            let input = input.to_vec();
            std::thread::spawn(move || {
                let _ = stdin.write_all(&input);
            });
            None
        };
        let o = crate::output_within(child, guard).unwrap_or_else(|| {
            panic!("docker {args:?} hung (killed after {guard:?}); dockerd:\n{}", tail(&self.log_text(), 30))
        });
        drop(held);
        o
    }

    /// Starts container `name` detached on hearth with `extra` options,
    /// running `hearth-guest-tool tcp-echo 8080`.
    pub fn echo_server(&self, name: &str, extra: &[&str]) {
        let mut args = vec!["run", "-d", "--name", name];
        args.extend(extra);
        args.extend(["--runtime", HEARTH, IMAGE, "hearth-guest-tool", "tcp-echo", "8080"]);
        self.ok(&args);
    }

    /// `docker` that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.docker(args);
        assert!(
            o.status.success(),
            "docker {args:?} failed ({}):\n{}\n--- dockerd ---\n{}",
            o.status,
            crate::containerd::text(&o),
            tail(&self.log_text(), 30)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// A `docker` process with stdout piped, for `logs -f` and the like.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command().args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    /// `docker inspect -f FORMAT name`, trimmed.
    pub fn inspect(&self, name: &str, format: &str) -> String {
        self.ok(&["inspect", "-f", format, name]).trim().to_string()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- dockerd log (last 40 lines) ---\n{}", tail(&self.log_text(), 40));
        }
        // Containers first, so that each shim tears its VM's share down.
        let ids = self.docker(&["ps", "-aq"]);
        let ids: Vec<String> = String::from_utf8_lossy(&ids.stdout).split_whitespace().map(String::from).collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            let _ = self.docker(&args);
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        if crate::wait_timeout(&mut self.child, Duration::from_secs(30)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = Command::new("umount").arg("-R").arg("-l").arg(&self.root).status();
    }
}

/// Debian's docker-registry on a loopback port of the test host, storing
/// into the scratch directory: what `docker push`/`pull` and `ctr pull`
/// reach (a registry on 127.0.0.1 needs no TLS for either).
pub struct Registry {
    child: Child,
    pub addr: String,
}

impl Registry {
    pub fn start(scratch: &Scratch) -> Registry {
        let addr = "127.0.0.1:5000".to_string();
        let config = scratch.path("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                scratch.path("registry").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(scratch.path("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting docker-registry (installed by `cargo xtask setup`)");
        crate::containerd::wait_until("the registry listening", Duration::from_secs(60), || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        Registry { child, addr }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
