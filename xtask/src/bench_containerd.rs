//! `cargo xtask bench containerd`: `ctr run --rm ... true` on the hearth
//! runtime, cold (no VM: the shim boots one) and warm (a VM already running,
//! kept up by another container), against `ctr run --rm` with runc
//! (io.containerd.runc.v2) on the same containerd, image and host, in the same
//! run. Then the three ways a container's root reaches the VM, warm: a
//! snapshot of containerd's overlayfs snapshotter shared over virtio-fs, the
//! same snapshot's layers as an erofs image on a disk with the writes in the
//! guest (layers.rs), and a thin device of its devmapper snapshotter attached
//! as a disk, for the start (`true`) and for file-heavy work (1000 files
//! created on the root), runc on overlayfs beside them. The erofs image is
//! built on its first use (timed on its own) and reused after; each erofs run
//! attaches and detaches it (no other container of the image runs). Medians
//! of RUNS runs; the last lines are the ratios.

use std::time::Duration;

use anyhow::Result;
use hearth_e2e::containerd::{wait_until, Containerd, IMAGE, RUNTIME};

use crate::bench::{median_f64, timed_ctr};

const RUNS: usize = 5;

/// 1000 small files created, written and synced on the container's root.
const FILES: &str = "mkdir /t && i=0; while [ $i -lt 1000 ]; do echo $i > /t/$i; i=$((i+1)); done; sync";

/// The root's path chosen per container (layers.rs).
const VIRTIO_FS: &str = "io.hearth.rootfs.layers=virtio-fs";
const EROFS: &str = "io.hearth.rootfs.layers=erofs";

fn timed_run(c: &Containerd, runtime: &str, id: &str) -> Result<f64> {
    timed_ctr(c, &["run", "--rm", "--runtime", runtime, "--annotation", VIRTIO_FS, IMAGE, id, "true"])
}

pub fn run() -> Result<()> {
    let env = hearth_e2e::Env::get();
    crate::bench::mount_cgroup_if_bare();
    let scratch = hearth_e2e::Scratch::new("bench-containerd");
    // A thin pool for the devmapper snapshotter's roots.
    let pool = hearth_e2e::devmapper::ThinPool::new(&scratch.path("pool"), "hearth-bench-pool", 2048);
    // VMs idle out after a second, so that each cold run finds none.
    let c = pool.containerd(&env, &scratch, "idle_timeout_secs = 1\n");
    let no_vm = |c: &Containerd| {
        wait_until("the idle VM gone", Duration::from_secs(120), || c.vmm_pids().is_empty());
        wait_until("the shim gone", Duration::from_secs(60), || {
            hearth_e2e::containerd::pids_matching("containerd-shim-hearth-v2", "").is_empty()
        });
    };
    let mut cold = Vec::new();
    for i in 0..RUNS {
        no_vm(&c);
        cold.push(timed_run(&c, RUNTIME, &format!("cold-{i}"))?);
    }
    // Warm: one long-running container keeps the VM up.
    c.ok(&["run", "-d", "--runtime", RUNTIME, "--annotation", VIRTIO_FS, IMAGE, "keeper", "sleep", "100000"]);
    let (mut warm, mut runc) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        warm.push(timed_run(&c, RUNTIME, &format!("warm-{i}"))?);
        runc.push(timed_run(&c, "io.containerd.runc.v2", &format!("runc-{i}"))?);
    }
    // The root's path: virtio-fs (overlayfs snapshot) against a disk
    // (devmapper snapshot), the start and file-heavy work.
    // Each root's path: its snapshotter, and the annotation choosing how an
    // overlayfs root reaches the VM.
    let (virtio_fs, erofs, devmapper) = (("overlayfs", VIRTIO_FS), ("overlayfs", EROFS), ("devmapper", VIRTIO_FS));
    let on = |runtime: &'static str, (snapshotter, path): (&str, &str), id: String, cmd: &'static [&'static str]| {
        let mut args =
            vec!["run", "--rm", "--snapshotter", snapshotter, "--runtime", runtime, "--annotation", path, IMAGE];
        args.push(&id);
        args.extend(cmd);
        timed_ctr(&c, &args)
    };
    // The erofs image's first use builds it.
    let erofs_first = on(RUNTIME, erofs, "erofs-first".into(), &["true"])?;
    let (mut dm_start, mut fs_files, mut dm_files, mut runc_files) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut erofs_start, mut erofs_files) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        dm_start.push(on(RUNTIME, devmapper, format!("dm-{i}"), &["true"])?);
        erofs_start.push(on(RUNTIME, erofs, format!("erofs-{i}"), &["true"])?);
        fs_files.push(on(RUNTIME, virtio_fs, format!("fs-files-{i}"), &["sh", "-c", FILES])?);
        erofs_files.push(on(RUNTIME, erofs, format!("erofs-files-{i}"), &["sh", "-c", FILES])?);
        dm_files.push(on(RUNTIME, devmapper, format!("dm-files-{i}"), &["sh", "-c", FILES])?);
        runc_files.push(on("io.containerd.runc.v2", virtio_fs, format!("runc-files-{i}"), &["sh", "-c", FILES])?);
    }
    c.ok(&["task", "kill", "-s", "SIGKILL", "keeper"]);
    let (cold, warm, runc) = (median_f64(cold), median_f64(warm), median_f64(runc));
    let (dm_start, fs_files, dm_files, runc_files) =
        (median_f64(dm_start), median_f64(fs_files), median_f64(dm_files), median_f64(runc_files));
    let (erofs_start, erofs_files) = (median_f64(erofs_start), median_f64(erofs_files));
    println!("ctr run --rm {IMAGE} true, median of {RUNS}:");
    println!("  hearth cold (VM boot included) {cold:.0} ms");
    println!("  hearth warm (VM running)       {warm:.0} ms");
    println!("  runc (reference)               {runc:.0} ms");
    println!("ratio hearth cold/runc {:.2}", cold / runc);
    println!("ratio hearth warm/runc {:.2}", warm / runc);
    println!("the root's path, VM running, median of {RUNS}:");
    println!(
        "  start (true):  virtio-fs (overlayfs) {warm:.0} ms | erofs (overlayfs) {erofs_start:.0} ms | disk (devmapper) {dm_start:.0} ms | runc {runc:.0} ms"
    );
    println!("  start (true), the erofs image's first use (built): {erofs_first:.0} ms");
    println!(
        "  1000 files:    virtio-fs (overlayfs) {fs_files:.0} ms | erofs (overlayfs) {erofs_files:.0} ms | disk (devmapper) {dm_files:.0} ms | runc {runc_files:.0} ms"
    );
    // The files' own cost: the run's, less the same path's start.
    let (fs_net, dm_net, runc_net) = (fs_files - warm, dm_files - dm_start, runc_files - runc);
    let erofs_net = erofs_files - erofs_start;
    println!(
        "  1000 files, less the start: virtio-fs {fs_net:.0} ms | erofs {erofs_net:.0} ms | disk {dm_net:.0} ms | runc {runc_net:.0} ms"
    );
    println!("ratio start erofs/virtio-fs {:.2}", erofs_start / warm);
    println!("ratio start erofs first use/virtio-fs {:.2}", erofs_first / warm);
    println!("ratio files erofs/virtio-fs {:.2}", erofs_net / fs_net);
    println!("ratio files erofs/runc {:.2}", erofs_net / runc_net);
    println!("ratio start disk/virtio-fs {:.2}", dm_start / warm);
    println!("ratio files disk/virtio-fs {:.2}", dm_net / fs_net);
    println!("ratio files disk/runc {:.2}", dm_net / runc_net);
    println!("ratio files virtio-fs/runc {:.2}", fs_net / runc_net);
    drop(c);
    drop(pool);
    Ok(())
}
