//! e2e suite `devices`: the virtio devices of hearth-vmm, driven by the real
//! guest kernel. The guest runs a script from an ext4 disk (the boot
//! initramfs's `hearth.run=`), and prints `HEARTH-<FACT>: value` lines.

use std::process::Command;

use hearth_e2e::{ext4_image, ext4_read, Env, GuestRun, Scratch};

fn sha256(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn block_guest_reads_host_files_and_host_reads_guest_files() {
    let env = Env::get();
    let scratch = Scratch::new("blk-rw");
    // A data disk the host fills with a file of known content.
    let data_dir = scratch.path("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let payload = pseudo_random(3 << 20, 7);
    std::fs::write(data_dir.join("payload.bin"), &payload).unwrap();
    let data_img = scratch.path("data.img");
    ext4_image(&data_dir, &data_img, 32);

    let script = r#"
set -e
mkdir -p /mnt/data
mount -t ext4 /dev/vdb /mnt/data
echo "HEARTH-PAYLOAD-SHA256: $(sha256sum /mnt/data/payload.bin | cut -d' ' -f1)"
dd if=/dev/urandom of=/mnt/data/guest.bin bs=64k count=40 2>/dev/null
echo "HEARTH-GUEST-SHA256: $(sha256sum /mnt/data/guest.bin | cut -d' ' -f1)"
echo "written by the guest" > /mnt/data/guest.txt
umount /mnt/data
sync
"#;
    let mut run = GuestRun::new(&env, script);
    run.disks.push(data_img.display().to_string());
    let f = run.run(&scratch);

    assert_eq!(f.fact("PAYLOAD-SHA256"), sha256(&payload), "the guest read the host's file");
    assert_eq!(ext4_read(&data_img, "guest.txt"), b"written by the guest\n");
    let guest_bin = ext4_read(&data_img, "guest.bin");
    assert_eq!(guest_bin.len(), 40 * 64 * 1024);
    assert_eq!(sha256(&guest_bin), f.fact("GUEST-SHA256"), "the host read the guest's file after the VM ended");
}

#[test]
fn block_read_only_disk_refuses_writes_and_disks_keep_their_order() {
    let env = Env::get();
    let scratch = Scratch::new("blk-ro");
    let ro = scratch.path("ro.img");
    std::fs::write(&ro, pseudo_random(4 << 20, 3)).unwrap();
    let before = std::fs::read(&ro).unwrap();
    let small = scratch.path("small.img");
    std::fs::write(&small, vec![0u8; 1 << 20]).unwrap();

    let script = r#"
echo "HEARTH-VDB-RO: $(cat /sys/block/vdb/ro)"
echo "HEARTH-VDB-SECTORS: $(cat /sys/block/vdb/size)"
echo "HEARTH-VDC-SECTORS: $(cat /sys/block/vdc/size)"
echo "HEARTH-VDB-SHA256: $(sha256sum /dev/vdb | cut -d' ' -f1)"
if dd if=/dev/zero of=/dev/vdb bs=4k count=1 oflag=direct 2>/dev/null; then
    echo "HEARTH-RO-WRITE: succeeded"
else
    echo "HEARTH-RO-WRITE: refused"
fi
exit 0
"#;
    let mut run = GuestRun::new(&env, script);
    run.disks.push(format!("{},ro", ro.display()));
    run.disks.push(small.display().to_string());
    let f = run.run(&scratch);

    assert_eq!(f.fact("VDB-RO"), "1");
    assert_eq!(f.fact("VDB-SECTORS"), (4 << 20 >> 9).to_string());
    assert_eq!(f.fact("VDC-SECTORS"), (1 << 20 >> 9).to_string());
    assert_eq!(f.fact("VDB-SHA256"), sha256(&before));
    assert_eq!(f.fact("RO-WRITE"), "refused");
    assert_eq!(std::fs::read(&ro).unwrap(), before, "the read-only image is unchanged");
}

#[test]
fn block_missing_disk_is_a_clear_error() {
    let env = Env::get();
    let f = hearth_e2e::run(
        Command::new(&env.vmm).arg("--kernel").arg(&env.vmlinux).args(["--disk", "/nonexistent/disk.img"]),
        std::time::Duration::from_secs(120),
    );
    assert_eq!(f.status.code(), Some(1), "{}", f.describe());
    assert!(f.stderr.contains("cannot open the disk /nonexistent/disk.img"), "{}", f.describe());
}
