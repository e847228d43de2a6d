//! `cargo xtask bench <name>`: benchmarks that print each figure beside a
//! reference measured in the same run, as a ratio. They run where our VMM can
//! run (here, or in the test host); the measuring itself is `xtask
//! bench-inner <name>`, started in that place.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::artefacts::Artefacts;
use crate::place;

pub const BENCHES: &[&str] = &["boot", "devices", "agent", "containerd", "distro", "network", "docker", "cri"];

/// The kernel command line both VMMs boot with (hearth-vmm's defaults).
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";
const INIT_MARKER: &str = "HEARTH-INIT: reached";
const DONE_MARKER: &str = "HEARTH-DONE";

pub fn run(name: &str, artefacts: &Artefacts) -> Result<()> {
    if !BENCHES.contains(&name) {
        bail!("no benchmark {name:?}; the benchmarks are: {}", BENCHES.join(", "));
    }
    if name == "agent" {
        // The native half needs no VM: it runs here, directly.
        crate::bench_agent::native(artefacts)?;
    }
    let me = std::env::current_exe()?.display().to_string();
    let argv = vec![me, "bench-inner".into(), name.into()];
    // The distro benchmark keeps a distro, its image and a tree to untar.
    let memory_mib = if name == "distro" { 6144 } else { 2048 };
    place::run_ok(&format!("bench-{name}"), artefacts, &argv, memory_mib, Duration::from_secs(3600))
}

pub fn inner(name: &str) -> Result<()> {
    let a = Artefacts::from_env()?;
    match name {
        "boot" => boot(&a),
        "devices" => crate::bench_devices::run(&a),
        "agent" => crate::bench_agent::guest(&a),
        "containerd" => crate::bench_containerd::run(),
        "distro" => crate::bench_distro::run(),
        "network" => crate::bench_network::run(),
        "docker" => crate::bench_docker::run(),
        "cri" => crate::bench_cri::run(),
        _ => bail!("no benchmark {name:?}"),
    }
}

struct Sample {
    to_init: Duration,
    max_rss_kib: u64,
    /// vCPUs the guest saw, to show that both VMMs booted the same machine.
    nproc: String,
}

/// Starts `cmd`, times it until the guest's init prints its first line,
/// lets it run to the guest's end (killing it a while after, if the VMM does
/// not exit by itself), and reads its peak RSS from wait4.
fn measure(cmd: &mut Command) -> Result<Sample> {
    let started = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    let mut to_init = None;
    let mut nproc = String::from("?");
    let deadline = started + Duration::from_secs(300);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, line)) if line.contains(INIT_MARKER) => to_init = Some(at - started),
            Ok((_, line)) if line.contains(DONE_MARKER) => break,
            Ok((_, line)) if line.starts_with("HEARTH-NPROC: ") => nproc = line[14..].trim().to_string(),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // The guest asked to end; give the VMM a moment to exit by itself.
    let grace = Instant::now() + Duration::from_secs(5);
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting on our own child; pointers are to live locals.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        if Instant::now() > grace {
            let _ = child.kill();
            // SAFETY: as above, blocking this time.
            unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let to_init = to_init.with_context(|| format!("{cmd:?} never reached the guest's init"))?;
    Ok(Sample { to_init, max_rss_kib: usage.ru_maxrss as u64, nproc })
}

fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

/// The median of timings (floats have no total order; NaN never occurs here).
/// Prints `title`, each row's hearth and runc milliseconds, then each
/// row's ratio hearth/runc on a line of its own (the lines that compare).
pub fn print_against_runc(title: &str, rows: &[(&str, f64, f64)]) {
    println!("{title}");
    let width = rows.iter().map(|(what, _, _)| what.len()).max().unwrap_or(0);
    for (what, h, r) in rows {
        println!("  {what:<width$} hearth {h:.0} ms, runc (reference) {r:.0} ms");
    }
    for (what, h, r) in rows {
        println!("ratio {what} hearth/runc {:.2}", h / r);
    }
}

pub fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Milliseconds `ctr ARGS` took, on containerd `c`; an error if it failed.
pub fn timed_ctr(c: &hearth_e2e::containerd::Containerd, args: &[&str]) -> Result<f64> {
    let started = std::time::Instant::now();
    let o = c.ctr(args);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if !o.status.success() {
        anyhow::bail!("ctr {args:?} failed: {}", hearth_e2e::containerd::text(&o));
    }
    Ok(ms)
}

/// runc, the reference, needs the cgroup hierarchy, which a bare test host
/// may not have mounted.
pub fn mount_cgroup_if_bare() {
    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() && !Path::new("/sys/fs/cgroup/memory").exists() {
        let _ = Command::new("mount").args(["-t", "cgroup2", "cgroup2", "/sys/fs/cgroup"]).status();
    }
}

fn boot(a: &Artefacts) -> Result<()> {
    let runs: usize = std::env::var("HEARTH_BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let (cpus, mem) = ("2", "256");
    let ours = || {
        let mut c = Command::new(&a.vmm);
        c.arg("--kernel").arg(&a.vmlinux).arg("--initramfs").arg(&a.boot_initramfs);
        c.args(["--cpus", cpus, "--memory", mem]);
        c
    };
    let qemu = || {
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on", "-accel", "kvm", "-cpu", "host"]);
        c.args(["-smp", cpus, "-m", mem, "-nodefaults", "-no-user-config", "-no-reboot"]);
        c.args(["-display", "none", "-monitor", "none", "-serial", "stdio"]);
        c.arg("-kernel").arg(&a.vmlinux).arg("-initrd").arg(&a.boot_initramfs).args(["-append", CMDLINE]);
        c
    };
    println!("bench boot: {runs} runs each, {cpus} vCPUs, {mem} MiB, kernel {} (vmlinux, PVH)", a.kernel_release);
    let (mut hearth, mut reference) = (Vec::new(), Vec::new());
    for i in 1..=runs {
        // Alternate, so drift in the machine's load hits both alike.
        let h = measure(&mut ours())?;
        let q = measure(&mut qemu())?;
        println!(
            "run {i}: hearth-vmm {:7.1} ms {:6} KiB RSS {} CPUs | qemu microvm {:7.1} ms {:6} KiB RSS {} CPUs",
            h.to_init.as_secs_f64() * 1e3,
            h.max_rss_kib,
            h.nproc,
            q.to_init.as_secs_f64() * 1e3,
            q.max_rss_kib,
            q.nproc
        );
        hearth.push(h);
        reference.push(q);
    }
    let ht = median(hearth.iter().map(|s| s.to_init).collect());
    let qt = median(reference.iter().map(|s| s.to_init).collect());
    let hr = median(hearth.iter().map(|s| s.max_rss_kib).collect());
    let qr = median(reference.iter().map(|s| s.max_rss_kib).collect());
    println!(
        "median boot-to-init: hearth-vmm {:.1} ms, qemu microvm {:.1} ms",
        ht.as_secs_f64() * 1e3,
        qt.as_secs_f64() * 1e3
    );
    println!(
        "median peak RSS: hearth-vmm {} KiB, qemu microvm {} KiB, ratio hearth/qemu: {:.2}",
        hr,
        qr,
        hr as f64 / qr as f64
    );
    println!("boot-to-init ratio hearth/qemu: {:.2}", ht.as_secs_f64() / qt.as_secs_f64());
    Ok(())
}
