//! e2e suite `agent`: hearth-vmm boots the tuned kernel with the agent
//! initramfs (hearth-agent as /init); a client on the host reaches the agent
//! over the VMM's hybrid vsock socket and runs the container lifecycle cases
//! inside the VM. The busybox rootfs reaches the guest over virtio-fs, and
//! each container gets an overlay with it as the lower layer.

use std::process::{Command, Stdio};
use std::time::Duration;

use hearth_agent_protocol::agent::{Empty, MountRequest, SyncTimeRequest};
use hearth_agent_protocol::transport::{AgentAddress, AGENT_PORT};
use hearth_e2e::agent::{busybox_rootfs, run_cases, Agent};
use hearth_e2e::{Env, Scratch};

fn ctx(secs: i64) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(secs * 1_000_000_000)
}

#[test]
fn container_lifecycle_in_the_vm() {
    let env = Env::get();
    let scratch = Scratch::new("agent-vm");
    let rootfs = scratch.path("rootfs");
    busybox_rootfs(&rootfs, &env.guest_tool).unwrap();
    let vsock = scratch.path("vsock.sock");
    let console = scratch.path("console.log");
    // PID 1 configures eth0 and the hostname from the command line.
    let _tap = hearth_e2e::TapDevice::new("hearthag0", "172.31.1.1/24");
    let mut vmm = Command::new(&env.vmm)
        .arg("--kernel")
        .arg(&env.vmlinux)
        .arg("--initramfs")
        .arg(&env.agent_initramfs)
        .args(["--cpus", "2", "--memory", "512", "--console"])
        .arg(&console)
        .arg("--vsock")
        .arg(format!("cid=3,socket={}", vsock.display()))
        .arg("--fs")
        .arg(format!("tag=rootfs,dir={}", rootfs.display()))
        .args(["--net", "tap=hearthag0"])
        .args(["--cmdline", "hearth.hostname=hearth-vm hearth.ip=172.31.1.2/24 hearth.gw=172.31.1.1"])
        .stdin(Stdio::null())
        .spawn()
        .expect("starting hearth-vmm");
    let console_text = || std::fs::read_to_string(&console).unwrap_or_default();

    let addr = AgentAddress::HybridVsock { socket: vsock.clone(), port: AGENT_PORT };
    let agent = match Agent::connect(addr, "/mnt/rootfs".into(), Duration::from_secs(120)) {
        Ok(a) => a,
        Err(e) => {
            let _ = vmm.kill();
            panic!("the agent in the VM did not answer: {e}\n--- console ---\n{}", console_text());
        }
    };
    let health = agent.client.health(ctx(10), &Empty::new()).unwrap();
    assert_eq!(health.mode, "vm");
    assert_eq!(health.kernel_release, env.kernel_release, "the guest runs the tuned kernel");
    let mount = MountRequest {
        source: "rootfs".into(),
        fstype: "virtiofs".into(),
        target: "/mnt/rootfs".into(),
        options: vec!["ro".into()],
        ..Default::default()
    };
    agent.client.mount(ctx(60), &mount).expect("mounting the rootfs share in the guest");
    // A tag that does not exist is a clear error, and the agent goes on.
    let bad = MountRequest { source: "nosuchtag".into(), target: "/mnt/x".into(), ..mount.clone() };
    let e = agent.client.mount(ctx(60), &bad).unwrap_err();
    assert!(format!("{e:?}").contains("nosuchtag"), "{e:?}");

    // The guest clock follows the host's after SyncTime (a VM has no clock
    // of its own worth trusting); a container sees the same time.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let req = SyncTimeRequest { unix_nanos: now.as_nanos() as i64, ..Default::default() };
    agent.client.sync_time(ctx(10), &req).expect("SyncTime");
    let o = agent.run("clock", &hearth_e2e::agent::spec(&["/bin/date", "+%s"])).expect("running date");
    let guest_secs: i64 = o.stdout.trim().parse().expect("date +%s");
    assert!((guest_secs - now.as_secs() as i64).abs() < 120, "guest clock {guest_secs}, host {}", now.as_secs());

    // The network and hostname PID 1 set up, seen from the host and from a
    // container sharing the VM's namespaces.
    let ping = Command::new("/bin/busybox").args(["ping", "-c", "3", "-W", "10", "172.31.1.2"]).output().unwrap();
    assert!(
        ping.status.success(),
        "the host cannot ping the guest: {}\n--- console ---\n{}",
        String::from_utf8_lossy(&ping.stdout),
        console_text()
    );
    let mut shared =
        hearth_e2e::agent::spec(&["/bin/sh", "-c", "hostname; ip -4 addr show eth0 | grep -o 'inet [0-9./]*'"]);
    shared["linux"]["namespaces"] = serde_json::json!([{"type": "pid"}, {"type": "mount"}]);
    shared.as_object_mut().unwrap().remove("hostname");
    let o = agent.run("vmview", &shared).expect("a container in the VM's namespaces");
    assert_eq!(o.stdout, "hearth-vm\ninet 172.31.1.2/24\n", "stderr {:?}", o.stderr);

    let failed = run_cases(&agent);
    let left = agent.client.list_containers(ctx(10), &Empty::new()).unwrap();
    assert!(left.containers.is_empty(), "containers left: {:?}", left.containers);

    // Shutdown stops the containers, then the VM ends cleanly.
    agent.client.shutdown(ctx(60), &Empty::new()).unwrap();
    let status = hearth_e2e::wait_timeout(&mut vmm, Duration::from_secs(60));
    assert!(
        failed.is_empty(),
        "{} case(s) failed:\n{}\n--- console ---\n{}",
        failed.len(),
        failed.join("\n"),
        console_text()
    );
    assert_eq!(status, Some(0), "hearth-vmm after Shutdown\n--- console ---\n{}", console_text());
    assert!(!vsock.exists(), "the vsock socket is left behind");
}
