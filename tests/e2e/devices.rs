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

/// Serves `conns` echo connections on a Unix listener (the host end of
/// guest-initiated vsock connections).
fn unix_echo_server(listener: std::os::unix::net::UnixListener, conns: usize) -> std::thread::JoinHandle<u64> {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let mut threads = Vec::new();
        for _ in 0..conns {
            let (mut s, _) = listener.accept().expect("accepting a guest connection");
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0u64;
                loop {
                    let n = s.read(&mut buf).expect("reading from the guest");
                    if n == 0 {
                        break;
                    }
                    s.write_all(&buf[..n]).expect("echoing to the guest");
                    total += n as u64;
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
                total
            }));
        }
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    })
}

/// Connects to the VM's vsock socket and asks for guest port `port`,
/// retrying while the guest's listener is not up yet (the guest answers RST,
/// and the socket is closed without an OK). None if the VM ended first.
fn vsock_connect(
    socket: &std::path::Path,
    port: u32,
    vm: &std::thread::JoinHandle<hearth_e2e::Finished>,
) -> Option<std::os::unix::net::UnixStream> {
    use std::io::{BufRead, Write};
    while !vm.is_finished() {
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) {
            s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
            let mut line = String::new();
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            if r.read_line(&mut line).is_ok() && line.starts_with("OK ") {
                assert!(r.buffer().is_empty(), "no data may follow the OK line before we send");
                return Some(s);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    None
}

#[test]
fn vsock_echo_both_ways_with_16_connections_and_64_mib_each_way() {
    use std::io::{Read, Write};
    const CONNS: usize = 16;
    const BYTES: usize = 4 << 20; // 16 x 4 MiB = 64 MiB each way
    let env = Env::get();
    let scratch = Scratch::new("vsock");
    let socket = scratch.path("v.sock");
    // Guest-initiated connections to host port 6000 land here.
    let listener = std::os::unix::net::UnixListener::bind(format!("{}_6000", socket.display())).unwrap();
    let served = unix_echo_server(listener, CONNS);

    let script = format!(
        r#"
./hearth-guest-tool vsock-echo-server 5000 {CONNS} > server.out 2>&1 &
server=$!
./hearth-guest-tool vsock-echo-client 2 6000 {CONNS} {BYTES} || exit 1
wait $server || {{ cat server.out; exit 1; }}
cat server.out
"#
    );
    let mut run = GuestRun::new(&env, &script);
    run.files.push(("hearth-guest-tool".into(), std::fs::read(&env.guest_tool).unwrap()));
    run.extra_args = vec!["--vsock".into(), format!("cid=3,socket={}", socket.display())];
    let mut cmd = run.command(&scratch);
    let vm = std::thread::spawn(move || hearth_e2e::run(&mut cmd, std::time::Duration::from_secs(900)));

    // Host-initiated: 16 concurrent connections to the guest's echo server.
    let mut clients = Vec::new();
    for i in 0..CONNS {
        let Some(s) = vsock_connect(&socket, 5000, &vm) else {
            let f = vm.join().unwrap();
            panic!("the VM ended before its vsock echo server accepted:\n{}", f.describe());
        };
        clients.push(std::thread::spawn(move || {
            let data = pseudo_random(BYTES, 100 + i as u64);
            let mut w = s.try_clone().unwrap();
            let sent = data.clone();
            let writer = std::thread::spawn(move || {
                w.write_all(&sent).unwrap();
                w.shutdown(std::net::Shutdown::Write).unwrap();
            });
            let mut back = Vec::new();
            (&s).read_to_end(&mut back).unwrap();
            writer.join().unwrap();
            (sha256(&data), sha256(&back), back.len())
        }));
    }
    for (i, c) in clients.into_iter().enumerate() {
        let (sent, back, len) = c.join().unwrap();
        assert_eq!(len, BYTES, "connection {i}: echo length");
        assert_eq!(sent, back, "connection {i}: echo checksum");
    }

    let f = vm.join().unwrap();
    assert!(!f.killed, "the VM hung:\n{}", f.describe());
    assert_eq!(f.status.code(), Some(0), "{}", f.describe());
    assert_eq!(f.fact("RUN-EXIT"), "0", "{}", f.describe());
    assert_eq!(f.fact("VSOCK-ECHOED"), format!("{CONNS}x{BYTES}"), "guest-initiated echo");
    assert_eq!(f.fact("VSOCK-SERVED"), CONNS.to_string());
    assert_eq!(served.join().unwrap(), (CONNS * BYTES) as u64, "bytes the host echoed");
    assert!(!socket.exists(), "the VMM removes its vsock socket when it ends");
}

/// Sets a file's mode, owner and mtime (seconds since the epoch).
fn set_meta(path: &std::path::Path, mode: u32, uid: u32, gid: u32, mtime: u64) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
    std::fs::File::options().write(true).open(path).unwrap().set_modified(t).unwrap();
}

#[test]
fn fs_host_and_guest_see_each_others_files_with_modes_owners_and_mtimes() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::get();
    let scratch = Scratch::new("virtiofs");
    let share = scratch.path("share");
    std::fs::create_dir_all(share.join("sub/dir")).unwrap();
    std::fs::write(share.join("hello.txt"), "hello from the host\n").unwrap();
    set_meta(&share.join("hello.txt"), 0o640, 1234, 5678, 981_173_106);
    std::fs::write(share.join("sub/dir/deep.bin"), pseudo_random(1 << 20, 5)).unwrap();
    set_meta(&share.join("sub/dir/deep.bin"), 0o755, 0, 0, 1_234_567_890);

    let script = r#"
set -e
mkdir -p /mnt/share
mount -t virtiofs hostshare /mnt/share
cd /mnt/share
echo "HEARTH-HELLO: $(cat hello.txt)"
echo "HEARTH-HELLO-STAT: $(stat -c '%a %u %g %Y %s' hello.txt)"
echo "HEARTH-DEEP-STAT: $(stat -c '%a %u %g %Y %s' sub/dir/deep.bin)"
echo "HEARTH-DEEP-SHA256: $(sha256sum sub/dir/deep.bin | cut -d' ' -f1)"
echo "written by the guest" > guest.txt
chmod 604 guest.txt
chown 4321:8765 guest.txt
touch -t 201707140240.00 guest.txt
mkdir -p guestdir
dd if=/dev/urandom of=guestdir/blob bs=64k count=16 2>/dev/null
echo "HEARTH-BLOB-SHA256: $(sha256sum guestdir/blob | cut -d' ' -f1)"
cd /
umount /mnt/share
"#;
    let mut run = GuestRun::new(&env, script);
    run.extra_args = vec!["--fs".into(), format!("tag=hostshare,dir={}", share.display())];
    let f = run.run(&scratch);

    // Host to guest: content, mode, owner, mtime and size as the host set them.
    assert_eq!(f.fact("HELLO"), "hello from the host");
    assert_eq!(f.fact("HELLO-STAT"), "640 1234 5678 981173106 20");
    assert_eq!(f.fact("DEEP-STAT"), format!("755 0 0 1234567890 {}", 1 << 20));
    assert_eq!(f.fact("DEEP-SHA256"), sha256(&std::fs::read(share.join("sub/dir/deep.bin")).unwrap()));
    // Guest to host, read after the VM ended.
    let guest_txt = share.join("guest.txt");
    assert_eq!(std::fs::read_to_string(&guest_txt).unwrap(), "written by the guest\n");
    let m = std::fs::metadata(&guest_txt).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o604, "mode set in the guest");
    assert_eq!((m.uid(), m.gid()), (4321, 8765), "owner set in the guest");
    assert_eq!(m.mtime(), 1_500_000_000, "mtime set in the guest (2017-07-14 02:40:00 UTC)");
    assert_eq!(sha256(&std::fs::read(share.join("guestdir/blob")).unwrap()), f.fact("BLOB-SHA256"));
}

#[test]
fn fs_missing_shared_directory_is_a_clear_error() {
    let env = Env::get();
    let f = hearth_e2e::run(
        Command::new(&env.vmm).arg("--kernel").arg(&env.vmlinux).args(["--fs", "tag=x,dir=/nonexistent/share"]),
        std::time::Duration::from_secs(120),
    );
    assert_eq!(f.status.code(), Some(1), "{}", f.describe());
    assert!(f.stderr.contains("/nonexistent/share does not exist"), "{}", f.describe());
}

#[test]
fn net_guest_pings_the_host_and_moves_8_mib_each_way_over_tcp() {
    use std::io::{Read, Write};
    const BYTES: usize = 8 << 20;
    let env = Env::get();
    let scratch = Scratch::new("net");
    // Addresses of the test's own network, inside the test host only.
    let _tap = hearth_e2e::TapDevice::new("hearthe2e0", "172.31.0.1/24");
    let to_guest = pseudo_random(BYTES, 11);
    let to_guest_sum = sha256(&to_guest);

    // Port 5000: receive exactly BYTES from the guest. Port 5001: send BYTES.
    let rx_listener = std::net::TcpListener::bind("172.31.0.1:5000").unwrap();
    let tx_listener = std::net::TcpListener::bind("172.31.0.1:5001").unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = rx_listener.accept().unwrap();
        let mut got = vec![0u8; BYTES];
        s.read_exact(&mut got).unwrap();
        sha256(&got)
    });
    let sender = std::thread::spawn(move || {
        let (mut s, _) = tx_listener.accept().unwrap();
        s.write_all(&to_guest).unwrap();
    });

    let script = format!(
        r#"
set -e
ip link set eth0 up
ip addr add 172.31.0.2/24 dev eth0
echo "HEARTH-MAC: $(cat /sys/class/net/eth0/address)"
ping -c 3 -W 10 172.31.0.1 > ping.out && echo "HEARTH-PING: ok"
dd if=/dev/urandom of=out.bin bs=1M count={mib} 2>/dev/null
echo "HEARTH-SENT-SHA256: $(sha256sum out.bin | cut -d' ' -f1)"
nc 172.31.0.1 5000 < out.bin
nc 172.31.0.1 5001 > in.bin
echo "HEARTH-RECEIVED-BYTES: $(wc -c < in.bin)"
echo "HEARTH-RECEIVED-SHA256: $(sha256sum in.bin | cut -d' ' -f1)"
"#,
        mib = BYTES >> 20
    );
    let mut run = GuestRun::new(&env, &script);
    run.extra_args = vec!["--net".into(), "tap=hearthe2e0,mac=52:54:00:12:34:56".into()];
    let f = run.run(&scratch);

    assert_eq!(f.fact("MAC"), "52:54:00:12:34:56", "the MAC given on the command line");
    assert_eq!(f.fact("PING"), "ok", "{}", f.describe());
    assert_eq!(receiver.join().unwrap(), f.fact("SENT-SHA256"), "guest to host over TCP");
    sender.join().unwrap();
    assert_eq!(f.fact("RECEIVED-BYTES"), BYTES.to_string());
    assert_eq!(f.fact("RECEIVED-SHA256"), to_guest_sum, "host to guest over TCP");
}

/// What the balloon guest allocates, then frees.
const BALLOON_ALLOC_MIB: u64 = 150;
/// How long the guest idles after freeing. Page reporting runs 2 s after a
/// free and every 2 s while there is more to report: 150 MiB comes back
/// within about 2 s.
const BALLOON_SETTLE_SECS: u64 = 10;

/// Host memory of one balloon run, in MiB of the VMM's RSS (guest RAM is a
/// shared memfd, so RssShmem is most of it).
struct BalloonRss {
    idle: u64,
    allocated: u64,
    freed: u64,
    settled: u64,
    /// Seconds after the guest freed the memory until RSS was within 16 MiB
    /// of its final value, if it dropped at all.
    settle_secs: Option<u64>,
    features: String,
}

/// Boots a 256 MiB guest that fills a tmpfs with 150 MiB, frees them and
/// idles, sampling the VMM's RSS at each step the guest reports.
fn balloon_rss_run(env: &Env, balloon: bool) -> BalloonRss {
    let scratch = Scratch::new(if balloon { "balloon-on" } else { "balloon-off" });
    let script = format!(
        r#"
set -e
for d in /sys/bus/virtio/devices/*; do
    if [ "$(cat $d/device)" = "0x0005" ]; then echo "HEARTH-BALLOON-FEATURES: $(cat $d/features)"; fi
done
mkdir -p /mnt/big
mount -t tmpfs -o size=200m tmpfs /mnt/big
sleep 2
echo "HEARTH-IDLE: 1"
sleep 1
dd if=/dev/zero of=/mnt/big/fill bs=1M count={BALLOON_ALLOC_MIB} 2>/dev/null
echo "HEARTH-ALLOCATED: 1"
sleep 1
rm /mnt/big/fill
sync
echo 3 > /proc/sys/vm/drop_caches
echo "HEARTH-FREED: 1"
for i in $(seq 1 {BALLOON_SETTLE_SECS}); do sleep 1; echo "HEARTH-WAITED: $i"; done
echo "HEARTH-SETTLED: 1"
sleep 1
"#
    );
    let mut run = GuestRun::new(env, &script);
    if balloon {
        run.extra_args = vec!["--balloon".into()];
    }
    let mut samples: Vec<(String, u64)> = Vec::new();
    let f = hearth_e2e::run_streaming(&mut run.command(&scratch), std::time::Duration::from_secs(600), |pid, line| {
        if let Some(fact) = line.strip_prefix("HEARTH-") {
            if let Some(kib) = hearth_e2e::proc_status_kib(pid, "VmRSS") {
                samples.push((fact.to_string(), kib >> 10));
            }
        }
    });
    assert!(!f.killed, "the VM hung:\n{}", f.describe());
    assert_eq!(f.status.code(), Some(0), "{}", f.describe());
    assert_eq!(f.fact("RUN-EXIT"), "0", "{}", f.describe());
    let at = |fact: &str| {
        samples
            .iter()
            .find(|(f, _)| f.as_str() == fact)
            .map(|(_, mib)| *mib)
            .unwrap_or_else(|| panic!("no RSS sample when the guest said {fact:?}: {samples:?}\n{}", f.describe()))
    };
    let settled = at("SETTLED: 1");
    let waited: Vec<u64> = (1..=BALLOON_SETTLE_SECS).map(|i| at(&format!("WAITED: {i}"))).collect();
    let freed = at("FREED: 1");
    let settle_secs = (freed > settled + 16)
        .then(|| waited.iter().position(|mib| mib.abs_diff(settled) <= 16).map(|i| i as u64 + 1))
        .flatten();
    BalloonRss {
        idle: at("IDLE: 1"),
        allocated: at("ALLOCATED: 1"),
        freed,
        settled,
        settle_secs,
        features: f.facts().remove("BALLOON-FEATURES").unwrap_or_default(),
    }
}

#[test]
fn balloon_free_page_reporting_returns_freed_guest_memory_to_the_host() {
    const ALLOC_MIB: u64 = BALLOON_ALLOC_MIB;
    let env = Env::get();
    let on = balloon_rss_run(&env, true);
    let off = balloon_rss_run(&env, false);
    for (name, r) in [("balloon", &on), ("no balloon", &off)] {
        hearth_e2e::figure(&format!(
            "{name}: VMM RSS idle {} MiB, after the guest allocates {ALLOC_MIB} MiB {} MiB, \
             when it frees them {} MiB, {} s later {} MiB{}",
            r.idle,
            r.allocated,
            r.freed,
            BALLOON_SETTLE_SECS,
            r.settled,
            r.settle_secs.map_or(String::new(), |s| format!(" (most of it back within {s} s)")),
        ));
    }
    // The guest negotiated free page reporting (feature bit 5).
    assert_eq!(on.features.as_bytes().get(5), Some(&b'1'), "balloon features {:?}", on.features);
    assert!(off.features.is_empty(), "no balloon device without --balloon");
    for r in [&on, &off] {
        assert!(
            r.allocated >= r.idle + ALLOC_MIB * 2 / 3,
            "the host sees the guest's allocation: RSS {} MiB idle, {} MiB after",
            r.idle,
            r.allocated
        );
    }
    assert!(
        on.allocated.saturating_sub(on.settled) >= ALLOC_MIB / 2,
        "with the balloon, at least half of the {ALLOC_MIB} MiB the guest freed went back to the host: \
         {} MiB after allocating, {} MiB after freeing",
        on.allocated,
        on.settled
    );
    assert!(
        off.allocated.saturating_sub(off.settled) < ALLOC_MIB / 2,
        "without the balloon the guest's freed memory stays with the VMM: {} MiB, then {} MiB",
        off.allocated,
        off.settled
    );
}

#[test]
fn block_disks_attach_and_detach_while_the_vm_runs_through_the_control_socket() {
    use hearth_vmm::api::protocol::VmState;
    use hearth_vmm::api::Client;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    let env = Env::get();
    let scratch = Scratch::new("blk-hotplug");
    // alpha: read-write, with a file the guest checks; beta: read-only.
    let alpha_dir = scratch.path("alpha");
    std::fs::create_dir_all(&alpha_dir).unwrap();
    let alpha_payload = pseudo_random(1 << 20, 11);
    std::fs::write(alpha_dir.join("payload.bin"), &alpha_payload).unwrap();
    let alpha = scratch.path("alpha.img");
    ext4_image(&alpha_dir, &alpha, 64);
    let beta_dir = scratch.path("beta");
    std::fs::create_dir_all(&beta_dir).unwrap();
    let beta_payload = pseudo_random(256 << 10, 12);
    std::fs::write(beta_dir.join("payload.bin"), &beta_payload).unwrap();
    let beta = scratch.path("beta.img");
    ext4_image(&beta_dir, &beta, 16);
    let beta_before = std::fs::read(&beta).unwrap();
    // The VMM is jailed as the shim runs it: it cannot open these paths
    // itself, so the images travel as descriptors.
    let jail = scratch.path("jail");
    std::fs::create_dir_all(&jail).unwrap();
    // The VMM becomes nobody in it, as the shim runs it.
    std::os::unix::fs::chown(&jail, Some(65534), Some(65534)).unwrap();
    let api_path = jail.join("api.sock");

    let script = r#"
set -e
# The disk whose serial is $1, as /dev/vdX, once its capacity is seen.
wait_disk() {
    i=0
    while :; do
        for d in /sys/block/vd*; do
            if [ "$(cat $d/serial)" = "$1" ] && [ "$(cat $d/size)" != 0 ]; then
                echo /dev/${d##*/}
                return 0
            fi
        done
        i=$((i + 1))
        if [ $i -gt 300 ]; then echo "HEARTH-TIMEOUT: disk $1" >&2; return 1; fi
        sleep 1
    done
}
wait_empty() {
    i=0
    while [ "$(cat /sys/block/${1#/dev/}/size)" != 0 ]; do
        i=$((i + 1))
        if [ $i -gt 300 ]; then echo "HEARTH-TIMEOUT: $1 still has a disk"; return 1; fi
        sleep 1
    done
}
echo "HEARTH-EMPTY-SIZES: $(cat /sys/block/vdb/size) $(cat /sys/block/vdc/size)"
echo "HEARTH-STEP: attach-alpha"
a=$(wait_disk alpha)
mkdir -p /mnt/a /mnt/b
mount -t ext4 $a /mnt/a
echo "HEARTH-ALPHA-SHA256: $(sha256sum /mnt/a/payload.bin | cut -d' ' -f1)"
echo "written by the guest" > /mnt/a/guest.txt
dd if=/dev/urandom of=/mnt/a/big.bin bs=1M count=24 2>/dev/null
sync
echo "HEARTH-STEP: alpha-filled"
b=$(wait_disk beta)
mount -t ext4 -o ro $b /mnt/b
echo "HEARTH-BETA-SHA256: $(sha256sum /mnt/b/payload.bin | cut -d' ' -f1)"
rm /mnt/a/big.bin
sync
echo "HEARTH-FSTRIM: $(fstrim -v /mnt/a 2>&1)"
sync
echo "HEARTH-STEP: alpha-trimmed"
umount /mnt/a
echo "HEARTH-STEP: alpha-unmounted"
wait_empty $a
echo "HEARTH-ALPHA-GONE-SIZE: $(cat /sys/block/${a#/dev/}/size)"
echo "HEARTH-BETA-AFTER-SHA256: $(sha256sum /mnt/b/payload.bin | cut -d' ' -f1)"
if dd if=/dev/zero of=$b bs=4k count=1 oflag=direct 2>/dev/null; then
    echo "HEARTH-BETA-WRITE: succeeded"
else
    echo "HEARTH-BETA-WRITE: refused"
fi
umount /mnt/b
# Ticks until the host, which pauses and resumes the VM meanwhile, takes beta away.
n=0
while [ "$(cat /sys/block/${b#/dev/}/size)" != 0 ]; do
    n=$((n + 1))
    echo "HEARTH-TICK: $n"
    if [ $n -gt 300 ]; then echo "HEARTH-TIMEOUT: beta still attached"; exit 1; fi
    sleep 1
done
echo "HEARTH-BOTH-EMPTY: $(cat /sys/block/vdb/size) $(cat /sys/block/vdc/size)"
"#;
    let mut run = GuestRun::new(&env, script);
    run.extra_args = vec![
        "--disk-slots".into(),
        "2".into(),
        "--api-socket".into(),
        api_path.display().to_string(),
        "--jail".into(),
        jail.display().to_string(),
        "--uid".into(),
        "65534".into(),
        "--gid".into(),
        "65534".into(),
    ];
    let client = Client::new(&api_path);
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let check = {
        let failures = failures.clone();
        move |ok: bool, what: String| {
            if !ok {
                failures.lock().unwrap().push(what);
            }
        }
    };
    let ticks = Arc::new(AtomicUsize::new(0));
    let ticks_while_paused = Arc::new(Mutex::new(None::<usize>));
    let mut resumed_at_tick = None;
    let mut alloc_filled = 0;
    let mut alloc_trimmed = 0;
    let mut alpha_stats = None;
    let mut pauser = None;
    let f = hearth_e2e::run_streaming(&mut run.command(&scratch), Duration::from_secs(900), |_, line| {
        match line {
            "HEARTH-STEP: attach-alpha" => {
                let d = client.attach_disk_path(&alpha, "alpha", false);
                check(d.is_ok(), format!("attaching alpha: {d:?}"));
                // Refusals from the running VMM: the same image again, and
                // (once beta is in) a third disk with both slots full.
                let again = client.attach_disk_path(&alpha, "alpha2", true).map(|_| ()).unwrap_err().to_string();
                check(again.contains("never attached twice"), format!("second attach of alpha: {again}"));
            }
            "HEARTH-STEP: alpha-filled" => {
                alloc_filled = hearth_e2e::allocated_bytes(&alpha);
                let d = client.attach_disk_path(&beta, "beta", true);
                check(d.as_ref().is_ok_and(|d| d.read_only), format!("attaching beta: {d:?}"));
                let third = scratch.path("third.img");
                std::fs::write(&third, vec![0u8; 1 << 20]).unwrap();
                let full = client.attach_disk_path(&third, "third", false).map(|_| ()).unwrap_err().to_string();
                check(full.contains("--disk-slots"), format!("attach with no free slot: {full}"));
            }
            "HEARTH-STEP: alpha-trimmed" => alloc_trimmed = hearth_e2e::allocated_bytes(&alpha),
            "HEARTH-STEP: alpha-unmounted" => {
                let d = client.detach_disk("alpha");
                check(d.is_ok(), format!("detaching alpha: {d:?}"));
                alpha_stats = d.ok().map(|d| d.stats);
            }
            l if l.starts_with("HEARTH-TICK: ") => {
                let n = ticks.fetch_add(1, Ordering::SeqCst) + 1;
                if n == 1 {
                    // Pause from another thread, so that lines keep being
                    // read (and counted) while the VM is paused.
                    let (ticks, during, api) = (ticks.clone(), ticks_while_paused.clone(), Client::new(&api_path));
                    pauser = Some(std::thread::spawn(move || -> Result<(VmState, VmState), String> {
                        api.pause().map_err(|e| e.to_string())?;
                        let paused = api.info().map_err(|e| e.to_string())?.state;
                        // Lines already on their way may still arrive.
                        std::thread::sleep(Duration::from_millis(500));
                        let before = ticks.load(Ordering::SeqCst);
                        std::thread::sleep(Duration::from_secs(4));
                        *during.lock().unwrap() = Some(ticks.load(Ordering::SeqCst) - before);
                        api.resume().map_err(|e| e.to_string())?;
                        Ok((paused, api.info().map_err(|e| e.to_string())?.state))
                    }));
                } else if ticks_while_paused.lock().unwrap().is_some() && resumed_at_tick.is_none() {
                    resumed_at_tick = Some(n);
                    let d = client.detach_disk("beta");
                    check(d.is_ok(), format!("detaching beta: {d:?}"));
                }
            }
            _ => {}
        }
    });
    let pause = pauser.map(|t| t.join().unwrap());
    assert!(!f.killed, "the VM hung:\n{}", f.describe());
    assert_eq!(f.status.code(), Some(0), "{}", f.describe());
    assert_eq!(f.fact("RUN-EXIT"), "0", "the guest script failed:\n{}", f.describe());
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "{failures:#?}\n{}", f.describe());

    assert_eq!(f.fact("EMPTY-SIZES"), "0 0", "slots start empty");
    assert_eq!(f.fact("ALPHA-SHA256"), sha256(&alpha_payload), "the guest read the attached disk");
    assert_eq!(f.fact("BETA-SHA256"), sha256(&beta_payload));
    assert_eq!(f.fact("ALPHA-GONE-SIZE"), "0", "the guest saw alpha go");
    assert_eq!(f.fact("BETA-AFTER-SHA256"), sha256(&beta_payload), "beta kept working when alpha went");
    assert_eq!(f.fact("BETA-WRITE"), "refused", "a read-only attach refuses writes");
    assert_eq!(f.fact("BOTH-EMPTY"), "0 0");
    assert_eq!(std::fs::read(&beta).unwrap(), beta_before, "the read-only image is unchanged");
    assert_eq!(ext4_read(&alpha, "guest.txt"), b"written by the guest\n", "the guest's write reached the image");

    // Trim gave the deleted file's blocks back to the host.
    hearth_e2e::figure(&format!(
        "hot-attached 64 MiB ext4 image allocated on the host: {} KiB after writing 24 MiB, {} KiB after rm and fstrim",
        alloc_filled >> 10,
        alloc_trimmed >> 10
    ));
    assert!(alloc_filled > 24 << 20, "after writing 24 MiB the image holds {alloc_filled} bytes");
    assert!(
        alloc_trimmed + (16 << 20) < alloc_filled,
        "fstrim did not shrink the image: {alloc_filled} -> {alloc_trimmed} bytes allocated ({})",
        f.fact("FSTRIM")
    );
    let stats = alpha_stats.expect("alpha's counters");
    assert!(stats.written_bytes >= 24 << 20 && stats.discarded_bytes >= 16 << 20, "{stats:?}");
    assert!(stats.read_bytes >= 1 << 20 && stats.requests > 0 && stats.errors == 0, "{stats:?}");

    // Paused means no guest progress; resumed, it goes on.
    let (paused, resumed) = pause.expect("the VM was paused").unwrap();
    assert_eq!((paused, resumed), (VmState::Paused, VmState::Running));
    let during = ticks_while_paused.lock().unwrap().expect("ticks counted while paused");
    assert_eq!(during, 0, "the guest ticked {during} times in 4 s while paused");
    assert!(resumed_at_tick.is_some(), "the guest ticked again after resume");
    assert!(!api_path.exists(), "the control socket is removed when the VM ends");
}

/// NIC slots: a tap attached to a running VM through the control socket
/// brings the slot's link up, carries a ping and checksummed TCP both ways;
/// detached, the link goes down and nothing gets through; attached again
/// (under another id), it carries traffic again. The other slot stays down
/// throughout, and malformed requests get error replies while the VM runs on.
#[test]
fn net_nics_attach_and_detach_while_the_vm_runs_through_the_control_socket() {
    use hearth_vmm::api::protocol::VmState;
    use hearth_vmm::api::Client;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    const BYTES: usize = 4 << 20;

    let env = Env::get();
    let scratch = Scratch::new("net-hotplug");
    let _tap = hearth_e2e::TapDevice::new("hearthe2e1", "172.31.1.1/24");
    let jail = scratch.path("jail");
    std::fs::create_dir_all(&jail).unwrap();
    // The VMM becomes nobody in it, as the shim runs it.
    std::os::unix::fs::chown(&jail, Some(65534), Some(65534)).unwrap();
    let api_path = jail.join("api.sock");
    let to_guest = pseudo_random(BYTES, 21);
    let to_guest_sum = sha256(&to_guest);
    let rx_listener = std::net::TcpListener::bind("172.31.1.1:5100").unwrap();
    let tx_listener = std::net::TcpListener::bind("172.31.1.1:5101").unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = rx_listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        (got.len(), sha256(&got))
    });
    let sender = std::thread::spawn(move || {
        let (mut s, _) = tx_listener.accept().unwrap();
        s.write_all(&to_guest).unwrap();
    });

    let script = format!(
        r#"
set -e
state() {{ cat /sys/class/net/$1/operstate; }}
# Waits until $1's operstate is (or, with !, is no longer) $2.
wait_state() {{
    i=0
    while :; do
        s=$(state $1)
        if [ "$3" = "!" ]; then [ "$s" != "$2" ] && return 0; else [ "$s" = "$2" ] && return 0; fi
        i=$((i + 1))
        if [ $i -gt 600 ]; then echo "HEARTH-TIMEOUT: $1 is $s"; return 1; fi
        sleep 0.5
    done
}}
ip link set eth0 up
ip link set eth1 up
ip addr add 172.31.1.2/24 dev eth0
echo "HEARTH-MACS: $(cat /sys/class/net/eth0/address) $(cat /sys/class/net/eth1/address)"
echo "HEARTH-EMPTY-STATE: $(state eth0) $(state eth1)"
echo "HEARTH-STEP: attach"
wait_state eth0 up
ping -c 3 -W 10 172.31.1.1 > /dev/null && echo "HEARTH-PING: ok"
dd if=/dev/urandom of=out.bin bs=1M count={mib} 2>/dev/null
echo "HEARTH-SENT-SHA256: $(sha256sum out.bin | cut -d' ' -f1)"
nc 172.31.1.1 5100 < out.bin
nc 172.31.1.1 5101 > in.bin
echo "HEARTH-RECEIVED-SHA256: $(sha256sum in.bin | cut -d' ' -f1)"
echo "HEARTH-STEP: detach"
wait_state eth0 up !
echo "HEARTH-DETACHED-STATE: $(state eth0) $(state eth1)"
if ping -c 2 -W 2 172.31.1.1 > /dev/null 2>&1; then echo "HEARTH-PING-DETACHED: answered"; else echo "HEARTH-PING-DETACHED: no answer"; fi
echo "HEARTH-STEP: reattach"
wait_state eth0 up
ping -c 3 -W 10 172.31.1.1 > /dev/null && echo "HEARTH-PING-AGAIN: ok"
echo "HEARTH-FINAL-STATE: $(state eth0) $(state eth1)"
"#,
        mib = BYTES >> 20
    );
    let mut run = GuestRun::new(&env, &script);
    run.extra_args = vec![
        "--nic-slots".into(),
        "2".into(),
        "--api-socket".into(),
        api_path.display().to_string(),
        "--jail".into(),
        jail.display().to_string(),
        "--uid".into(),
        "65534".into(),
        "--gid".into(),
        "65534".into(),
    ];
    let client = Client::new(&api_path);
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let check = |ok: bool, what: String| {
        if !ok {
            failures.lock().unwrap().push(what);
        }
    };
    // A raw request line and its reply line.
    let raw = |line: &str| -> String {
        let mut s = std::os::unix::net::UnixStream::connect(&api_path).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).unwrap();
        reply
    };
    let mut detached = None;
    let mut info_after_garbage = None;
    let f = hearth_e2e::run_streaming(&mut run.command(&scratch), Duration::from_secs(900), |_, line| match line {
        "HEARTH-STEP: attach" => {
            let n = client.attach_nic_tap("hearthe2e1", "first");
            check(n.as_ref().is_ok_and(|n| n.index == 0 && n.link_up), format!("attaching the tap: {n:?}"));
            let again = client.attach_nic_tap("hearthe2e1", "first").map(|_| ()).unwrap_err().to_string();
            check(again.contains("busy") || again.contains("in use"), format!("the same tap twice: {again}"));
            let missing = client.detach_nic("nosuch").map(|_| ()).unwrap_err().to_string();
            check(missing.contains("no attached NIC"), format!("detaching an unknown NIC: {missing}"));
        }
        "HEARTH-STEP: detach" => {
            for garbage in ["not json\n", "{\"op\":\"attach-nic\"}\n", "{\"op\":\"detach-nic\",\"id\":1}\n"] {
                let reply = raw(garbage);
                check(reply.starts_with("{\"error\":"), format!("{garbage:?} got {reply:?}"));
            }
            info_after_garbage = client.info().ok();
            let n = client.detach_nic("first");
            check(n.is_ok(), format!("detaching: {n:?}"));
            detached = n.ok();
        }
        "HEARTH-STEP: reattach" => {
            let n = client.attach_nic_tap("hearthe2e1", "second");
            check(n.as_ref().is_ok_and(|n| n.index == 0), format!("attaching again: {n:?}"));
        }
        _ => {}
    });
    assert!(!f.killed, "the VM hung:\n{}", f.describe());
    assert_eq!(f.status.code(), Some(0), "{}", f.describe());
    assert_eq!(f.fact("RUN-EXIT"), "0", "the guest script failed:\n{}", f.describe());
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "{failures:#?}\n{}", f.describe());

    assert_eq!(f.fact("MACS"), "02:68:65:00:00:00 02:68:65:00:00:01", "each slot's MAC");
    let empty = f.fact("EMPTY-STATE");
    assert!(!empty.contains("up"), "empty slots have no carrier: {empty}");
    assert_eq!(f.fact("PING"), "ok", "{}", f.describe());
    let (got_len, got_sum) = receiver.join().unwrap();
    assert_eq!((got_len, got_sum), (BYTES, f.fact("SENT-SHA256")), "guest to host over the attached NIC");
    sender.join().unwrap();
    assert_eq!(f.fact("RECEIVED-SHA256"), to_guest_sum, "host to guest over the attached NIC");
    let gone = f.fact("DETACHED-STATE");
    assert!(!gone.contains("up"), "detached, the link is down: {gone}");
    assert_eq!(f.fact("PING-DETACHED"), "no answer", "nothing gets through a detached NIC");
    assert_eq!(f.fact("PING-AGAIN"), "ok", "the slot carries traffic again after a reattach");
    let last = f.fact("FINAL-STATE");
    assert!(last.starts_with("up ") && !last.ends_with(" up"), "only the attached slot is up: {last}");

    let info = info_after_garbage.expect("info after the malformed requests");
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.nics[0].id.as_deref(), Some("first"));
    let n = detached.expect("the detach reply");
    hearth_e2e::figure(&format!("hot-attached NIC counters at detach: {:?}", n.stats));
    assert!(n.stats.tx_bytes >= BYTES as u64 && n.stats.rx_bytes >= BYTES as u64, "{:?}", n.stats);
    assert_eq!(n.stats.rx_dropped, 0, "{:?}", n.stats);
}
