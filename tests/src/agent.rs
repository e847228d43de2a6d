//! Driving a hearth agent the way its callers do, over ttrpc, with stdio on
//! streams of their own; and the container lifecycle cases that the native
//! tests and the `agent` e2e suite both run, so that the VM and the host are
//! held to the same expectations.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hearth_agent_protocol::agent::*;
use hearth_agent_protocol::transport::{
    accept_stdio, listen_stdio, stdio_socket_path, AgentAddress, StdioToken, STDIO_TOKEN_LEN,
};
use hearth_agent_protocol::AgentClient;
use serde_json::{json, Value};

/// Generous guard for one call: a hang fails the case instead of the suite.
const CALL: i64 = 120_000_000_000;

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(CALL)
}

/// The gRPC status code of a failed call.
pub fn code_of(e: &ttrpc::Error) -> Option<ttrpc::Code> {
    match e {
        ttrpc::Error::RpcStatus(s) => Some(s.code()),
        _ => None,
    }
}

/// A rootfs directory with busybox and the guest test tool, built on the
/// host: the lower layer of every test container.
pub fn busybox_rootfs(dir: &Path, guest_tool: &Path) -> Result<()> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    for d in ["proc", "sys", "dev", "tmp", "etc", "root", "mnt", "run"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy("/bin/busybox", bin.join("busybox")).context("copying /bin/busybox (busybox-static)")?;
    std::fs::copy(guest_tool, bin.join("hearth-guest-tool")).context("copying hearth-guest-tool")?;
    let list = std::process::Command::new("/bin/busybox").arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = bin.join(applet);
        if applet != "busybox" && !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")?;
    Ok(())
}

/// A spec like `runc spec` makes, running `args`, with a tmpfs on /tmp (the
/// root is an overlay, and an overlay cannot be the upper layer of another).
pub fn spec(args: &[&str]) -> Value {
    let caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "hearth-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// The capabilities a privileged container has, for mounting inside it;
/// without CAP_SYS_RESOURCE, which the machines we test on do not give even
/// to root (the agent refuses capabilities it does not have itself).
pub fn privileged(mut s: Value) -> Value {
    let all: Vec<String> = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
    ]
    .iter()
    .map(|c| format!("CAP_{c}"))
    .collect();
    s["process"]["capabilities"] = json!({"bounding": all, "effective": all, "permitted": all});
    s["process"]["noNewPrivileges"] = json!(false);
    s
}

/// Gives the container /dev/fuse, in the device list and the cgroup rules.
pub fn with_fuse(mut s: Value) -> Value {
    s["linux"]["devices"] =
        json!([{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438, "uid": 0, "gid": 0}]);
    s["linux"]["resources"]["devices"]
        .as_array_mut()
        .unwrap()
        .push(json!({"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rwm"}));
    s
}

/// What the caller holds of a process's stdio.
#[derive(Default)]
pub struct Io {
    pub stdin: Option<UnixStream>,
    /// The PTY stream, input and output.
    pub pty: Option<UnixStream>,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl Io {
    /// Output collected until the agent closed the streams.
    pub fn output(&mut self) -> (String, String) {
        let take = |h: Option<JoinHandle<Vec<u8>>>| {
            h.map(|h| String::from_utf8_lossy(&h.join().unwrap_or_default()).into_owned()).unwrap_or_default()
        };
        (take(self.stdout.take()), take(self.stderr.take()))
    }
}

/// Accepts the agent's connection on a stdio port, the one presenting the
/// stream's token, giving up after a while (if the request failed, nobody
/// ever comes but the caller's own wake-up, see PendingIo::finish).
fn accept_one(l: UnixListener, token: StdioToken) -> Option<UnixStream> {
    accept_stdio(&l, &token, Duration::from_secs(120)).ok().map(|(s, _)| s)
}

/// Wakes an acceptor whose agent will never connect (the request failed)
/// with a connection of our own that presents the token and ends at once.
fn wake(sock: &Path, port: u32, token: &[u8]) {
    if let Ok(mut s) = UnixStream::connect(stdio_socket_path(sock, port)) {
        let _ = s.write_all(token);
    }
}

/// A stdio port's listener and token, as the shim makes them.
fn listen(sock: &Path, port: u32) -> Result<(UnixListener, StdioToken)> {
    Ok((listen_stdio(sock, port)?, StdioToken::random()?))
}

/// How a run went.
#[derive(Debug)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub wait: WaitProcessResponse,
}

/// A connection to an agent, and where the test rootfs is in its view.
pub struct Agent {
    pub addr: AgentAddress,
    pub client: AgentClient,
    /// The busybox rootfs directory as the agent sees it.
    pub rootfs: PathBuf,
    next_port: AtomicU32,
}

impl Agent {
    pub fn connect(addr: AgentAddress, rootfs: PathBuf, timeout: Duration) -> Result<Agent> {
        let client = addr.connect_when_ready(timeout)?;
        Ok(Agent { addr, client, rootfs, next_port: AtomicU32::new(20_000) })
    }

    pub fn port(&self) -> u32 {
        self.next_port.fetch_add(1, Ordering::SeqCst)
    }

    /// Listens on fresh ports; the agent connects while creating.
    fn stdio(&self, terminal: bool, stdin: bool) -> Result<(Stdio, PendingIo)> {
        let sock = self.addr.socket();
        let mut req = Stdio { terminal, ..Default::default() };
        let mut p = PendingIo::default();
        if terminal {
            req.stdout_port = self.port();
            let (l, t) = listen(sock, req.stdout_port)?;
            req.stdout_token = t.as_bytes().to_vec();
            p.ports.push((req.stdout_port, t.clone()));
            p.pty = Some(std::thread::spawn(move || accept_one(l, t)));
            return Ok((req, p));
        }
        if stdin {
            req.stdin_port = self.port();
            let (l, t) = listen(sock, req.stdin_port)?;
            req.stdin_token = t.as_bytes().to_vec();
            p.ports.push((req.stdin_port, t.clone()));
            p.stdin = Some(std::thread::spawn(move || accept_one(l, t)));
        }
        for (port, token, slot) in [
            (&mut req.stdout_port, &mut req.stdout_token, &mut p.stdout),
            (&mut req.stderr_port, &mut req.stderr_token, &mut p.stderr),
        ] {
            *port = self.port();
            let (l, t) = listen(sock, *port)?;
            *token = t.as_bytes().to_vec();
            p.ports.push((*port, t.clone()));
            *slot = Some(std::thread::spawn(move || {
                let mut out = Vec::new();
                if let Some(mut s) = accept_one(l, t) {
                    let _ = s.read_to_end(&mut out);
                }
                out
            }));
        }
        Ok((req, p))
    }

    fn rootfs_overlay(&self) -> Rootfs {
        Rootfs { lower_dirs: vec![self.rootfs.display().to_string()], ..Default::default() }
    }

    /// Creates a container on the busybox rootfs (as the lower layer of an
    /// overlay of its own).
    pub fn create(&self, id: &str, spec: &Value, stdin: bool) -> Result<(u32, Io)> {
        let terminal = spec["process"]["terminal"].as_bool().unwrap_or(false);
        let (stdio, pending) = self.stdio(terminal, stdin)?;
        let req = CreateContainerRequest {
            container_id: id.into(),
            spec_json: serde_json::to_vec(spec)?,
            rootfs: Some(self.rootfs_overlay()).into(),
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        let r = self.client.create_container(ctx(), &req);
        let mut io = pending.finish(self.addr.socket(), r.is_ok());
        match r {
            Ok(r) => Ok((r.pid, io)),
            // What the process wrote before it failed says why.
            Err(e) => Err(anyhow::Error::new(e).context(format!("creating {id}; its stderr: {:?}", io.output().1))),
        }
    }

    pub fn start(&self, id: &str) -> Result<()> {
        self.client.start_container(ctx(), &ContainerRequest { container_id: id.into(), ..Default::default() })?;
        Ok(())
    }

    pub fn exec(&self, id: &str, exec_id: &str, args: &[&str], terminal: bool, stdin: bool) -> Result<(u32, Io)> {
        let mut process = spec(args)["process"].clone();
        process["terminal"] = json!(terminal);
        let (stdio, pending) = self.stdio(terminal, stdin)?;
        let req = ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process_json: serde_json::to_vec(&process)?,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        let r = self.client.exec_process(ctx(), &req);
        let io = pending.finish(self.addr.socket(), r.is_ok());
        let pid = r.with_context(|| format!("exec {exec_id} in {id}"))?.pid;
        Ok((pid, io))
    }

    pub fn wait(&self, id: &str, exec_id: &str) -> Result<WaitProcessResponse> {
        let req = ProcessRequest { container_id: id.into(), exec_id: exec_id.into(), ..Default::default() };
        Ok(self.client.wait_process(ctx(), &req)?)
    }

    pub fn signal(&self, id: &str, exec_id: &str, signal: i32) -> ttrpc::Result<Empty> {
        let req = SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal: signal as u32,
            ..Default::default()
        };
        self.client.signal_process(ctx(), &req)
    }

    pub fn delete(&self, id: &str) -> Result<()> {
        let req = DeleteContainerRequest { container_id: id.into(), force: true, ..Default::default() };
        self.client.delete_container(ctx(), &req).with_context(|| format!("deleting {id}"))?;
        Ok(())
    }

    pub fn stats(&self, id: &str) -> Result<StatsResponse> {
        Ok(self.client.stats(ctx(), &ContainerRequest { container_id: id.into(), ..Default::default() })?)
    }

    /// Create, start, wait, collect the output, delete.
    pub fn run(&self, id: &str, spec: &Value) -> Result<Outcome> {
        let (_, mut io) = self.create(id, spec, false)?;
        self.start(id)?;
        let wait = self.wait(id, "")?;
        let (stdout, stderr) = io.output();
        self.delete(id)?;
        Ok(Outcome { stdout, stderr, wait })
    }
}

#[derive(Default)]
struct PendingIo {
    stdin: Option<JoinHandle<Option<UnixStream>>>,
    pty: Option<JoinHandle<Option<UnixStream>>>,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    /// Each stream's port and token.
    ports: Vec<(u32, StdioToken)>,
}

impl PendingIo {
    fn finish(self, sock: &Path, created: bool) -> Io {
        if !created {
            for (port, token) in &self.ports {
                wake(sock, *port, token.as_bytes());
            }
        }
        let join = |h: Option<JoinHandle<Option<UnixStream>>>| h.and_then(|h| h.join().ok().flatten());
        let io = Io { stdin: join(self.stdin), pty: join(self.pty), stdout: self.stdout, stderr: self.stderr };
        for (port, _) in &self.ports {
            let _ = std::fs::remove_file(stdio_socket_path(sock, *port));
        }
        io
    }
}

/// Reads from a PTY stream until `needle` appears (or it ends).
fn read_until(s: &mut UnixStream, needle: &str) -> Result<String> {
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).context("reading the PTY stream")?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&seen).contains(needle) {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&seen).into_owned())
}

// ---- The cases. Each cleans up after itself, passing or failing. ----

/// Output, error output and the exit code come back exactly; the container
/// has its own hostname and PID namespace.
pub fn case_output_and_exit_code(a: &Agent) -> Result<()> {
    let o = a.run("echo", &spec(&["/bin/sh", "-c", "echo hi; echo oops >&2; exit 3"]))?;
    ensure!(o.stdout == "hi\n", "stdout {:?}", o.stdout);
    ensure!(o.stderr == "oops\n", "stderr {:?}", o.stderr);
    ensure!(o.wait.exit_status == 3, "exit status {}", o.wait.exit_status);
    ensure!(o.wait.exited_at_unix_nanos > 0, "no exit time");
    let o = a.run("ns", &spec(&["/bin/sh", "-c", "echo $$ $(hostname)"]))?;
    ensure!(o.stdout == "1 hearth-test\n", "pid and hostname inside: {:?}", o.stdout);
    Ok(())
}

/// Input reaches the process in order and ends when the caller ends its
/// stream; CloseStdin ends the input of a process that is waiting for more.
pub fn case_stdin(a: &Agent) -> Result<()> {
    let (_, mut io) = a.create("stdin", &spec(&["/bin/sh", "-c", "cat; echo done"]), true)?;
    a.start("stdin")?;
    let s = io.stdin.as_mut().context("no stdin stream")?;
    s.write_all(b"line one\nline two\n")?;
    s.shutdown(std::net::Shutdown::Write)?;
    let w = a.wait("stdin", "")?;
    let (out, _) = io.output();
    a.delete("stdin")?;
    ensure!(w.exit_status == 0, "exit {}", w.exit_status);
    ensure!(out == "line one\nline two\ndone\n", "stdout {out:?}");

    let (_, mut io) = a.create("close", &spec(&["/bin/sh", "-c", "cat; echo closed"]), true)?;
    a.start("close")?;
    a.client.close_stdin(ctx(), &ProcessRequest { container_id: "close".into(), ..Default::default() })?;
    let w = a.wait("close", "")?;
    let (out, _) = io.output();
    a.delete("close")?;
    ensure!(w.exit_status == 0 && out == "closed\n", "after CloseStdin: exit {} stdout {out:?}", w.exit_status);
    Ok(())
}

/// exec into a running container: output, exit code, its pid visible in the
/// container's pid list; SIGKILL to the init is 137.
pub fn case_exec(a: &Agent) -> Result<()> {
    let id = "exec";
    let (init, _io) = a.create(id, &spec(&["/bin/sleep", "1000"]), false)?;
    a.start(id)?;
    let result = (|| {
        let (_, mut io) =
            a.exec(id, "e1", &["/bin/sh", "-c", "echo from-exec; cat /proc/1/cmdline; exit 7"], false, false)?;
        let w = a.wait(id, "e1")?;
        let (out, _) = io.output();
        ensure!(w.exit_status == 7, "exec exit {}", w.exit_status);
        ensure!(out == "from-exec\n/bin/sleep\x001000\x00", "exec stdout {out:?}");
        let pids = a.client.list_pids(ctx(), &ContainerRequest { container_id: id.into(), ..Default::default() })?;
        ensure!(pids.pids.contains(&init), "pids {:?} lack the init {init}", pids.pids);
        let st =
            a.client.state_container(ctx(), &ContainerRequest { container_id: id.into(), ..Default::default() })?;
        ensure!(st.status.enum_value() == Ok(ContainerStatus::RUNNING), "state {:?}", st.status);
        ensure!(st.processes.iter().any(|p| p.exec_id == "e1" && p.exited && p.exit_status == 7), "{st:?}");
        // Deleted, an exec's id can be used again.
        let e1 = ProcessRequest { container_id: id.into(), exec_id: "e1".into(), ..Default::default() };
        a.client.delete_process(ctx(), &e1)?;
        let (_, mut io) = a.exec(id, "e1", &["/bin/echo", "again"], false, false)?;
        ensure!(a.wait(id, "e1")?.exit_status == 0, "the reused exec id failed");
        ensure!(io.output().0 == "again\n", "the reused exec id's output");
        let init_del = ProcessRequest { container_id: id.into(), ..Default::default() };
        ensure!(a.client.delete_process(ctx(), &init_del).is_err(), "DeleteProcess took the init");
        a.signal(id, "", libc::SIGKILL)?;
        let w = a.wait(id, "")?;
        ensure!(w.exit_status == 137, "init after SIGKILL: {}", w.exit_status);
        ensure!(!w.oom_killed, "a plain SIGKILL reported as OOM");
        Ok(())
    })();
    let d = a.delete(id);
    result.and(d)
}

/// A PTY process sees the size it is given and talks over one stream.
pub fn case_pty_resize(a: &Agent) -> Result<()> {
    let id = "pty";
    let mut s = spec(&["/bin/sh"]);
    s["process"]["terminal"] = json!(true);
    let (_, mut io) = a.create(id, &s, false)?;
    let result = (|| {
        a.start(id)?;
        let req = ResizePtyRequest { container_id: id.into(), width: 100, height: 40, ..Default::default() };
        a.client.resize_pty(ctx(), &req)?;
        let pty = io.pty.as_mut().context("no PTY stream")?;
        pty.write_all(b"stty size; tty; exit 4\n")?;
        let seen = read_until(pty, "/dev/pts/")?;
        ensure!(seen.contains("40 100"), "stty size in the PTY: {seen:?}");
        let w = a.wait(id, "")?;
        ensure!(w.exit_status == 4, "exit {}", w.exit_status);
        // A process without a terminal has nothing to resize.
        let (_, _io2) = a.create("nopty", &spec(&["/bin/true"]), false)?;
        let req = ResizePtyRequest { container_id: "nopty".into(), width: 1, height: 1, ..Default::default() };
        let e = a.client.resize_pty(ctx(), &req).unwrap_err();
        a.delete("nopty")?;
        ensure!(code_of(&e) == Some(ttrpc::Code::FAILED_PRECONDITION), "{e:?}");
        Ok(())
    })();
    let d = a.delete(id);
    result.and(d)
}

/// Signals: SIGTERM and SIGKILL are reported as 128+n; a signal to a dead
/// process and an exec into a stopped container are clear errors.
pub fn case_signals(a: &Agent) -> Result<()> {
    let id = "sig";
    a.create(id, &spec(&["/bin/sleep", "1000"]), false)?;
    let result = (|| {
        a.start(id)?;
        a.signal(id, "", libc::SIGKILL)?;
        let w = a.wait(id, "")?;
        ensure!(w.exit_status == 137, "exit {}", w.exit_status);
        let e = a.signal(id, "", libc::SIGTERM).unwrap_err();
        ensure!(code_of(&e) == Some(ttrpc::Code::NOT_FOUND), "signal to a dead process: {e:?}");
        let e =
            a.exec(id, "late", &["/bin/true"], false, false).err().context("exec into a stopped container worked")?;
        let e = e.downcast::<ttrpc::Error>()?;
        ensure!(code_of(&e) == Some(ttrpc::Code::FAILED_PRECONDITION), "exec into a stopped container: {e:?}");
        Ok(())
    })();
    let d = a.delete(id);
    result.and(d)?;
    // SIGTERM to a process that is not a PID namespace's init (an init
    // ignores signals it has no handler for, as under runc) kills it: 143.
    a.create("term", &spec(&["/bin/sleep", "1000"]), false)?;
    let result = (|| {
        a.start("term")?;
        a.exec("term", "sleeper", &["/bin/sleep", "1000"], false, false)?;
        a.signal("term", "sleeper", libc::SIGTERM)?;
        let w = a.wait("term", "sleeper")?;
        ensure!(w.exit_status == 143, "exit after SIGTERM {}", w.exit_status);
        Ok(())
    })();
    let d = a.delete("term");
    result.and(d)
}

/// A memory limit is enforced: the process is OOM-killed, the wait says so,
/// an OOM event arrives and the statistics count it.
pub fn case_oom(a: &Agent) -> Result<()> {
    let id = "oom";
    let mut s = spec(&["/bin/hearth-guest-tool", "hog", "512"]);
    s["linux"]["resources"]["memory"] = json!({"limit": 32 * 1024 * 1024, "swap": 32 * 1024 * 1024});
    let (_, mut io) = a.create(id, &s, false)?;
    let result = (|| {
        a.start(id)?;
        let w = a.wait(id, "")?;
        let (out, err) = io.output();
        ensure!(w.exit_status == 137, "exit {} (stdout {out:?}, stderr {err:?})", w.exit_status);
        ensure!(w.oom_killed, "the wait did not report the OOM kill");
        ensure!(!out.contains("hog: done"), "the hog finished under a 32 MiB limit: {out:?}");
        let ev = a.client.get_oom_event(ttrpc::context::with_timeout(30_000_000_000), &Empty::new())?;
        ensure!(ev.container_id == id, "OOM event for {:?}", ev.container_id);
        let st = a.stats(id)?;
        ensure!(st.memory.oom_kill_events >= 1, "stats: {:?}", st.memory);
        ensure!(st.memory.limit_bytes == 32 * 1024 * 1024, "limit {}", st.memory.limit_bytes);
        Ok(())
    })();
    let d = a.delete(id);
    result.and(d)
}

/// A pids limit is enforced: forks beyond it fail inside the container, and
/// the statistics show the limit reached, never passed.
pub fn case_pids_limit(a: &Agent) -> Result<()> {
    let id = "pids";
    let mut s = spec(&["/bin/sleep", "1000"]);
    s["linux"]["resources"]["pids"] = json!({"limit": 8});
    a.create(id, &s, false)?;
    let result = (|| {
        a.start(id)?;
        let script = "for i in $(seq 1 20); do sleep 1000 >/dev/null 2>&1 & done; echo spawned";
        let (_, mut io) = a.exec(id, "forker", &["/bin/sh", "-c", script], false, false)?;
        let w = a.wait(id, "forker")?;
        let (_, err) = io.output();
        ensure!(
            err.contains("can't fork") || err.contains("Resource temporarily unavailable"),
            "exit {} stderr {err:?}",
            w.exit_status
        );
        let st = a.stats(id)?;
        ensure!(st.pids.limit == 8, "pids limit {}", st.pids.limit);
        ensure!((2..=8).contains(&st.pids.current), "pids current {} under a limit of 8", st.pids.current);
        Ok(())
    })();
    let d = a.delete(id);
    result.and(d)
}

/// A FUSE filesystem mounted inside a container given /dev/fuse.
pub fn case_fuse(a: &Agent) -> Result<()> {
    let script = "mkdir -p /mnt/f; hearth-guest-tool fuse-hello /mnt/f & \
                  for i in $(seq 1 200); do [ -f /mnt/f/hello.txt ] && break; sleep 0.05; done; \
                  cat /mnt/f/hello.txt; grep -c ' /mnt/f fuse' /proc/mounts; umount /mnt/f; wait";
    let o = a.run("fuse", &with_fuse(privileged(spec(&["/bin/sh", "-c", script]))))?;
    ensure!(o.stdout.contains("hello from fuse\n"), "stdout {:?} stderr {:?}", o.stdout, o.stderr);
    ensure!(o.wait.exit_status == 0, "exit {} stderr {:?}", o.wait.exit_status, o.stderr);
    // Without the device, there is no FUSE.
    let o =
        a.run("nofuse", &privileged(spec(&["/bin/sh", "-c", "test -e /dev/fuse && echo present || echo absent"])))?;
    ensure!(o.stdout == "absent\n", "/dev/fuse without asking: {:?}", o.stdout);
    Ok(())
}

/// overlayfs mounted inside a container.
pub fn case_overlay_inside(a: &Agent) -> Result<()> {
    let script = "cd /tmp && mkdir l u w m && echo lower > l/f && \
                  mount -t overlay overlay -o lowerdir=/tmp/l,upperdir=/tmp/u,workdir=/tmp/w /tmp/m && \
                  echo upper >> m/f && cat m/f l/f && ls u";
    let o = a.run("overlay", &privileged(spec(&["/bin/sh", "-c", script])))?;
    ensure!(o.wait.exit_status == 0, "exit {} stderr {:?}", o.wait.exit_status, o.stderr);
    ensure!(o.stdout == "lower\nupper\nlower\nf\n", "stdout {:?}", o.stdout);
    Ok(())
}

/// Bad requests get clear errors and the agent keeps serving.
pub fn case_bad_input(a: &Agent) -> Result<()> {
    let expect = |r: ttrpc::Result<CreateContainerResponse>, code: ttrpc::Code, words: &str| -> Result<()> {
        match r {
            Ok(_) => bail!("accepted; expected {code:?} mentioning {words:?}"),
            Err(e) => {
                ensure!(code_of(&e) == Some(code), "{e:?}, expected {code:?}");
                ensure!(format!("{e:?}").contains(words), "{e:?} does not mention {words:?}");
                Ok(())
            }
        }
    };
    let rootfs = Some(Rootfs { lower_dirs: vec![a.rootfs.display().to_string()], ..Default::default() });
    let mut req = CreateContainerRequest {
        container_id: "bad".into(),
        spec_json: b"{\"ociVersion\": \"1.0.2\", \"process\": ".to_vec(),
        rootfs: rootfs.clone().into(),
        ..Default::default()
    };
    expect(a.client.create_container(ctx(), &req), ttrpc::Code::INVALID_ARGUMENT, "not valid JSON")?;
    req.spec_json = serde_json::to_vec(&spec(&[]))?;
    expect(a.client.create_container(ctx(), &req), ttrpc::Code::INVALID_ARGUMENT, "process.args is empty")?;
    req.spec_json = serde_json::to_vec(&spec(&["/bin/true"]))?;
    req.rootfs = Some(Rootfs { path: "/no/such/rootfs".into(), ..Default::default() }).into();
    expect(a.client.create_container(ctx(), &req), ttrpc::Code::INVALID_ARGUMENT, "/no/such/rootfs")?;
    req.container_id = "../escape".into();
    expect(a.client.create_container(ctx(), &req), ttrpc::Code::INVALID_ARGUMENT, "is not valid")?;
    // A program that is not there fails at create, as with runc.
    req.container_id = "noexe".into();
    req.rootfs = rootfs.into();
    req.spec_json = serde_json::to_vec(&spec(&["/bin/no-such-program"]))?;
    let r = a.client.create_container(ctx(), &req);
    if r.is_ok() {
        // libcontainer may find out only at start; then start must fail.
        let started = a.start("noexe");
        let _ = a.delete("noexe");
        ensure!(started.is_err(), "a missing program started");
    }
    let unknown = ContainerRequest { container_id: "nobody".into(), ..Default::default() };
    for r in [
        a.client.start_container(ctx(), &unknown).map(|_| ()),
        a.client.state_container(ctx(), &unknown).map(|_| ()),
        a.client.stats(ctx(), &unknown).map(|_| ()),
        a.signal("nobody", "", libc::SIGTERM).map(|_| ()),
        a.client
            .delete_container(ctx(), &DeleteContainerRequest { container_id: "nobody".into(), ..Default::default() })
            .map(|_| ()),
    ] {
        let e = r.err().context("an unknown container was accepted")?;
        ensure!(code_of(&e) == Some(ttrpc::Code::NOT_FOUND), "{e:?}");
    }
    // The same id twice.
    a.create("twice", &spec(&["/bin/true"]), false)?;
    let r = a.create("twice", &spec(&["/bin/true"]), false);
    a.delete("twice")?;
    let e = r.err().context("a duplicate id was accepted")?.downcast::<ttrpc::Error>()?;
    ensure!(code_of(&e) == Some(ttrpc::Code::ALREADY_EXISTS), "{e:?}");
    // Still serving.
    let h = a.client.health(ctx(), &Empty::new())?;
    ensure!(h.boot_id.len() == 36, "health after bad input: {h:?}");
    Ok(())
}

/// A process that reaches a stdio port before the agent does (in a VM: a
/// container's process connecting to the host's vsock port; natively: a
/// process connecting to the socket) is closed unread: the victim's output
/// arrives whole and only from the agent, and the impostor reads nothing.
pub fn case_stdio_impostors(a: &Agent) -> Result<()> {
    let sock = a.addr.socket().to_path_buf();
    let port = a.port();
    let (listener, token) = listen(&sock, port)?;
    let token_bytes = token.as_bytes().to_vec();
    let in_vm = matches!(a.addr, AgentAddress::HybridVsock { .. });

    // The impostor connects first, and says so before the victim is made.
    let mut guest_io = None;
    let mut local = None;
    if in_vm {
        let mut s = spec(&["/bin/hearth-guest-tool", "stdio-impostor", "2", &port.to_string()]);
        s["process"]["terminal"] = json!(true);
        let (_, mut io) = a.create("impostor", &s, false)?;
        a.start("impostor")?;
        let pty = io.pty.as_mut().context("no PTY stream for the impostor")?;
        let seen = read_until(pty, "HEARTH-IMPOSTOR: connected")?;
        ensure!(seen.contains("HEARTH-IMPOSTOR: connected"), "the impostor never connected: {seen:?}");
        guest_io = Some(io);
    } else {
        let mut s = UnixStream::connect(stdio_socket_path(&sock, port))?;
        s.write_all(&[b'X'; STDIO_TOKEN_LEN])?;
        s.write_all(b"FORGED\n")?;
        local = Some(s);
    }

    let taker = std::thread::spawn(move || -> Result<(String, hearth_agent_protocol::transport::Refused)> {
        let (mut s, refused) = accept_stdio(&listener, &token, Duration::from_secs(120))?;
        // Bounded: an accepted impostor never closes its end, and the case
        // must then fail rather than hang.
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut out = String::new();
        s.read_to_string(&mut out).context("reading the victim's stdout from the accepted connection")?;
        Ok((out, refused))
    });
    let id = "victim";
    let req = CreateContainerRequest {
        container_id: id.into(),
        spec_json: serde_json::to_vec(&spec(&["/bin/echo", "victim output"]))?,
        rootfs: Some(a.rootfs_overlay()).into(),
        stdio: Some(Stdio { stdout_port: port, stdout_token: token_bytes.clone(), ..Default::default() }).into(),
        ..Default::default()
    };
    let created = a.client.create_container(ctx(), &req);
    if created.is_err() {
        wake(&sock, port, &token_bytes);
    }
    let result = (|| {
        created.context("creating the victim")?;
        a.start(id)?;
        let w = a.wait(id, "")?;
        ensure!(w.exit_status == 0, "the victim exited {}", w.exit_status);
        let (out, refused) = taker.join().map_err(|_| anyhow::anyhow!("the stdio taker panicked"))??;
        ensure!(out == "victim output\n", "the victim's stdout as the caller got it: {out:?}");
        ensure!(refused.wrong == 1, "the impostor's connection was not the one refused: {refused:?}");

        // The impostor got nothing of the stream, only its end.
        if let Some(mut io) = guest_io.take() {
            let w = a.wait("impostor", "")?;
            let pty = io.pty.as_mut().context("no PTY stream for the impostor")?;
            let seen = read_until(pty, "HEARTH-IMPOSTOR: read")?;
            ensure!(seen.contains("HEARTH-IMPOSTOR: read 0 bytes"), "the impostor's report: {seen:?}");
            ensure!(w.exit_status == 0, "the impostor exited {}", w.exit_status);
        }
        if let Some(mut s) = local.take() {
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut got = Vec::new();
            if let Err(e) = s.read_to_end(&mut got) {
                ensure!(e.kind() == std::io::ErrorKind::ConnectionReset, "the impostor's read: {e}");
            }
            ensure!(got.is_empty(), "the impostor read {got:?}");
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(stdio_socket_path(&sock, port));
    let d = a.delete(id);
    let d2 = if in_vm { a.delete("impostor") } else { Ok(()) };
    result.and(d).and(d2)
}

pub type Case = fn(&Agent) -> Result<()>;

/// Runs every case (or those whose names contain one of the comma-separated
/// words in `HEARTH_AGENT_CASES`), reporting each; the failures, described.
pub fn run_cases(agent: &Agent) -> Vec<String> {
    let filter = std::env::var("HEARTH_AGENT_CASES").unwrap_or_default();
    let mut failed = Vec::new();
    for (name, case) in CASES {
        if !filter.is_empty() && !filter.split(',').any(|f| name.contains(f)) {
            continue;
        }
        let t = Instant::now();
        match case(agent) {
            Ok(()) => eprintln!("case {name} ... ok ({:.1} s)", t.elapsed().as_secs_f64()),
            Err(e) => {
                eprintln!("case {name} ... FAILED: {e:#}");
                failed.push(format!("{name}: {e:#}"));
            }
        }
    }
    failed
}

/// Every case, by name, for the suites to run one test each.
pub const CASES: &[(&str, Case)] = &[
    ("output_and_exit_code", case_output_and_exit_code),
    ("stdin", case_stdin),
    ("exec", case_exec),
    ("pty_resize", case_pty_resize),
    ("signals", case_signals),
    ("oom", case_oom),
    ("pids_limit", case_pids_limit),
    ("fuse", case_fuse),
    ("overlay_inside", case_overlay_inside),
    ("bad_input", case_bad_input),
    ("stdio_impostors", case_stdio_impostors),
];
