//! The agent's container lifecycle, natively on this machine: hearth-agent
//! serving on a Unix socket, real libcontainer containers, no VM. Needs root
//! (it fails, saying so, without). Our hosts have cgroup v1 controllers with
//! an empty v2 hierarchy beside them, so the native agent uses cgroup v1
//! (libcgroups' hybrid mode); in the VM it is v2 only.
//!
//! Run with `cargo xtask test` (or `cargo xtask e2e agent-native`), which
//! builds the static agent and guest tool and passes their paths.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hearth_agent_protocol::agent::Empty;
use hearth_agent_protocol::transport::AgentAddress;
use hearth_e2e::agent::{busybox_rootfs, run_cases, Agent};
use hearth_e2e::Scratch;

fn var(name: &str) -> PathBuf {
    std::env::var_os(name)
        .unwrap_or_else(|| {
            panic!("{name} is not set: run this suite with `cargo xtask test` or `cargo xtask e2e agent-native`")
        })
        .into()
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let d = dir.display().to_string();
    mounts
        .lines()
        .filter(|l| l.split_whitespace().nth(1).is_some_and(|m| m.starts_with(&d)))
        .map(String::from)
        .collect()
}

#[test]
fn container_lifecycle_natively() {
    assert!(nix_is_root(), "the native agent suite runs real containers and needs root: run it as root (CI does)");
    let agent_bin = var("HEARTH_AGENT");
    let guest_tool = var("HEARTH_GUEST_TOOL");
    let scratch = Scratch::new("agent-native");
    let rootfs = scratch.path("rootfs");
    busybox_rootfs(&rootfs, &guest_tool).unwrap();
    let sock = scratch.path("agent.sock");
    let state = scratch.path("state");
    let log = scratch.path("agent.log");
    let mut child = Command::new(&agent_bin)
        .args(["serve", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .arg("--state-dir")
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("starting hearth-agent");

    let agent = Agent::connect(AgentAddress::Unix(sock.clone()), rootfs.clone(), Duration::from_secs(30))
        .unwrap_or_else(|e| {
            panic!("the native agent did not come up: {e}\n{}", std::fs::read_to_string(&log).unwrap_or_default())
        });
    let health = agent.client.health(ttrpc::context::with_timeout(10_000_000_000), &Empty::new()).unwrap();
    assert_eq!(health.mode, "native");

    let failed = run_cases(&agent);

    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    if !failed.is_empty() {
        let _ = child.kill();
        panic!("{} case(s) failed:\n{}\n--- agent log ---\n{}", failed.len(), failed.join("\n"), log_text());
    }

    // Nothing is left: no containers, no mounts, no bundles.
    let left = agent.client.list_containers(ttrpc::context::with_timeout(10_000_000_000), &Empty::new()).unwrap();
    assert!(left.containers.is_empty(), "containers left: {:?}", left.containers);
    let bundles: Vec<_> = std::fs::read_dir(state.join("bundles")).unwrap().collect();
    assert!(bundles.is_empty(), "bundles left: {bundles:?}");
    assert!(mounts_under(&scratch.0).is_empty(), "mounts left: {:?}", mounts_under(&scratch.0));
    let cgroups_left: Vec<_> = std::fs::read_dir("/sys/fs/cgroup/memory/hearth")
        .map(|d| d.flatten().filter(|e| e.path().is_dir()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(cgroups_left.is_empty(), "memory cgroups left: {cgroups_left:?}");

    // Shutdown answers, then the agent exits cleanly and removes its socket.
    agent.client.shutdown(ttrpc::context::with_timeout(30_000_000_000), &Empty::new()).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "agent exit {status}");
    assert!(!sock.exists(), "the agent socket is left behind");
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
