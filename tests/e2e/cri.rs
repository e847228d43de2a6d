//! e2e suite `cri`: Kubernetes' CRI, as the kubelet calls it, on containerd
//! 1.7's CRI plugin with hearth as a runtime handler (tests/src/cri.rs), in
//! the test host. Pods get their network from CNI's bridge plugin, their
//! sandbox from the locally built pause image; where a reference helps, the
//! same pod runs on runc in the same containerd and the outputs must match.

use std::io::{Read, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hearth_e2e::containerd::wait_until;
use hearth_e2e::cri::{self, api, Cri, HEARTH, HEARTH_PER_POD, RUNC};
use hearth_e2e::{Env, Scratch};

fn now_nanos() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64
}

/// What ends each run-to-end command's output, so that the whole of it is
/// known to be in the log.
const END: &str = "--end--";

/// The text of a container's stdout in its CRI log, up to [`END`].
fn stdout_of(c: &Cri, pod: &str, name: &str) -> String {
    let lines = c.log_lines(pod, name, |l| l.iter().any(|l| l.ends_with(&format!(" stdout F {END}"))));
    lines
        .iter()
        .filter_map(|l| {
            let mut f = l.splitn(4, ' ');
            let (_, stream, _, text) = (f.next()?, f.next()?, f.next()?, f.next().unwrap_or(""));
            (stream == "stdout" && text != END).then(|| format!("{text}\n"))
        })
        .collect()
}

/// Runs `sh -c SCRIPT` (then prints [`END`]) in a container of pod `pod`
/// made from `config`, to its end; its exit code and stdout.
fn run_to_end(
    c: &Cri,
    pod: &str,
    pod_config: &api::PodSandboxConfig,
    mut config: api::ContainerConfig,
    script: &str,
) -> (i32, String) {
    let name = config.metadata.as_ref().unwrap().name.clone();
    config.command = vec!["sh".into(), "-c".into(), format!("{script}\necho {END}")];
    let id = c.run(pod, pod_config, config);
    let s = c.wait_exited(&id);
    let out = stdout_of(c, &pod_config.metadata.as_ref().unwrap().name, &name);
    c.remove_container(&id);
    (s.exit_code, out)
}

/// The pids of the hearth-vmm processes of the VMs whose state lives
/// under `dir`.
fn vmm_pids_under(dir: &std::path::Path) -> Vec<u32> {
    let dir = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            Some((e.file_name().to_str()?.parse::<u32>().ok()?, std::fs::read(e.path().join("cmdline")).ok()?))
        })
        .filter(|(_, c)| {
            let c = String::from_utf8_lossy(c).replace('\0', " ");
            c.contains("hearth-vmm") && c.contains(&dir) && !c.contains("containerd-shim")
        })
        .map(|(pid, _)| pid)
        .collect()
}

fn vmms_under(dir: &std::path::Path) -> usize {
    vmm_pids_under(dir).len()
}

#[test]
fn a_pod_lives_through_the_kubelets_calls() {
    let env = Env::get();
    let scratch = Scratch::new("cri-pod");
    let c = Cri::start(&env, &scratch);

    let v = c.ok("Version", c.runtime().version(api::VersionRequest { version: "v1".into() }));
    assert_eq!((v.runtime_name.as_str(), v.runtime_api_version.as_str()), ("containerd", "v1"), "{v:?}");

    // The sandbox: ready, on the CNI network, its timestamp true.
    let before = now_nanos();
    let pod_config = c.pod_config("web", cri::default_namespaces());
    let pod = c.run_pod(&pod_config, HEARTH);
    let after = now_nanos();
    let status = c.pod_status(&pod);
    assert_eq!(status.state, api::PodSandboxState::SandboxReady as i32, "{status:?}");
    assert!(
        status.created_at >= before && status.created_at <= after,
        "created_at {} not in [{before}, {after}]",
        status.created_at
    );
    assert_eq!(status.runtime_handler, HEARTH);
    let ip = status.network.as_ref().map(|n| n.ip.clone()).unwrap_or_default();
    assert!(ip.starts_with("10.89.7."), "the pod has no address on the CNI network: {status:?}");

    // A server and a main container: created, then running, with times.
    let server = c.run(&pod, &pod_config, Cri::container_config("server", &["hearth-guest-tool", "tcp-echo", "8080"]));
    let main_cmd = "trap 'echo got-term; exit 42' TERM; echo hello-out; echo hello-err >&2; \
                    while true; do sleep 1; cat /tmp/say 2>/dev/null && rm /tmp/say; done";
    let main = c.create(&pod, &pod_config, Cri::container_config("main", &["sh", "-c", main_cmd]));
    let created = c.status(&main);
    assert_eq!(created.state, api::ContainerState::ContainerCreated as i32, "{created:?}");
    c.start_container(&main);
    let running = c.status(&main);
    assert_eq!(running.state, api::ContainerState::ContainerRunning as i32, "{running:?}");
    assert!(running.started_at >= running.created_at && running.created_at > 0, "{running:?}");
    let listed = c.list_containers(&pod);
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.iter().all(|l| l.state == api::ContainerState::ContainerRunning as i32 && l.pod_sandbox_id == pod));

    // Its log, in the CRI format the kubelet parses: TIME STREAM TAG TEXT.
    let lines = c.log_lines("web", "main", |l| l.len() >= 2);
    for (stream, text) in [("stdout", "hello-out"), ("stderr", "hello-err")] {
        let line = lines.iter().find(|l| l.ends_with(text)).unwrap_or_else(|| panic!("no {text}: {lines:?}"));
        let f: Vec<&str> = line.splitn(4, ' ').collect();
        assert_eq!((f[1], f[2], f[3]), (stream, "F", text), "{line}");
        assert!(f[0].contains('T') && (f[0].ends_with('Z') || f[0].contains('+')), "not RFC 3339: {line}");
    }

    // ExecSync: a program found through PATH, output apart, the exit code kept.
    c.exec_ok(&main, &["true"]);
    let r = c.exec_sync(&main, &["sh", "-c", "echo x; echo y >&2; exit 3"], 0).unwrap();
    assert_eq!((r.stdout.as_slice(), r.stderr.as_slice(), r.exit_code), (&b"x\n"[..], &b"y\n"[..], 3));
    // With a timeout it ends, as an error naming it, and kills the process.
    let e = c.exec_sync(&main, &["sleep", "60"], 2).expect_err("ExecSync outlived its timeout");
    assert!(e.message().contains("timeout"), "{e:?}");
    wait_until("the timed-out exec killed", Duration::from_secs(60), || {
        !c.exec_ok(&main, &["ps", "-o", "args"]).contains("sleep 60")
    });

    // Exec and Attach: streams through containerd's streaming server, as
    // kubectl reaches them (WebSocket, v4.channel.k8s.io).
    let exec = |cmd: &[&str], stdin: bool| {
        let req = api::ExecRequest {
            container_id: main.clone(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            stdin,
            stdout: true,
            stderr: true,
            tty: false,
        };
        c.ok("Exec", c.runtime().exec(req)).url
    };
    let s = cri::stream(&exec(&["sh", "-c", "echo out; echo err >&2; exit 3"], false), b"");
    assert_eq!((s.stdout.as_slice(), s.stderr.as_slice()), (&b"out\n"[..], &b"err\n"[..]), "{s:?}");
    assert!(s.status.contains("\"ExitCode\"") && s.status.contains("\"3\""), "exit code 3 not in the status: {s:?}");
    let s = cri::stream(&exec(&["head", "-n", "1"], true), b"typed line\n");
    assert_eq!(s.stdout, b"typed line\n", "{s:?}");
    assert!(s.status.contains("Success"), "{s:?}");
    let mut talker = Cri::container_config("talker", &["sh", "-c", "read line; echo got:$line"]);
    talker.stdin = true;
    let talker = c.run(&pod, &pod_config, talker);
    let req = api::AttachRequest { container_id: talker.clone(), stdin: true, stdout: true, stderr: true, tty: false };
    let s = cri::stream(&c.ok("Attach", c.runtime().attach(req)).url, b"over attach\n");
    assert_eq!(s.stdout, b"got:over attach\n", "{s:?}");
    assert_eq!(c.wait_exited(&talker).exit_code, 0);

    // The pod's containers share its network: main reaches the server at
    // 127.0.0.1, the host reaches it at the pod's address.
    wait_until("the server listening", Duration::from_secs(60), || {
        c.exec_sync(&main, &["hearth-guest-tool", "tcp-check", "127.0.0.1", "8080", "4096"], 0)
            .is_ok_and(|r| String::from_utf8_lossy(&r.stdout).contains("HEARTH-TCP-CHECK: ok 4096"))
    });
    assert!(c.exec_ok(&main, &["ip", "-4", "-o", "addr", "show", "eth0"]).contains(&format!("{ip}/")));
    let mut s = std::net::TcpStream::connect((ip.as_str(), 8080)).expect("the host reaching the pod's address");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"from-the-host").unwrap();
    let mut echo = [0u8; 13];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"from-the-host");
    drop(s);

    // Stats, from the container's cgroup in the VM.
    let stats =
        c.ok("ContainerStats", c.runtime().container_stats(api::ContainerStatsRequest { container_id: main.clone() }));
    let stats = stats.stats.expect("stats");
    let cpu = stats.cpu.and_then(|c| c.usage_core_nano_seconds).map(|v| v.value).unwrap_or(0);
    let mem = stats.memory.and_then(|m| m.working_set_bytes).map(|v| v.value).unwrap_or(0);
    assert!(cpu > 0 && mem > 0, "implausible stats: cpu {cpu} ns, working set {mem} B");

    // UpdateContainerResources reaches the container's cgroup.
    let update = api::UpdateContainerResourcesRequest {
        container_id: main.clone(),
        linux: Some(api::LinuxContainerResources { memory_limit_in_bytes: 64 << 20, ..Default::default() }),
        ..Default::default()
    };
    c.ok("UpdateContainerResources", c.runtime().update_container_resources(update));
    assert_eq!(c.exec_ok(&main, &["cat", "/sys/fs/cgroup/memory.max"]).trim(), (64u64 << 20).to_string());

    // ReopenContainerLog: after a rotation, output goes to a new file.
    let log = c.logs.join("web/main.log");
    std::fs::rename(&log, log.with_extension("log.1")).unwrap();
    c.ok(
        "ReopenContainerLog",
        c.runtime().reopen_container_log(api::ReopenContainerLogRequest { container_id: main.clone() }),
    );
    c.exec_ok(&main, &["sh", "-c", "echo after-reopen > /tmp/say"]);
    c.log_lines("web", "main", |l| l.iter().any(|l| l.ends_with("stdout F after-reopen")));

    // A container that fails: its code and reason, its times in order.
    let failing = c.run(&pod, &pod_config, Cri::container_config("failing", &["sh", "-c", "exit 7"]));
    let s = c.wait_exited(&failing);
    assert_eq!((s.exit_code, s.reason.as_str()), (7, "Error"), "{s:?}");
    assert!(s.finished_at >= s.started_at && s.started_at > 0, "{s:?}");

    // StopContainer: SIGTERM reaches its trap, within the grace period.
    c.stop_container(&main, 30);
    let s = c.status(&main);
    assert_eq!((s.state, s.exit_code), (api::ContainerState::ContainerExited as i32, 42), "{s:?}");
    c.log_lines("web", "main", |l| l.iter().any(|l| l.ends_with("got-term")));

    // The pod goes, and with it everything it had on the host.
    c.remove_pod(&pod);
    assert!(c.list_pods().is_empty(), "{:?}", c.list_pods());
    assert!(c.list_containers("").is_empty(), "{:?}", c.list_containers(""));
    let _ = server;
    let cni_netns: Vec<_> = std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("cni-"))
        .map(|e| e.file_name())
        .collect();
    assert!(cni_netns.is_empty(), "network namespaces left behind: {cni_netns:?}");
    // The VM idles out (5 s in this configuration), its shares with it.
    wait_until("the VM powered off after the last pod", Duration::from_secs(120), || vmms_under(&c.vms) == 0);
    wait_until("nothing of the pod mounted on the host", Duration::from_secs(30), || c.leftover_mounts().is_empty());
}

/// One security-context case: a container's settings and the command whose
/// output shows their effect.
struct Case {
    name: &'static str,
    cmd: &'static str,
    set: fn(&mut api::LinuxContainerSecurityContext),
}

const NS_CHECK: &str = "for n in ipc uts net pid; do \
    if [ \"$(readlink /proc/self/ns/$n)\" = \"$(readlink /proc/1/ns/$n)\" ]; then echo $n-as-pid1; else echo $n-apart; fi; done";

fn cases() -> Vec<Case> {
    vec![
        Case { name: "pid1", cmd: "tr '\\0' ' ' < /proc/1/cmdline; echo; hostname", set: |_| {} },
        Case { name: "namespaces", cmd: NS_CHECK, set: |_| {} },
        Case {
            name: "run-as",
            cmd: "id -u; id -g; id -G",
            set: |s| {
                s.run_as_user = Some(api::Int64Value { value: 1000 });
                s.run_as_group = Some(api::Int64Value { value: 2000 });
                s.supplemental_groups = vec![3000];
            },
        },
        Case {
            name: "read-only-root",
            cmd: "touch /x 2>/dev/null && echo wrote || echo refused",
            set: |s| s.readonly_rootfs = true,
        },
        Case {
            name: "unprivileged",
            cmd: "mount -t tmpfs t /mnt 2>/dev/null && echo mounted || echo refused; grep ^Cap /proc/self/status",
            set: |_| {},
        },
        Case {
            name: "privileged",
            cmd: "mount -t tmpfs t /mnt 2>/dev/null && echo mounted || echo refused; grep ^Cap /proc/self/status; \
                  grep -c . /proc/self/mountinfo >/dev/null && (grep -q ' /sys .* ro,' /proc/self/mountinfo && echo sys-ro || echo sys-rw)",
            set: |s| s.privileged = true,
        },
        Case {
            name: "capabilities",
            cmd: "grep ^Cap /proc/self/status",
            set: |s| {
                s.capabilities = Some(api::Capability {
                    add_capabilities: vec!["SYS_ADMIN".into(), "NET_ADMIN".into()],
                    drop_capabilities: vec!["NET_RAW".into(), "CHOWN".into()],
                    ..Default::default()
                })
            },
        },
        Case {
            name: "no-new-privs",
            cmd: "grep ^NoNewPrivs /proc/self/status",
            set: |s| s.no_new_privs = true,
        },
    ]
}

/// Every case in a pod with namespaces `ns` on `handler`: name, exit code
/// and stdout of each.
fn run_cases(c: &Cri, handler: &str, pod_name: &str, ns: api::NamespaceOption) -> Vec<(String, i32, String)> {
    let mut pod_config = c.pod_config(pod_name, ns.clone());
    // A privileged container needs a privileged pod, as the kubelet makes it.
    let sc = pod_config.linux.as_mut().unwrap().security_context.as_mut().unwrap();
    sc.privileged = true;
    let pod = c.run_pod(&pod_config, handler);
    let mut out = Vec::new();
    for case in cases() {
        let mut config = Cri::container_config(case.name, &[]);
        // The kubelet gives each container its pod's namespace modes.
        let mut sc = api::LinuxContainerSecurityContext { namespace_options: Some(ns.clone()), ..Default::default() };
        (case.set)(&mut sc);
        config.linux.as_mut().unwrap().security_context = Some(sc);
        let (code, stdout) = run_to_end(c, &pod, &pod_config, config, case.cmd);
        out.push((case.name.to_string(), code, stdout));
    }
    // ExecSync into a running container of the pod.
    let mut sleeper = Cri::container_config("sleeper", &["sleep", "100000"]);
    let sc = api::LinuxContainerSecurityContext { namespace_options: Some(ns.clone()), ..Default::default() };
    sleeper.linux.as_mut().unwrap().security_context = Some(sc);
    let id = c.run(&pod, &pod_config, sleeper);
    let got = match c.exec_sync(&id, &["sh", "-c", "echo exec-ok; cat /proc/self/cmdline | tr '\\0' ' '"], 0) {
        Ok(r) => (r.exit_code, String::from_utf8_lossy(&r.stdout).into_owned()),
        Err(e) => (-1, format!("ExecSync failed: {}", e.message())),
    };
    out.push(("exec".to_string(), got.0, got.1));
    c.remove_pod(&pod);
    out
}

#[test]
fn security_contexts_and_pod_namespaces_give_what_runc_gives() {
    let env = Env::get();
    let scratch = Scratch::new("cri-security");
    let c = Cri::start(&env, &scratch);
    use api::NamespaceMode::{Container, Pod};
    for (label, ns) in [("shared-pid", cri::namespaces(Pod, Pod, Pod)), ("own-pid", cri::default_namespaces())] {
        let runc = run_cases(&c, RUNC, &format!("{label}-runc"), ns.clone());
        let hearth = run_cases(&c, HEARTH, &format!("{label}-hearth"), ns);
        for (r, h) in runc.iter().zip(&hearth) {
            // The hostname is the pod's name, which differs by design.
            let h2 = (h.0.clone(), h.1, h.2.replace("-hearth", "-runc"));
            assert_eq!(&h2, r, "{label} {}: hearth (left) differs from runc (right)", r.0);
        }
        let get = |name: &str| hearth.iter().find(|c| c.0 == name).unwrap().2.clone();
        // What the kubelet asked for, beyond matching runc.
        if label == "shared-pid" {
            assert!(get("pid1").starts_with("/pause"), "{}", get("pid1"));
            assert!(get("namespaces").contains("pid-as-pid1") && get("namespaces").contains("ipc-as-pid1"));
        } else {
            assert!(get("pid1").starts_with("sh -c"), "{}", get("pid1"));
        }
        assert_eq!(get("run-as"), "1000\n2000\n2000 3000\n");
        assert_eq!(get("read-only-root"), "refused\n");
        assert!(get("unprivileged").starts_with("refused\n"));
        assert!(get("privileged").starts_with("mounted\n"));
    }
    let _ = Container;
}

#[test]
fn images_pulled_from_a_registry_run_and_per_pod_vms_are_per_pod() {
    let env = Env::get();
    let scratch = Scratch::new("cri-images");
    let c = Cri::start(&env, &scratch);
    let registry = hearth_e2e::docker::Registry::start(&scratch);

    // An image pushed to the registry, gone locally, pulled through the CRI.
    let remote = format!("{}/hearth/busybox:cri", registry.addr);
    c.ctr_ok(&["images", "tag", cri::IMAGE, &remote]);
    c.ctr_ok(&["images", "push", "--plain-http", &remote]);
    c.ctr_ok(&["images", "rm", &remote]);
    let spec = api::ImageSpec { image: remote.clone(), ..Default::default() };
    let pulled = c.ok(
        "PullImage",
        c.images().pull_image(api::PullImageRequest { image: Some(spec.clone()), ..Default::default() }),
    );
    assert!(pulled.image_ref.starts_with("sha256:"), "{pulled:?}");
    let st = c.ok(
        "ImageStatus",
        c.images().image_status(api::ImageStatusRequest { image: Some(spec.clone()), verbose: false }),
    );
    let image = st.image.expect("the pulled image's status");
    assert!(image.repo_tags.contains(&remote) && image.size > 0, "{image:?}");

    // Pods on the per-pod handler: each its own VM, running the pulled
    // image on the tuned kernel.
    let mut pods = Vec::new();
    for name in ["solo-a", "solo-b"] {
        let mut pod_config = c.pod_config(name, cri::default_namespaces());
        // The pod's cgroup, as the kubelet's cgroupfs driver names it.
        pod_config.linux.as_mut().unwrap().cgroup_parent = format!("/hearth-e2e/pod-{name}");
        let pod = c.run_pod(&pod_config, HEARTH_PER_POD);
        let mut config = Cri::container_config("uname", &[]);
        config.image = Some(spec.clone());
        let (code, out) = run_to_end(&c, &pod, &pod_config, config, "uname -r");
        assert_eq!((code, out.trim()), (0, env.kernel_release.as_str()));
        // PodSandboxStats: containerd reads the pod's cgroup on the host,
        // where the pod's VM is accounted.
        let stats = c.ok(
            "PodSandboxStats",
            c.runtime().pod_sandbox_stats(api::PodSandboxStatsRequest { pod_sandbox_id: pod.clone() }),
        );
        let linux = stats.stats.and_then(|s| s.linux).expect("the pod's Linux stats");
        let cpu = linux.cpu.and_then(|c| c.usage_core_nano_seconds).map(|v| v.value).unwrap_or(0);
        let mem = linux.memory.and_then(|m| m.working_set_bytes).map(|v| v.value).unwrap_or(0);
        assert!(cpu > 0 && mem > 16 << 20, "the pod's VM is not in its stats: cpu {cpu} ns, working set {mem} B");
        pods.push(pod);
    }
    let per_pod = c.vms.join("per-pod");
    let vmms = vmm_pids_under(&per_pod);
    assert_eq!(vmms.len(), 2, "two pods on {HEARTH_PER_POD} should have two VMs");
    for pid in vmms {
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        assert!(cgroup.contains("::/hearth-e2e/pod-solo-"), "hearth-vmm {pid} is not in its pod's cgroup: {cgroup}");
    }
    // Pods on the shared handler: one VM between them.
    let mut shared = Vec::new();
    for name in ["mate-a", "mate-b"] {
        let pod_config = c.pod_config(name, cri::default_namespaces());
        shared.push(c.run_pod(&pod_config, HEARTH));
    }
    assert_eq!(vmms_under(&c.vms.join("shared")), 1, "pods on {HEARTH} share one VM");
    for p in pods.iter().chain(&shared) {
        c.remove_pod(p);
    }
    c.ok("RemoveImage", c.images().remove_image(api::RemoveImageRequest { image: Some(spec) }));
    wait_until("the VMs powered off", Duration::from_secs(120), || vmms_under(&c.vms) == 0);
    wait_until("nothing of the pods mounted on the host", Duration::from_secs(30), || c.leftover_mounts().is_empty());
}
