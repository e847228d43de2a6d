//! `cargo xtask bench distro`: the `hearth` CLI and a distro, each figure
//! beside a reference measured in the same run, on the same containerd and
//! the same root filesystem (the distro suite's Debian: systemd, Docker):
//!
//! - cold: `hearth -d debian -- true` with the VM down (the VM boots, the
//!   distro's init starts, `true` runs), against `ctr run --rm` of the same
//!   image with runc;
//! - warm: the same with the distro running (an exec), against the same
//!   reference;
//! - untar of a tree of many small files (the distro's /usr/share/doc)
//!   onto the distro's root filesystem, timed inside the distro, against
//!   the same untar on the host: for the distro on a containerd snapshot
//!   (shared over virtio-fs) and for the same tree installed on a disk
//!   image of its own (`install --disk`: ext4 on virtio-blk);
//! - on that disk distro against the host: untar of a source tree of a few
//!   thousand files (the distro's /usr/include), `git clone` of it as a
//!   repository (over file://, packing and unpacking as a remote clone
//!   does), and `make -j2` of a small C project.
//!
//! Medians of RUNS runs; the last lines are the ratios.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hearth_e2e::containerd::Containerd;
use hearth_e2e::distro::{text, Hearth, DISTRO_INCLUDE};

use crate::bench::{median_f64, timed_ctr};

const COLD_RUNS: usize = 3;
const WARM_RUNS: usize = 5;
const UNTAR_RUNS: usize = 3;
const SOURCE_RUNS: usize = 3;
/// What the source-tree figures need in the distro besides the suite's set.
const DEV_INCLUDE: &[&str] = &["git", "make", "gcc", "libc6-dev"];

/// Made once in the distro (in /root) and copied to the host through the
/// share: the source tree as a tar, that tree as a git repository, and a
/// small C project of 80 files (a static library) for `make`.
const PREPARE: &str = r#"cd /root && tar -C /usr -cf src.tar include && rm -rf repo && mkdir repo && tar -xf src.tar -C repo && (cd repo && git init -q && git add -A && git -c user.name=bench -c user.email=bench@hearth commit -qm tree) && tar -cf repo.tar repo && rm -rf proj && mkdir proj && for i in $(seq 1 80); do printf '#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\nint f%d(int x) { char b[64]; snprintf(b, sizeof b, "%%d", x); return (int)strlen(b) + x; }\n' $i > proj/f$i.c; done && printf 'OBJS = $(patsubst %%.c,%%.o,$(wildcard *.c))\nlib.a: $(OBJS)\n\tar rcs $@ $^\nclean:\n\trm -f *.o lib.a\n' > proj/Makefile && tar -cf proj.tar proj && cp src.tar repo.tar proj.tar /mnt/host/"#;

/// The source-tree workloads, each (what, set-up, the timed command,
/// clean-up), run alike in the distro's /root and in a directory of the
/// host holding the same files.
const WORKLOADS: &[(&str, &str, &str, &str)] = &[
    ("untar of the source tree", "rm -rf u && mkdir u", "tar -xf src.tar -C u", "rm -rf u"),
    ("git clone (file://) of it", "rm -rf c", "git clone -q file://$PWD/repo c", "rm -rf c"),
    ("make -j2 of 80 C files", "make -s -C proj clean", "make -s -j2 -C proj", "true"),
];
/// The command timed.
const TRUE: &str = "true";

fn timed(h: &Hearth, args: &[&str]) -> Result<f64> {
    let started = Instant::now();
    let o = h.run_with(args, b"", Duration::from_secs(900));
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if !o.status.success() {
        bail!("hearth {args:?} failed: {}", text(&o));
    }
    Ok(ms)
}

/// The untar of `/root/tree.tar` as a [`timed_script`], into `dir`.
fn untar_script(tree: &str, dir: &str) -> String {
    timed_script(&format!("rm -rf {dir} && mkdir {dir}"), &format!("tar -xf {tree} -C {dir}"), &format!("rm -rf {dir}"))
}

/// Seconds the untar took inside the distro, as the distro measured them
/// (hearth's own exec is not in the figure).
fn untar_in_distro(h: &Hearth, distro: &str, run: usize) -> Result<f64> {
    seconds(&h.sh(distro, &untar_script("/root/tree.tar", &format!("/root/untar-{run}"))))
}

/// The same untar on the host, measured the same way.
fn untar_on_host(tree: &std::path::Path, dir: &std::path::Path) -> Result<f64> {
    let parent = dir.parent().context("the host's untar directory")?;
    seconds(&sh_on_host(parent, &untar_script(&tree.display().to_string(), &dir.display().to_string()))?)
}

/// A script that prints the milliseconds `cmd` took (the set-up and the
/// clean-up not counted), its writes synced.
fn timed_script(set_up: &str, cmd: &str, clean_up: &str) -> String {
    format!(
        "{set_up} && sync && s=$(date +%s%N) && {cmd} && sync && e=$(date +%s%N) && {clean_up} && echo $(( (e - s) / 1000000 ))"
    )
}

/// The seconds a [`timed_script`] printed last.
fn seconds(out: &str) -> Result<f64> {
    let ms: f64 = out.lines().last().unwrap_or("").trim().parse().with_context(|| format!("a timing: {out:?}"))?;
    Ok(ms / 1000.0)
}

/// `script` run by sh in `dir` on the host; its stdout.
fn sh_on_host(dir: &std::path::Path, script: &str) -> Result<String> {
    let o = Command::new("sh").arg("-c").arg(script).current_dir(dir).output()?;
    if !o.status.success() {
        bail!("on the host, {script:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

pub fn run() -> Result<()> {
    let env = hearth_e2e::Env::get();
    crate::bench::mount_cgroup_if_bare();
    let scratch = hearth_e2e::Scratch::new("bench-distro");
    let c = Containerd::start(&env, &scratch, 30);
    let h = Hearth::new(&env, &scratch, &c, 1024);
    // On a containerd snapshot, so that runc can run the same image.
    h.ok(&["distro", "install", "debian", "--include", &DISTRO_INCLUDE.join(","), "--snapshot"])
        .contains("installed")
        .then_some(())
        .context("install")?;
    let image = c
        .ok(&["-n", "hearth", "images", "ls", "-q"])
        .lines()
        .find(|l| l.starts_with("hearth.local/distro/debian:"))
        .context("the distro's image is not in containerd")?
        .to_string();

    // The reference, as the issue names it: `ctr run --rm` with runc of the
    // same image, measured between hearth's runs, cold and warm alike.
    let mut runc = Vec::new();
    let mut runc_run = |i: usize| {
        timed_ctr(
            &c,
            &["-n", "hearth", "run", "--rm", "--runtime", "io.containerd.runc.v2", &image, &format!("rc-{i}"), TRUE],
        )
        .map(|ms| runc.push(ms))
    };
    // Cold: the VM down before each run.
    let mut cold = Vec::new();
    for i in 0..COLD_RUNS {
        h.ok(&["shutdown"]);
        cold.push(timed(&h, &["-d", "debian", "--", TRUE])?);
        runc_run(i)?;
    }
    // Warm: the distro running.
    let mut warm = Vec::new();
    for i in 0..WARM_RUNS {
        warm.push(timed(&h, &["-d", "debian", "--", TRUE])?);
        runc_run(COLD_RUNS + i)?;
    }

    // Untar: the distro's /usr/share/doc as the tree, inside and on the host
    // (all of /usr/share took most of an hour under nested emulation).
    let files = h.sh("debian", "tar -C /usr/share -cf /root/tree.tar doc && tar -tf /root/tree.tar | wc -l && cp /root/tree.tar /mnt/host/tree.tar");
    let files: u64 = files.trim().parse().context("counting the tree's entries")?;
    let tree = h.share.join("tree.tar");
    let tree_mib = std::fs::metadata(&tree)?.len() >> 20;
    let (mut inside, mut host) = (Vec::new(), Vec::new());
    for i in 0..UNTAR_RUNS {
        inside.push(untar_in_distro(&h, "debian", i)?);
        host.push(untar_on_host(&tree, &scratch.path("untar-host"))?);
    }
    h.ok(&["shutdown"]);
    let (inside, host_doc) = (median_f64(inside), median_f64(host.clone()));
    println!("  untar of /usr/share/doc ({files} entries, {tree_mib} MiB), root on virtio-fs: {inside:.2} s, host {host_doc:.2} s");
    // The same tree on a disk of its own: ext4 in the guest on virtio-blk,
    // with a compiler and git for the source-tree figures below.
    let include = [DISTRO_INCLUDE, DEV_INCLUDE].concat().join(",");
    h.ok(&["distro", "install", "debian", "--name", "ondisk", "--include", &include, "--disk", "--disk-size", "16"])
        .contains("installed")
        .then_some(())
        .context("install --disk")?;
    h.sh("ondisk", "cp /mnt/host/tree.tar /root/tree.tar");
    let mut on_disk = Vec::new();
    for i in 0..UNTAR_RUNS {
        on_disk.push(untar_in_distro(&h, "ondisk", i)?);
        host.push(untar_on_host(&tree, &scratch.path("untar-host"))?);
    }
    let (on_disk, host) = (median_f64(on_disk), median_f64(host));
    println!("  untar of /usr/share/doc, root on its own disk: {on_disk:.2} s, host {host:.2} s");

    // A source tree of a few thousand files (the distro's /usr/include),
    // the same tree as a git repository to clone, and a small C build.
    let work = scratch.path("host-work");
    std::fs::create_dir_all(&work)?;
    let src_files: u64 = h
        .sh("ondisk", &format!("{PREPARE} && tar -tf /root/src.tar | wc -l"))
        .trim()
        .parse()
        .context("counting the source tree's entries")?;
    sh_on_host(
        &work,
        &format!(
            "for t in src repo proj; do cp {}/$t.tar .; done && tar -xf repo.tar && tar -xf proj.tar",
            h.share.display()
        ),
    )?;
    let mut rows = Vec::new();
    for (what, set_up, cmd, clean_up) in WORKLOADS {
        let script = timed_script(set_up, cmd, clean_up);
        let (mut d, mut o) = (Vec::new(), Vec::new());
        for _ in 0..SOURCE_RUNS {
            d.push(seconds(&h.sh("ondisk", &format!("cd /root && {script}")))?);
            o.push(seconds(&sh_on_host(&work, &script)?)?);
        }
        let (d, o) = (median_f64(d), median_f64(o));
        println!("  {what}: distro on its disk {d:.2} s, host {o:.2} s, ratio {:.2}", d / o);
        rows.push((what, d / o));
    }
    h.ok(&["shutdown"]);

    let runs = runc.len();
    let (cold, warm, runc) = (median_f64(cold), median_f64(warm), median_f64(runc));
    println!("hearth -d debian -- true (systemd, Docker inside), against ctr run --rm with runc of the same image:");
    println!("  cold, VM down (boot + init + exec), median of {COLD_RUNS}: hearth {cold:.0} ms");
    println!("  warm, distro running (exec), median of {WARM_RUNS}:       hearth {warm:.0} ms");
    println!("  ctr run --rm runc (container start + true), median of {runs}: {runc:.0} ms");
    println!("untar of the distro's /usr/share/doc ({files} entries, {tree_mib} MiB), median of {UNTAR_RUNS}:");
    println!("  inside the distro, root on virtio-fs {inside:.2} s | root on its own disk {on_disk:.2} s | on the host {host:.2} s");
    println!("source tree: /usr/include ({src_files} entries), medians of {SOURCE_RUNS}, distro on its disk against the host");
    println!("ratio hearth cold/runc run {:.2}", cold / runc);
    println!("ratio hearth warm/runc run {:.2}", warm / runc);
    println!("ratio untar distro/host {:.2}", inside / host_doc);
    println!("ratio untar disk distro/host {:.2}", on_disk / host);
    println!("ratio untar disk distro/virtio-fs distro {:.2}", on_disk / inside);
    for (what, r) in rows {
        println!("ratio {what} disk distro/host {r:.2}");
    }
    Ok(())
}
