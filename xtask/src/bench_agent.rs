//! `cargo xtask bench agent`: the time to create, start, wait for and delete
//! a trivial container (`/bin/true` on a busybox rootfs) through hearth-agent,
//! against `runc run` of the same bundle on the same machine, as ratios:
//!
//! * natively, on this machine: the native agent over its Unix socket
//!   against runc (both as root, cgroup v1 here);
//! * in the guest (in the test host where needed): the agent as the VM's
//!   PID 1, driven from the host over hybrid vsock, against runc run by a
//!   script inside a VM of the same kernel, memory and vCPUs. The guest's runc
//!   runs from the initramfs, where pivot_root is impossible, so it uses
//!   `--no-pivot`; the agent pivots. The rootfs is on the same ext4 disk for
//!   both.
//!
//! Each figure is the median of RUNS alternating samples.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hearth_agent_protocol::agent::{
    ContainerRequest, CreateContainerRequest, DeleteContainerRequest, MountRequest, ProcessRequest, Rootfs,
};
use hearth_agent_protocol::transport::{AgentAddress, AGENT_PORT};
use hearth_agent_protocol::AgentClient;

use crate::artefacts::Artefacts;
use crate::bench::median_f64;
use crate::sh;

const RUNS: usize = 10;

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(120_000_000_000)
}

fn trivial_spec(root: &str) -> serde_json::Value {
    let mut s = hearth_e2e::agent::spec(&["/bin/true"]);
    s["root"] = serde_json::json!({"path": root, "readonly": true});
    s
}

/// One create + start + wait + delete through the agent, in milliseconds.
fn agent_once(client: &AgentClient, id: &str, rootfs: &str) -> Result<f64> {
    let spec = serde_json::to_vec(&trivial_spec(rootfs))?;
    let started = Instant::now();
    let req = CreateContainerRequest {
        container_id: id.into(),
        spec_json: spec,
        rootfs: Some(Rootfs { path: rootfs.into(), ..Default::default() }).into(),
        ..Default::default()
    };
    client.create_container(ctx(), &req).context("CreateContainer")?;
    client.start_container(ctx(), &ContainerRequest { container_id: id.into(), ..Default::default() })?;
    let w = client.wait_process(ctx(), &ProcessRequest { container_id: id.into(), ..Default::default() })?;
    client.delete_container(ctx(), &DeleteContainerRequest { container_id: id.into(), ..Default::default() })?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if w.exit_status != 0 {
        bail!("the benchmark container exited {}", w.exit_status);
    }
    Ok(ms)
}

fn write_bundle(bundle: &Path, rootfs: &str) -> Result<()> {
    std::fs::create_dir_all(bundle)?;
    std::fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(&trivial_spec(rootfs))?)?;
    Ok(())
}

fn report(place: &str, agent: Vec<f64>, runc: Vec<f64>) {
    let (a, r) = (median_f64(agent), median_f64(runc));
    println!("{place}: hearth-agent create+start+wait+delete {a:.1} ms");
    println!("{place}: runc run (reference)                  {r:.1} ms");
    println!("{place}: ratio agent/runc {:.2}", a / r);
}

/// The native half, on this machine.
pub fn native(a: &Artefacts) -> Result<()> {
    let runc = which("runc").context("runc is not installed: run `cargo xtask setup`")?;
    let dir = std::env::temp_dir().join(format!("hearth-bench-agent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let rootfs = dir.join("rootfs");
        hearth_e2e::agent::busybox_rootfs(&rootfs, &a.guest_tool)?;
        let bundle = dir.join("bundle");
        write_bundle(&bundle, &rootfs.display().to_string())?;
        let sock = dir.join("agent.sock");
        let mut agent = Command::new(&a.agent)
            .args(["serve", "--log", "warn,libcgroups=error", "--listen"])
            .arg(format!("unix:{}", sock.display()))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .spawn()?;
        let result = (|| -> Result<()> {
            let client = AgentAddress::Unix(sock.clone()).connect_when_ready(Duration::from_secs(30))?;
            let (mut ta, mut tr) = (Vec::new(), Vec::new());
            let root = rootfs.display().to_string();
            for i in 0..RUNS {
                ta.push(agent_once(&client, &format!("bench-{i}"), &root)?);
                let started = Instant::now();
                sh::run(
                    Command::new(&runc)
                        .arg("--root")
                        .arg(dir.join("runc-state"))
                        .args(["run", "--bundle"])
                        .arg(&bundle)
                        .arg(format!("bench-runc-{i}"))
                        .stdin(Stdio::null())
                        .stdout(Stdio::null()),
                )?;
                tr.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            report("native", ta, tr);
            let _ = client.shutdown(ctx(), &Default::default());
            Ok(())
        })();
        let _ = hearth_e2e::wait_timeout(&mut agent, Duration::from_secs(10));
        result
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

/// Copies `binary` and the shared libraries it loads into `root`, at their
/// own paths, so that it runs in the guest's bare initramfs.
fn copy_with_libraries(binary: &Path, root: &Path) -> Result<()> {
    let out = Command::new("ldd").arg(binary).output()?;
    let mut files = vec![binary.to_path_buf()];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = line.split_whitespace().find(|w| w.starts_with('/'));
        if let Some(p) = path {
            files.push(PathBuf::from(p));
        }
    }
    for f in files {
        let dest = root.join(f.strip_prefix("/").unwrap_or(&f));
        std::fs::create_dir_all(dest.parent().unwrap())?;
        std::fs::copy(&f, &dest).with_context(|| format!("copying {}", f.display()))?;
    }
    Ok(())
}

/// The guest half, where our VMM runs.
pub fn guest(a: &Artefacts) -> Result<()> {
    let runc = which("runc").context("runc is not installed: run `cargo xtask setup`")?;
    let dir = std::env::temp_dir().join(format!("hearth-bench-agent-vm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = guest_in(a, &runc, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn guest_in(a: &Artefacts, runc: &Path, dir: &Path) -> Result<()> {
    // One ext4 disk for both VMs: the rootfs, runc's bundle, runc and its
    // libraries, and the script that times runc.
    let disk_dir = dir.join("disk");
    hearth_e2e::agent::busybox_rootfs(&disk_dir.join("rootfs"), &a.guest_tool)?;
    write_bundle(&disk_dir.join("bundle"), "/run/hearth/rootfs")?;
    copy_with_libraries(runc, &disk_dir.join("sysroot"))?;
    std::fs::copy(&a.guest_tool, disk_dir.join("hearth-guest-tool"))?;
    let script = format!(
        r#"
cp -a sysroot/. /
mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "+cpu +memory +pids +io" > /sys/fs/cgroup/cgroup.subtree_control
mount -t tmpfs tmpfs /tmp
./hearth-guest-tool time-runs {RUNS} RUNC -- {runc} --root /tmp/runc run --no-pivot --bundle /run/hearth/bundle bench
"#,
        runc = runc.display()
    );
    std::fs::write(disk_dir.join("run.sh"), script)?;
    let img = dir.join("disk.img");
    sh::run(Command::new("mke2fs").args(["-q", "-F", "-t", "ext4", "-d"]).arg(&disk_dir).arg(&img).arg("128M"))?;

    // runc, inside a VM running the busybox init.
    let out = Command::new(&a.vmm)
        .arg("--kernel")
        .arg(&a.vmlinux)
        .arg("--initramfs")
        .arg(&a.boot_initramfs)
        .args(["--cpus", "2", "--memory", "512", "--disk"])
        .arg(&img)
        .args(["--cmdline", "hearth.run=/dev/vda"])
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let runc_ms: Vec<f64> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("HEARTH-RUNC-US: "))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .map(|us| us / 1000.0)
        .collect();
    if runc_ms.len() != RUNS {
        bail!("runc in the guest did not complete {RUNS} runs:\n{text}");
    }

    // The agent as PID 1, the same disk mounted read-only.
    let vsock = dir.join("vsock.sock");
    let mut vmm = Command::new(&a.vmm)
        .arg("--kernel")
        .arg(&a.vmlinux)
        .arg("--initramfs")
        .arg(&a.agent_initramfs)
        .args(["--cpus", "2", "--memory", "512", "--console", "off", "--disk"])
        .arg(format!("{},ro", img.display()))
        .arg("--vsock")
        .arg(format!("cid=3,socket={}", vsock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let result = (|| -> Result<Vec<f64>> {
        let addr = AgentAddress::HybridVsock { socket: vsock.clone(), port: AGENT_PORT };
        let client = addr.connect_when_ready(Duration::from_secs(120))?;
        let mount = MountRequest {
            source: "/dev/vda".into(),
            fstype: "ext4".into(),
            target: "/run/hearth/disk".into(),
            options: vec!["ro".into()],
            ..Default::default()
        };
        client.mount(ctx(), &mount).context("mounting the disk in the guest")?;
        let mut agent_ms = Vec::new();
        for i in 0..RUNS {
            agent_ms.push(agent_once(&client, &format!("bench-{i}"), "/run/hearth/disk/rootfs")?);
        }
        let _ = client.shutdown(ctx(), &Default::default());
        Ok(agent_ms)
    })();
    let _ = hearth_e2e::wait_timeout(&mut vmm, Duration::from_secs(30));
    report("guest", result?, runc_ms);
    Ok(())
}
