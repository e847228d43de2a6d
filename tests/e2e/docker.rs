//! e2e suite `docker`: Docker 26 (Debian 13's docker.io, pinned by `cargo
//! xtask setup`) with hearth as a runtime, as docs/usage.md configures it,
//! on a containerd of the suite's own in the test host. Where a reference
//! helps, the same command runs on runc in the same dockerd and the
//! outputs must match.

use std::process::Command;
use std::time::Duration;

use hearth_e2e::containerd::RUNTIME;
use hearth_e2e::containerd::{text, wait_until};
use hearth_e2e::docker::{Dockerd, Registry, HEARTH, IMAGE};
use hearth_e2e::{Env, Scratch};

fn out(o: &std::process::Output) -> (Option<i32>, String, String) {
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// `docker run --rm --runtime RT [extra] IMAGE cmd...` on each runtime.
fn on_both(d: &Dockerd, extra: &[&str], cmd: &[&str], input: &[u8]) -> [(Option<i32>, String, String); 2] {
    ["runc", HEARTH].map(|rt| {
        let mut args = vec!["run", "--rm", "--runtime", rt];
        args.extend(extra);
        args.push(IMAGE);
        args.extend(cmd);
        out(&d.docker_in(&args, input))
    })
}

fn assert_same(what: &str, got: &[(Option<i32>, String, String); 2]) {
    assert_eq!(got[1], got[0], "{what}: hearth (right) differs from runc (left)");
}

/// `hearth-guest-tool tcp-check ADDR 8080 BYTES` in a `docker run --rm
/// [extra] IMAGE` container: every byte echoed back.
fn tcp_check(d: &Dockerd, what: &str, extra: &[&str], addr: &str, bytes: &str) {
    let mut args = vec!["run", "--rm"];
    args.extend(extra);
    args.extend([IMAGE, "hearth-guest-tool", "tcp-check", addr, "8080", bytes]);
    let o = d.ok(&args);
    assert!(o.contains(&format!("HEARTH-TCP-CHECK: ok {bytes}")), "{what}: {o}");
}

fn host_pid_is_hearth_vmm(pid: &str) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("hearth-vmm"),
        "docker reports pid {pid}, which is not hearth-vmm: {:?}",
        String::from_utf8_lossy(&cmdline)
    );
}

#[test]
fn docker_run_gives_what_runc_gives() {
    let env = Env::get();
    let scratch = Scratch::new("docker-run");
    let d = Dockerd::start(&env, &scratch);

    // It runs in the VM: the tuned kernel, not the host's.
    let kernel = d.ok(&["run", "--rm", "--runtime", HEARTH, IMAGE, "uname", "-r"]);
    assert_eq!(kernel.trim(), env.kernel_release, "not in hearth's VM");
    // The runtime by its shim name works too, without daemon.json.
    let by_type = d.ok(&["run", "--rm", "--runtime", "io.containerd.hearth.v2", IMAGE, "uname", "-r"]);
    assert_eq!(by_type.trim(), env.kernel_release);

    let script = "echo out $FOO $(pwd); echo err >&2; exit 3";
    let got = on_both(&d, &["-e", "FOO=bar", "-w", "/tmp"], &["sh", "-c", script], b"");
    assert_same("exit code, stdout and stderr", &got);
    assert_eq!(got[1], (Some(3), "out bar /tmp\n".into(), "err\n".into()));

    // Stdin: a line read, on each runtime.
    let got = ["runc", HEARTH].map(|rt| {
        let args = ["run", "--rm", "-i", "--runtime", rt, IMAGE, "sh", "-c", "read line; echo got $line"];
        out(&d.docker_reading(&args, b"piped in\n"))
    });
    assert_same("-i", &got);
    assert_eq!(got[1], (Some(0), "got piped in\n".into(), String::new()), "-i");

    let got = on_both(&d, &["--user", "1000:1001"], &["id"], b"");
    assert_same("--user", &got);
    assert!(got[1].1.starts_with("uid=1000 gid=1001"), "{got:?}");

    let got = on_both(&d, &["--read-only"], &["sh", "-c", "touch /x; echo $?; touch /tmp/y 2>&1; echo $?"], b"");
    assert_same("--read-only", &got);
    assert!(got[1].2.contains("Read-only file system"), "{got:?}");

    let got = on_both(&d, &["--init"], &["sh", "-c", "tr '\\0' ' ' < /proc/1/cmdline"], b"");
    assert_same("--init", &got);
    assert!(got[1].1.contains("docker-init"), "{got:?}");

    // A terminal: its output comes back with the terminal's line endings.
    let got = on_both(&d, &["-t"], &["sh", "-c", "tty; echo line"], b"");
    assert_same("-t", &got);
    assert!(got[1].1.starts_with("/dev/pts/0\r\nline\r\n"), "{got:?}");

    // A terminal's size set through Docker's API (what `docker run -t`
    // does when the client's terminal changes) reaches the container's.
    let sizes = ["runc", HEARTH].map(|rt| {
        let name = format!("tty-{rt}");
        // The container's shell prints its terminal's size on SIGWINCH.
        let script = "trap 'busybox stty size' WINCH; echo ready; while :; do sleep 0.2; done";
        d.ok(&["run", "-d", "-t", "--name", &name, "--runtime", rt, IMAGE, "sh", "-c", script]);
        wait_until(&format!("{name}'s trap set"), Duration::from_secs(60), || d.ok(&["logs", &name]).contains("ready"));
        let url = format!("http://docker/containers/{name}/resize?h=33&w=101");
        hearth_e2e::host(Command::new("curl").args(["-sf", "-X", "POST", "--unix-socket"]).arg(&d.socket).arg(&url));
        let mut logs = String::new();
        wait_until(&format!("the size in {name}"), Duration::from_secs(60), || {
            logs = d.ok(&["logs", &name]);
            logs.lines().count() > 1
        });
        d.ok(&["rm", "-f", &name]);
        logs.lines().nth(1).unwrap_or_default().trim().to_string()
    });
    assert_eq!(sizes[1], sizes[0], "the resized terminal");
    assert_eq!(sizes[1].trim(), "33 101");

    // A missing command fails as runc's does (127, the message in stderr).
    let got = on_both(&d, &[], &["no-such-command"], b"");
    assert_eq!(got[1].0, got[0].0, "{got:?}");
    assert!(got[1].2.contains("no-such-command"), "{got:?}");
}

#[test]
fn a_detached_container_lives_stops_and_restarts_as_docker_says() {
    let env = Env::get();
    let scratch = Scratch::new("docker-lifecycle");
    let d = Dockerd::start(&env, &scratch);

    let script = "trap 'echo got-term; exit 42' TERM; echo started; while true; do sleep 0.2; done";
    d.ok(&["run", "-d", "--name", "web", "--runtime", HEARTH, IMAGE, "sh", "-c", script]);
    wait_until("the container's first line in docker logs", Duration::from_secs(60), || {
        d.ok(&["logs", "web"]).contains("started")
    });
    let follow = d.spawn(&["logs", "-f", "web"]);

    // exec: output and exit code, stdin.
    let o = d.docker(&["exec", "web", "sh", "-c", "echo in-exec; exit 5"]);
    assert_eq!((o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned()), (Some(5), "in-exec\n".into()));
    let o = d.docker(&["exec", "web", "no-such-command"]);
    // 126, as Docker gives with runc for any exec that cannot start.
    assert_eq!(o.status.code(), Some(126), "exec of a missing command: {}", text(&o));
    assert!(text(&o).contains("executable file not found"), "{}", text(&o));
    let o = d.docker_reading(&["exec", "-i", "web", "sh", "-c", "read line; echo got $line"], b"to exec\n");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "got to exec\n", "{}", text(&o));

    // The pid Docker shows is a host process: hearth-vmm's.
    let pid = d.inspect("web", "{{.State.Pid}}");
    host_pid_is_hearth_vmm(&pid);
    let top = d.ok(&["top", "web"]);
    assert!(top.lines().skip(1).any(|l| l.split_whitespace().nth(1) == Some(pid.as_str())), "docker top: {top}");

    // stop: SIGTERM, which the container's trap answers.
    d.ok(&["stop", "-t", "30", "web"]);
    assert_eq!(d.inspect("web", "{{.State.ExitCode}}"), "42");
    let logs = hearth_e2e::output_within(follow, Duration::from_secs(60)).expect("docker logs -f did not end");
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "started\ngot-term\n", "docker logs -f");

    // Started again (a new task of the same container, its network
    // plugged in afresh), it runs and answers exec.
    d.ok(&["start", "web"]);
    wait_until("web started again", Duration::from_secs(60), || d.ok(&["logs", "web"]).matches("started").count() == 2);
    assert_eq!(d.ok(&["exec", "web", "sh", "-c", "ip -4 -o addr show eth0 | wc -l"]).trim(), "1");

    // A signal by name; then a stop whose SIGTERM is ignored ends in SIGKILL.
    let script = "trap 'echo got-usr1' USR1; trap '' TERM; echo up; while true; do sleep 0.2; done";
    d.ok(&["run", "-d", "--name", "stubborn", "--runtime", HEARTH, IMAGE, "sh", "-c", script]);
    wait_until("stubborn up", Duration::from_secs(60), || d.ok(&["logs", "stubborn"]).contains("up"));
    d.ok(&["kill", "-s", "USR1", "stubborn"]);
    wait_until("USR1 delivered", Duration::from_secs(30), || d.ok(&["logs", "stubborn"]).contains("got-usr1"));
    d.ok(&["stop", "-t", "2", "stubborn"]);
    assert_eq!(d.inspect("stubborn", "{{.State.ExitCode}}"), "137");

    // A restart policy: Docker starts it again on its exit, twice.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "flaky",
        "--restart",
        "on-failure:2",
        "--runtime",
        HEARTH,
        IMAGE,
        "sh",
        "-c",
        "echo run; exit 1",
    ]);
    wait_until("two restarts", Duration::from_secs(180), || {
        d.inspect("flaky", "{{.RestartCount}} {{.State.Status}}") == "2 exited"
    });
    assert_eq!(d.ok(&["logs", "flaky"]).matches("run").count(), 3);
    assert_eq!(d.inspect("flaky", "{{.State.ExitCode}}"), "1");

    // rm -f of a running container, and nothing of it left in containerd.
    d.ok(&["run", "-d", "--name", "doomed", "--runtime", HEARTH, IMAGE, "sleep", "1000"]);
    d.ok(&["rm", "-f", "doomed", "web", "stubborn", "flaky"]);
    assert_eq!(d.ok(&["ps", "-aq"]).trim(), "");
    wait_until("containerd forgets the containers", Duration::from_secs(60), || {
        d.containerd.ok(&["-n", "moby", "containers", "ls", "-q"]).trim().is_empty()
    });
}

#[test]
fn volumes_and_docker_cp_reach_the_host_files() {
    let env = Env::get();
    let scratch = Scratch::new("docker-volumes");
    let d = Dockerd::start(&env, &scratch);
    let dir = scratch.path("vol");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hostfile"), "from the host\n").unwrap();
    let rw = format!("{}:/data", dir.display());
    let ro = format!("{}:/data:ro", dir.display());

    let o = d.ok(&[
        "run",
        "--rm",
        "--runtime",
        HEARTH,
        "-v",
        &rw,
        IMAGE,
        "sh",
        "-c",
        "cat /data/hostfile; echo made > /data/new",
    ]);
    assert_eq!(o, "from the host\n");
    assert_eq!(std::fs::read_to_string(dir.join("new")).unwrap(), "made\n");

    // Read-only honoured: root in the container cannot write through it.
    let o =
        d.docker(&["run", "--rm", "--runtime", HEARTH, "-v", &ro, IMAGE, "sh", "-c", "echo changed > /data/hostfile"]);
    assert!(!o.status.success() && text(&o).contains("Read-only file system"), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(dir.join("hostfile")).unwrap(), "from the host\n");

    // A named volume keeps its files from one container to the next.
    d.ok(&["volume", "create", "kept"]);
    d.ok(&["run", "--rm", "--runtime", HEARTH, "-v", "kept:/v", IMAGE, "sh", "-c", "echo kept > /v/f"]);
    assert_eq!(d.ok(&["run", "--rm", "--runtime", HEARTH, "-v", "kept:/v", IMAGE, "cat", "/v/f"]), "kept\n");

    // docker cp both ways with a running container.
    d.ok(&["run", "-d", "--name", "box", "--runtime", HEARTH, IMAGE, "sleep", "1000"]);
    d.ok(&["cp", &dir.join("hostfile").display().to_string(), "box:/tmp/copied"]);
    assert_eq!(d.ok(&["exec", "box", "cat", "/tmp/copied"]), "from the host\n");
    d.ok(&["exec", "box", "sh", "-c", "echo made in the VM > /tmp/made"]);
    let back = scratch.path("back");
    d.ok(&["cp", "box:/tmp/made", &back.display().to_string()]);
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "made in the VM\n");
}

#[test]
fn limits_stats_oom_and_healthchecks_work() {
    let env = Env::get();
    let scratch = Scratch::new("docker-limits");
    let d = Dockerd::start(&env, &scratch);

    let limits = ["--memory", "64m", "--cpus", "0.5", "--pids-limit", "50"];
    let show = "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max /sys/fs/cgroup/pids.max";
    let got = on_both(&d, &limits, &["sh", "-c", show], b"");
    assert_same("cgroup limits", &got);
    assert_eq!(got[1].1, "67108864\n50000 100000\n50\n");

    d.ok(&["run", "-d", "--name", "busy", "--memory", "64m", "--runtime", HEARTH, IMAGE, "sleep", "1000"]);
    let stats = d.ok(&["stats", "--no-stream", "--format", "{{.MemUsage}}|{{.PIDs}}", "busy"]);
    let (mem, pids) = stats.trim().split_once('|').unwrap();
    assert!(mem.ends_with("/ 64MiB") && !mem.starts_with("0B"), "docker stats memory: {stats}");
    assert_eq!(pids, "1", "docker stats pids: {stats}");
    // docker update reaches the running container's cgroup.
    d.ok(&["update", "--memory", "96m", "--memory-swap", "96m", "busy"]);
    assert_eq!(d.ok(&["exec", "busy", "cat", "/sys/fs/cgroup/memory.max"]), "100663296\n");

    // An OOM kill: exit 137, and Docker knows it was the OOM killer.
    let o = d.docker(&[
        "run",
        "--name",
        "hog",
        "--memory",
        "32m",
        "--memory-swap",
        "32m",
        "--runtime",
        HEARTH,
        IMAGE,
        "sh",
        "-c",
        "tail /dev/zero",
    ]);
    assert_eq!(o.status.code(), Some(137), "{}", text(&o));
    wait_until("OOMKilled in docker inspect", Duration::from_secs(30), || {
        d.inspect("hog", "{{.State.OOMKilled}}") == "true"
    });

    // A healthcheck (docker exec, every second) turns the container healthy.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "checked",
        "--health-cmd",
        "test -f /tmp/ready",
        "--health-interval",
        "1s",
        "--health-retries",
        "1",
        "--runtime",
        HEARTH,
        IMAGE,
        "sh",
        "-c",
        "sleep 2; touch /tmp/ready; sleep 1000",
    ]);
    wait_until("healthy", Duration::from_secs(120), || d.inspect("checked", "{{.State.Health.Status}}") == "healthy");
}

#[test]
fn docker_networks_and_published_ports_reach_the_vm() {
    let env = Env::get();
    let scratch = Scratch::new("docker-network");
    let d = Dockerd::start(&env, &scratch);

    // The default bridge network: the container has Docker's address in
    // the VM, and is reached at it and through a published port.
    d.echo_server("srv", &["-p", "18080:8080"]);
    let ip = d.inspect("srv", "{{.NetworkSettings.IPAddress}}");
    assert!(ip.starts_with("172.17."), "docker's address: {ip:?}");
    let inside = d.ok(&["exec", "srv", "ip", "-4", "-o", "addr", "show", "eth0"]);
    assert!(inside.contains(&format!("{ip}/16")), "eth0 in the VM: {inside}");
    // A runc container on the same bridge, then the host through the port.
    tcp_check(&d, "runc container to hearth container", &["--runtime", "runc"], &ip, "100000");
    let o = hearth_e2e::host(Command::new(&env.guest_tool).args(["tcp-check", "127.0.0.1", "18080", "100000"]));
    assert!(o.contains("HEARTH-TCP-CHECK: ok 100000"), "host to the published port: {o}");

    // A user-defined network: containers by name, through Docker's DNS.
    d.ok(&["network", "create", "appnet"]);
    d.echo_server("named", &["--network", "appnet"]);
    let on_appnet = ["--network", "appnet", "--runtime", HEARTH];
    tcp_check(&d, "by name on a user-defined network", &on_appnet, "named", "1000");

    // No network: loopback only.
    // (sit0 is the guest kernel's own, in every namespace, and down.)
    let o = d.ok(&["run", "--rm", "--network", "none", "--runtime", HEARTH, IMAGE, "sh", "-c", "ls /sys/class/net"]);
    assert_eq!(o.split_whitespace().filter(|n| *n != "sit0").collect::<Vec<_>>(), ["lo"]);
    // Another container's network cannot be shared yet: a clear error.
    let o = d.docker(&["run", "--rm", "--network", "container:srv", "--runtime", HEARTH, IMAGE, "true"]);
    assert!(!o.status.success() && text(&o).contains("--network container"), "{}", text(&o));

    // Removing the containers gives their NIC slots back: more containers
    // than the VM has slots for, one after another.
    d.ok(&["rm", "-f", "srv", "named"]);
    for i in 0..5 {
        let o = d.ok(&["run", "--rm", "--runtime", HEARTH, IMAGE, "sh", "-c", "ls /sys/class/net | grep -c eth0"]);
        assert_eq!(o.trim(), "1", "run {i}: eth0 in the container");
    }
}

#[test]
fn images_come_through_a_local_registry() {
    let env = Env::get();
    let scratch = Scratch::new("docker-registry");
    let d = Dockerd::start(&env, &scratch);
    let registry = Registry::start(&scratch);
    let reference = format!("{}/hearth/pulled:1", registry.addr);

    d.ok(&["tag", IMAGE, &reference]);
    d.ok(&["push", &reference]);
    d.ok(&["rmi", &reference]);
    d.ok(&["pull", &reference]);
    let kernel = d.ok(&["run", "--rm", "--runtime", HEARTH, &reference, "uname", "-r"]);
    assert_eq!(kernel.trim(), env.kernel_release, "docker pull, then run on hearth");

    // ctr pulls the same image into containerd's own store and runs it.
    d.containerd.ok(&["images", "pull", "--plain-http", &reference]);
    let o = d.containerd.ok(&["run", "--rm", "--runtime", RUNTIME, &reference, "pulled", "uname", "-r"]);
    assert_eq!(o.trim(), env.kernel_release, "ctr pull, then run on hearth");
}
