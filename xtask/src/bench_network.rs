//! `cargo xtask bench network`: TCP from the host to a container on a CNI
//! bridge network (Debian's `bridge` + `host-local` plugins, as the CRI
//! runs them), the container on the hearth runtime (its namespace mirrored
//! into the VM: docs/networking.md) against one on runc in a namespace of
//! the same network, same image, same server, in the same run. Throughput:
//! MiB echoed through one connection (sent and read back at once);
//! latency: 64-byte request/response round trips on one connection.
//! Medians of RUNS; the last lines are the ratios.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hearth_e2e::cni;
use hearth_e2e::containerd::{Containerd, RUNTIME};

use crate::bench::median_f64;

const RUNS: usize = 3;
const BULK_MIB: usize = 8;
const ROUND_TRIPS: usize = 200;

fn connect(ip: &str) -> Result<TcpStream> {
    for _ in 0..120 {
        if let Ok(s) = TcpStream::connect((ip, 8080)) {
            s.set_read_timeout(Some(Duration::from_secs(120)))?;
            s.set_nodelay(true)?;
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!("nothing answers at {ip}:8080")
}

/// MiB/s of BULK_MIB sent and echoed back through one connection.
fn throughput(ip: &str) -> Result<f64> {
    let mut s = connect(ip)?;
    let data = vec![0x5au8; BULK_MIB << 20];
    let started = Instant::now();
    let mut w = s.try_clone()?;
    let sent = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent));
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).context("reading the echo")?;
    writer.join().map_err(|_| anyhow::anyhow!("the writer panicked"))??;
    let secs = started.elapsed().as_secs_f64();
    if back != data {
        bail!("the echo from {ip} differs from what was sent");
    }
    Ok(BULK_MIB as f64 / secs)
}

/// Microseconds per 64-byte request/response round trip on one connection.
fn latency(ip: &str) -> Result<f64> {
    let mut s = connect(ip)?;
    let req = [7u8; 64];
    let mut back = [0u8; 64];
    // One round trip first, so that connection setup is not counted.
    s.write_all(&req)?;
    s.read_exact(&mut back)?;
    let started = Instant::now();
    for _ in 0..ROUND_TRIPS {
        s.write_all(&req)?;
        s.read_exact(&mut back)?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / ROUND_TRIPS as f64)
}

pub fn run() -> Result<()> {
    let env = hearth_e2e::Env::get();
    crate::bench::mount_cgroup_if_bare();
    let scratch = hearth_e2e::Scratch::new("bench-network");
    let net = cni::Network::new("hearth-bench", "hbench0", "10.67.0.0/24", &scratch.path("ipam").display().to_string());
    let on_hearth = net.attach("bench-hearth", "hearth-bench-h", None);
    let on_runc = net.attach("bench-runc", "hearth-bench-r", None);
    let c = Containerd::start(&env, &scratch, 600);
    for (id, runtime, at) in [("bench-hearth", RUNTIME, &on_hearth), ("bench-runc", "io.containerd.runc.v2", &on_runc)]
    {
        c.echo_server_in(id, runtime, &at.path(), None);
    }
    let (mut ht, mut rt, mut hl, mut rl) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        ht.push(throughput(&on_hearth.ip)?);
        rt.push(throughput(&on_runc.ip)?);
        hl.push(latency(&on_hearth.ip)?);
        rl.push(latency(&on_runc.ip)?);
    }
    for id in ["bench-hearth", "bench-runc"] {
        c.ok(&["task", "kill", "-s", "SIGKILL", id]);
    }
    let (ht, rt, hl, rl) = (median_f64(ht), median_f64(rt), median_f64(hl), median_f64(rl));
    println!("TCP from the host to a container on a CNI bridge network, median of {RUNS}:");
    println!("  throughput, {BULK_MIB} MiB echoed: hearth {ht:.1} MiB/s, runc (reference) {rt:.1} MiB/s");
    println!("  latency, {ROUND_TRIPS} round trips of 64 B: hearth {hl:.0} us, runc (reference) {rl:.0} us");
    println!("ratio throughput hearth/runc {:.2}", ht / rt);
    println!("ratio latency hearth/runc {:.2}", hl / rl);
    Ok(())
}
