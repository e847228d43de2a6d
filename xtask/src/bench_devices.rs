//! `cargo xtask bench devices`: throughput of hearth-vmm's virtio devices
//! measured in the guest, each beside the same work done on the host in the
//! same run (in the test host where KVM is not hardware-backed, where both
//! the guest and the host reference work on the test host's in-memory
//! filesystem):
//!
//! - virtio-blk sequential read and write (O_DIRECT in the guest) of a raw
//!   image, against reading and writing the same file on the host;
//! - virtio-vsock, host to guest, against the same bytes over a Unix socket
//!   on the host;
//! - virtio-fs: untar of a tree of several thousand small files into the
//!   share, against untar of the same archive on the host;
//! - the block path for files: the same untar onto ext4 on a virtio-blk
//!   disk (an empty image, as a distro's), against the same host figure and
//!   the virtio-fs one.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::artefacts::Artefacts;
use crate::sh;

const DISK_MIB: usize = 128;
const VSOCK_MIB: usize = 128;
const TREE_DIRS: usize = 30;
const TREE_FILES_PER_DIR: usize = 100;

fn mb_per_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs.max(1e-6)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
}

fn host_block(disk: &Path) -> Result<(f64, f64)> {
    let chunk = pattern(1 << 20);
    let started = Instant::now();
    let mut f = std::fs::File::create(disk)?;
    for _ in 0..DISK_MIB {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    let write = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut f = std::fs::File::open(disk)?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf)? > 0 {}
    let read = started.elapsed().as_secs_f64();
    Ok((read, write))
}

fn host_unix_socket(bytes: usize) -> Result<f64> {
    let (mut a, mut b) = UnixStream::pair()?;
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        let chunk = pattern(256 * 1024);
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            a.write_all(&chunk[..n]).unwrap();
            left -= n;
        }
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < bytes {
        got += b.read(&mut buf)?;
    }
    writer.join().unwrap();
    Ok(started.elapsed().as_secs_f64())
}

fn make_tree(root: &Path) -> Result<usize> {
    let mut n = 0;
    for d in 0..TREE_DIRS {
        let dir = root.join(format!("dir{d:02}"));
        std::fs::create_dir_all(&dir)?;
        for f in 0..TREE_FILES_PER_DIR {
            let len = 512 + (d * 131 + f * 37) % 3584;
            std::fs::write(dir.join(format!("file{f:03}.txt")), &pattern(len)[..])?;
            n += 1;
        }
    }
    Ok(n)
}

fn fact(lines: &[String], name: &str) -> Result<f64> {
    let prefix = format!("HEARTH-{name}: ");
    lines
        .iter()
        .find_map(|l| l.strip_prefix(&prefix))
        .with_context(|| format!("the guest did not report {name}"))?
        .trim()
        .parse()
        .with_context(|| format!("{name} is not a number"))
}

pub fn run(a: &Artefacts) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("hearth-bench-devices-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = measure(a, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(a: &Artefacts, dir: &Path) -> Result<()> {
    println!(
        "bench devices: virtio-blk {DISK_MIB} MiB, vsock {VSOCK_MIB} MiB, untar of {} files onto virtio-fs and onto ext4 on virtio-blk",
        TREE_DIRS * TREE_FILES_PER_DIR
    );

    // Host references.
    let disk = dir.join("disk.img");
    let (host_read, host_write) = host_block(&disk)?;
    let host_vsock = host_unix_socket(VSOCK_MIB << 20)?;
    let tree = dir.join("tree-src");
    let files = make_tree(&tree.join("tree"))?;
    let tarball = dir.join("run/tree.tar");
    std::fs::create_dir_all(dir.join("run"))?;
    sh::run(Command::new("tar").arg("cf").arg(&tarball).arg("-C").arg(&tree).arg("tree"))?;
    let host_untar_dir = dir.join("host-untar");
    std::fs::create_dir_all(&host_untar_dir)?;
    let started = Instant::now();
    sh::run(Command::new("tar").arg("xf").arg(&tarball).arg("-C").arg(&host_untar_dir))?;
    sh::run(&mut Command::new("sync"))?;
    let host_untar = started.elapsed().as_secs_f64();

    // The guest: one VM does the block and virtio-fs work, then sinks vsock.
    let script = format!(
        r#"
t() {{ cut -d' ' -f1 /proc/uptime; }}
since() {{ echo "$(t) $1" | awk '{{printf "%.2f", $1 - $2}}'; }}
a=$(t); dd if=/dev/vdb of=/dev/null bs=1M iflag=direct 2>/dev/null
echo "HEARTH-BLK-READ-SECS: $(since $a)"
a=$(t); dd if=/dev/zero of=/dev/vdb bs=1M count={DISK_MIB} oflag=direct 2>/dev/null; sync
echo "HEARTH-BLK-WRITE-SECS: $(since $a)"
mkdir -p /mnt/data && mount -t ext4 /dev/vdc /mnt/data
a=$(t); tar xf tree.tar -C /mnt/data; sync
echo "HEARTH-BLK-UNTAR-SECS: $(since $a)"
echo "HEARTH-BLK-FILES: $(find /mnt/data/tree -type f | wc -l)"
umount /mnt/data
mkdir -p /mnt/share && mount -t virtiofs bench /mnt/share
a=$(t); tar xf tree.tar -C /mnt/share; sync
echo "HEARTH-FS-UNTAR-SECS: $(since $a)"
echo "HEARTH-FS-FILES: $(find /mnt/share/tree -type f | wc -l)"
umount /mnt/share
./hearth-guest-tool vsock-sink 7000
"#
    );
    std::fs::write(dir.join("run/run.sh"), script)?;
    std::fs::copy(&a.guest_tool, dir.join("run/hearth-guest-tool"))?;
    let run_img = dir.join("run.img");
    sh::run(
        Command::new("mke2fs").args(["-q", "-F", "-t", "ext4", "-d"]).arg(dir.join("run")).arg(&run_img).arg("64M"),
    )?;
    // The block path's file system: an empty ext4 image, as a distro's.
    let data_img = dir.join("data.img");
    sh::run(Command::new("mke2fs").args(["-q", "-F", "-t", "ext4"]).arg(&data_img).arg("256M"))?;
    let share = dir.join("share");
    std::fs::create_dir_all(&share)?;
    let socket = dir.join("v.sock");

    let mut child = Command::new(&a.vmm)
        .arg("--kernel")
        .arg(&a.vmlinux)
        .arg("--initramfs")
        .arg(&a.boot_initramfs)
        .args(["--cpus", "2", "--memory", "512"])
        .arg("--disk")
        .arg(&run_img)
        .arg("--disk")
        .arg(&disk)
        .arg("--disk")
        .arg(&data_img)
        .arg("--fs")
        .arg(format!("tag=bench,dir={}", share.display()))
        .arg("--vsock")
        .arg(format!("cid=3,socket={}", socket.display()))
        .args(["--cmdline", "hearth.run=/dev/vda"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Wait until the guest reaches the vsock part, then send.
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(1200);
    while !lines.iter().any(|l: &String| l.starts_with("HEARTH-FS-FILES")) {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => lines.push(l),
            Err(_) => {
                let _ = child.kill();
                bail!("the guest did not finish its block and virtio-fs work:\n{}", lines.join("\n"));
            }
        }
    }
    let mut s = loop {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the guest's vsock sink never accepted");
        }
        if let Ok(mut s) = UnixStream::connect(&socket) {
            s.write_all(b"CONNECT 7000\n")?;
            let mut line = String::new();
            if BufReader::new(s.try_clone()?).read_line(&mut line).is_ok() && line.starts_with("OK ") {
                break s;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let chunk = pattern(256 * 1024);
    for _ in 0..(VSOCK_MIB << 20) / chunk.len() {
        s.write_all(&chunk)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    lines.extend(rx.iter());
    let status = child.wait()?;
    if !status.success() {
        bail!("hearth-vmm failed ({status}):\n{}", lines.join("\n"));
    }

    let blk_read = fact(&lines, "BLK-READ-SECS")?;
    let blk_write = fact(&lines, "BLK-WRITE-SECS")?;
    let untar = fact(&lines, "FS-UNTAR-SECS")?;
    let blk_untar = fact(&lines, "BLK-UNTAR-SECS")?;
    if fact(&lines, "BLK-FILES")? as usize != files {
        bail!("the guest untarred {} files onto ext4, expected {files}", fact(&lines, "BLK-FILES")?);
    }
    let guest_files = fact(&lines, "FS-FILES")? as usize;
    if guest_files != files {
        bail!("the guest untarred {guest_files} files, expected {files}");
    }
    let vsock = fact(&lines, "VSOCK-SINK-SECS")?;
    let bytes = DISK_MIB << 20;
    let (gr, hr) = (mb_per_s(bytes, blk_read), mb_per_s(bytes, host_read));
    let (gw, hw) = (mb_per_s(bytes, blk_write), mb_per_s(bytes, host_write));
    let (gv, hv) = (mb_per_s(VSOCK_MIB << 20, vsock), mb_per_s(VSOCK_MIB << 20, host_vsock));
    println!(
        "virtio-blk sequential read:  guest {gr:8.1} MB/s | host, same file {hr:8.1} MB/s | ratio guest/host: {:.3}",
        gr / hr
    );
    println!(
        "virtio-blk sequential write: guest {gw:8.1} MB/s | host, same file {hw:8.1} MB/s | ratio guest/host: {:.3}",
        gw / hw
    );
    println!(
        "vsock host to guest:         guest {gv:8.1} MB/s | host Unix socket {hv:8.1} MB/s | ratio guest/host: {:.3}",
        gv / hv
    );
    println!(
        "virtio-fs untar of {files} files: guest {untar:.2} s | host {host_untar:.2} s | time ratio guest/host: {:.1}",
        untar / host_untar
    );
    println!(
        "ext4 on virtio-blk untar of {files} files: guest {blk_untar:.2} s | host {host_untar:.2} s | time ratio guest/host: {:.1}",
        blk_untar / host_untar
    );
    println!("ratio untar virtio-blk (ext4)/virtio-fs {:.3}", blk_untar / untar);
    Ok(())
}
