//! e2e suite `disks`: distros on ext4 disk images of their own, as WSL
//! keeps each distro in a VHDX (`hearth distro import --vhd`, `install
//! --disk`): attached to the running VM through hearth-vmm's control socket
//! when a distro starts and detached when it stops. The containerd suite
//! covers the same path for plain containers (`io.hearth.rootfs.disk`);
//! the devices suite covers hot-attach at the VMM's level.

use hearth_e2e::containerd::Containerd;
use hearth_e2e::distro::{wait_for_systemd, Hearth, DISTRO_INCLUDE};
use hearth_e2e::{Env, Scratch};

/// Distros on ext4 disk images (`import --vhd`), as WSL keeps each distro
/// in a VHDX: the root is the image, attached when the distro starts and
/// detached when it stops; files survive terminate and a VM restart; two
/// distros on two disks run at once and stop independently; `export --vhd`
/// then `import --vhd` under another name gives the same files; deleting a
/// file gives its space back to the sparse image; bad images are refused.
#[test]
fn distros_on_disk_images() {
    let env = Env::get();
    let scratch = Scratch::new("distro-disks");
    let c = Containerd::start(&env, &scratch, 30);
    let h = Hearth::new(&env, &scratch, &c, 512);
    let tree = scratch.path("tree");
    hearth_e2e::agent::busybox_rootfs(&tree, &env.guest_tool).unwrap();
    std::fs::write(tree.join("hello.txt"), "from the image\n").unwrap();
    let img = scratch.path("tiny.img");
    hearth_e2e::ext4_image(&tree, &img, 128);
    let disks = scratch.path("disks");

    h.ok(&["distro", "import", "--vhd", "tiny", &img.display().to_string()]);
    let image = disks.join("tiny.img");
    assert!(image.is_file(), "the image is copied into disk_images_dir");
    assert_eq!(h.sh("tiny", "cat /hello.txt; echo kept > /kept.txt; sync"), "from the image\n");
    let root = h.sh("tiny", "grep ' / ' /proc/self/mounts");
    assert!(root.starts_with("/dev/vd") && root.contains(" / ext4 ") && root.contains("discard"), "{root}");

    // Deleting a file gives its space back to the sparse image (after fstrim).
    h.sh("tiny", "dd if=/dev/zero of=/big bs=1M count=32 2>/dev/null && sync");
    let full = hearth_e2e::allocated_bytes(&image);
    // The root is mounted with discard, whose discards are issued after the
    // journal commits, asynchronously; fstrim waits for its own.
    h.sh("tiny", "rm /big && sync && fstrim /");
    let trimmed = hearth_e2e::allocated_bytes(&image);
    hearth_e2e::figure(&format!(
        "distro disk image allocated on the host: {} KiB with a 32 MiB file, {} KiB once it is deleted",
        full >> 10,
        trimmed >> 10
    ));
    assert!(trimmed + (24 << 20) < full, "deleting 32 MiB left the image at {trimmed} of {full} bytes");

    // Export the image, import it as a second distro: the same files.
    h.ok(&["terminate", "tiny"]);
    let out = scratch.path("out.img");
    h.ok(&["distro", "export", "--vhd", "tiny", &out.display().to_string()]);
    h.ok(&["distro", "import", "--vhd", "tiny2", &out.display().to_string()]);
    assert_eq!(h.sh("tiny2", "cat /kept.txt"), "kept\n");
    // Both at once, each on its own disk, then one stopped while the other runs.
    h.sh("tiny2", "echo two > /kept.txt && sync");
    assert_eq!(h.sh("tiny", "cat /kept.txt"), "kept\n", "tiny kept its file across terminate");
    let status = h.ok(&["status"]);
    assert!(status.contains("disk slots 2 in use"), "{status}");
    h.ok(&["terminate", "tiny2"]);
    assert_eq!(h.sh("tiny", "cat /kept.txt"), "kept\n", "tiny runs on while tiny2 stops");
    let status = h.ok(&["status"]);
    assert!(status.contains("disk slots 1 in use"), "{status}");

    // A VM restart: the files are still there.
    h.ok(&["shutdown"]);
    assert_eq!(h.sh("tiny2", "cat /kept.txt"), "two\n");

    // Mistakes, each named with its fix, losing nothing.
    let fails = |args: &[&str], want: &str| h.fails(args, want);
    let garbage = scratch.path("garbage.img");
    std::fs::write(&garbage, vec![0x5au8; 4 << 20]).unwrap();
    fails(&["distro", "import", "--vhd", "bad", &garbage.display().to_string()], "damaged or not an ext4");
    fails(&["distro", "import", "--vhd", "tiny", &out.display().to_string()], "exists already");
    fails(
        &["distro", "export", "--vhd", "tiny2", &scratch.path("t.img").display().to_string()],
        "hearth terminate tiny2",
    );
    assert!(!disks.join("bad.img").exists(), "a refused import leaves no image behind");

    // A tar export of a disk-backed distro, imported as a snapshot-backed one.
    h.ok(&["terminate", "tiny2"]);
    let tar = scratch.path("tiny2.tar");
    h.ok(&["distro", "export", "tiny2", &tar.display().to_string()]);
    h.ok(&["distro", "import", "--snapshot", "tiny3", &tar.display().to_string()]);
    assert_eq!(h.sh("tiny3", "cat /kept.txt /hello.txt"), "two\nfrom the image\n");

    h.ok(&["distro", "unregister", "tiny2"]);
    assert!(!disks.join("tiny2.img").exists(), "unregister removes the distro's image");
    assert_eq!(h.sh("tiny", "cat /hello.txt"), "from the image\n");
}

/// Debian installed on a disk image of its own (`install --disk`): systemd
/// boots from it, and Docker inside keeps its images and containers on
/// overlay2 (which virtio-fs cannot carry: on a snapshot-backed distro
/// Docker falls back to vfs).
#[test]
fn a_debian_distro_on_its_own_disk_runs_docker_on_overlay2() {
    let env = Env::get();
    let scratch = Scratch::new("distro-disk-docker");
    let c = Containerd::start(&env, &scratch, 30);
    let h = Hearth::new(&env, &scratch, &c, 1024);
    let include = DISTRO_INCLUDE.join(",");
    let out = h.ok(&["distro", "install", "debian", "--include", &include, "--disk", "--disk-size", "16"]);
    assert!(out.contains("debian installed (Debian GNU/Linux 12 (bookworm))"), "{out}");
    let image = scratch.path("disks").join("debian.img");
    assert!(image.is_file(), "the distro's image is in disk_images_dir");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&image).unwrap();
    assert_eq!(meta.len(), 16 << 30, "the image's size is --disk-size");
    assert!(meta.blocks() * 512 < 2 << 30, "the image is sparse: {} bytes allocated", meta.blocks() * 512);

    wait_for_systemd(&h, "debian");
    let root = h.sh("debian", "findmnt -no SOURCE,FSTYPE /");
    assert!(root.starts_with("/dev/vd") && root.trim_end().ends_with("ext4"), "{root}");
    let rootfs = scratch.path("busybox-rootfs");
    hearth_e2e::agent::busybox_rootfs(&rootfs, &env.guest_tool).unwrap();
    hearth_e2e::host(
        std::process::Command::new("tar").arg("-C").arg(&rootfs).arg("-cf").arg(h.share.join("busybox.tar")).arg("."),
    );
    let docker = h.sh(
        "debian",
        "systemctl is-active docker && docker info -f '{{.Driver}}' && \
         docker import /mnt/host/busybox.tar hearth/busybox >/dev/null && \
         docker run --rm hearth/busybox sh -c 'echo hello from docker on $(grep \" / \" /proc/mounts | cut -d\" \" -f3)'",
    );
    assert_eq!(docker, "active\noverlay2\nhello from docker on overlay\n", "{docker}");
    h.ok(&["distro", "unregister", "debian"]);
    assert!(!image.exists(), "unregister removes the image");
}
