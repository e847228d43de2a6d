//! e2e suite `distro`: the `hearth` CLI keeps a whole Debian with systemd
//! as a long-lived container in the utility VM, through Debian's containerd
//! and the hearth runtime, as a user would: install, systemd running,
//! journald, Docker-class workloads (dockerd and `docker run`, a FUSE mount,
//! overlayfs, nested namespaces, a delegated cgroup), the host directory
//! shared in, stdio and exit statuses, state kept across terminate and a VM
//! restart, export and import under another name, status, set-default, and
//! a shutdown that leaves nothing behind.

use std::time::Duration;

use hearth_e2e::containerd::{pids_matching, Containerd};
use hearth_e2e::distro::{text, wait_for_systemd, Hearth, DISTRO_INCLUDE};
use hearth_e2e::{Env, Scratch};

fn no_vm_left(h: &Hearth, c: &Containerd) {
    let vmms = pids_matching(&h.vm_state.display().to_string(), "hearth-vmm");
    assert!(vmms.is_empty(), "hearth-vmm still running: {vmms:?}");
    let fsd = pids_matching(&h.vm_state.display().to_string(), "virtiofsd");
    assert!(fsd.is_empty(), "virtiofsd still running: {fsd:?}");
    hearth_e2e::containerd::wait_until("the distros' shim gone", Duration::from_secs(60), || {
        pids_matching("containerd-shim-hearth-v2", &c.socket.display().to_string()).is_empty()
    });
    let vms: Vec<_> = std::fs::read_dir(&h.vm_state).into_iter().flatten().flatten().map(|e| e.path()).collect();
    assert!(vms.is_empty(), "VM state left behind: {vms:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let ours: Vec<&str> = mounts.lines().filter(|l| l.contains(&h.vm_state.display().to_string())).collect();
    assert!(ours.is_empty(), "mounts left behind: {ours:?}");
}

#[test]
fn a_debian_distro_through_its_life() {
    let env = Env::get();
    let scratch = Scratch::new("distro");
    let c = Containerd::start(&env, &scratch, 30);
    let h = Hearth::new(&env, &scratch, &c, 1024);

    // Install: the tree setup built (systemd, Docker, FUSE) from the cache,
    // written to a disk image of its own (the default) and registered; the
    // first distro is the default.
    let include = DISTRO_INCLUDE.join(",");
    let out = h.ok(&["distro", "install", "debian", "--include", &include]);
    assert!(out.contains("debian installed (Debian GNU/Linux 12 (bookworm))"), "{out}");
    let disk = scratch.path("disks").join("debian.img");
    assert!(disk.is_file(), "no disk image for the distro at {}", disk.display());
    let list = h.ok(&["list"]);
    assert!(list.lines().any(|l| l.starts_with("* debian") && l.contains("Stopped")), "{list}");

    // First use boots the VM and systemd; systemd reaches `running`.
    let uname = h.ok(&["-d", "debian", "--", "uname", "-r"]);
    assert_eq!(uname.trim(), env.kernel_release, "the distro runs on the tuned kernel");
    wait_for_systemd(&h, "debian");
    let pid1 = h.sh("debian", "cat /proc/1/comm; systemd-detect-virt --container");
    assert_eq!(pid1, "systemd\ncontainer-other\n");
    let list = h.ok(&["list", "-v"]);
    assert!(
        list.lines().any(|l| l.contains("debian") && l.contains("Running") && l.contains("hearth-vmm pid")),
        "{list}"
    );

    // journald works: a line logged is read back from the journal.
    let journal = h.sh(
        "debian",
        "logger -t hearth-e2e journal-marker-42; for i in $(seq 60); do \
         journalctl -t hearth-e2e -o cat --no-pager | grep -q journal-marker-42 && break; sleep 1; done; \
         journalctl -t hearth-e2e -o cat --no-pager",
    );
    assert!(journal.contains("journal-marker-42"), "{journal}");

    // Exit statuses, stdin, stdout and stderr pass through.
    let o = h.run_with(
        &["-d", "debian", "--", "sh", "-c", "cat; echo to-stderr >&2; exit 7"],
        b"from-stdin\n",
        Duration::from_secs(600),
    );
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "from-stdin\n");
    assert!(String::from_utf8_lossy(&o.stderr).contains("to-stderr"), "{}", text(&o));
    // A login shell (su -l) reads its commands from stdin without a terminal.
    let o = h.run_with(&["-d", "debian"], b"echo login-$((6*7)) $HOME $0\n", Duration::from_secs(600));
    assert!(String::from_utf8_lossy(&o.stdout).contains("login-42 /root -bash"), "{}", text(&o));
    // With a terminal: a PTY with the terminal's size.
    let o = std::process::Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "stty rows 40 cols 100; HEARTH_CLI_CONFIG={} XDG_CONFIG_HOME={} {} -d debian -- sh -c 'stty size; tty'",
            h.config.display(),
            h.user_config_home.display(),
            h.bin.display()
        ))
        .arg("/dev/null")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let tty = String::from_utf8_lossy(&o.stdout);
    assert!(tty.contains("40 100") && tty.contains("/dev/pts/"), "tty: {tty}");

    // The host directory is shared in at /mnt/host, both ways; hearth
    // started in a directory under it starts there in the distro.
    std::fs::create_dir_all(h.share.join("project")).unwrap();
    std::fs::write(h.share.join("project/from-host.txt"), "host-bytes\n").unwrap();
    let o = h.run_in(
        &["-d", "debian", "--", "sh", "-c", "pwd; cat from-host.txt; echo distro-bytes > from-distro.txt"],
        b"",
        Duration::from_secs(600),
        Some(&h.share.join("project")),
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "/mnt/host/project\nhost-bytes\n", "{}", text(&o));
    assert_eq!(std::fs::read_to_string(h.share.join("project/from-distro.txt")).unwrap(), "distro-bytes\n");

    // Docker in the utility VM: dockerd (started by systemd) runs a locally
    // built busybox image, imported from the shared directory.
    let rootfs = scratch.path("busybox-rootfs");
    hearth_e2e::agent::busybox_rootfs(&rootfs, &env.guest_tool).unwrap();
    hearth_e2e::host(
        std::process::Command::new("tar").arg("-C").arg(&rootfs).arg("-cf").arg(h.share.join("busybox.tar")).arg("."),
    );
    let docker = h.sh(
        "debian",
        "systemctl is-active docker && docker import /mnt/host/busybox.tar hearth/busybox >/dev/null && \
         docker run --rm hearth/busybox sh -c 'echo hello from docker in $(uname -r); cat /proc/1/cgroup; echo $(ls /sys/class/net)' && \
         docker run --rm --network none hearth/busybox sh -c 'echo $(ls /sys/class/net)'",
    );
    let lines: Vec<&str> = docker.lines().collect();
    assert_eq!(lines.len(), 5, "{docker}");
    assert_eq!(lines[0], "active");
    assert_eq!(lines[1], format!("hello from docker in {}", env.kernel_release));
    assert_eq!(lines[2], "0::/", "a docker container in a cgroup (namespace) of its own");
    assert!(lines[3].split(' ').any(|i| i == "eth0"), "bridged: an eth0 on docker0: {docker}");
    assert!(lines[4].split(' ').any(|i| i == "lo") && !lines[4].contains("eth0"), "--network none: {docker}");

    // FUSE: fuse2fs mounts an ext4 image; its file reads back.
    let fuse = h.sh(
        "debian",
        "set -e; rm -rf /run/fsrc; mkdir -p /run/fsrc /mnt/fuse; echo fuse-bytes > /run/fsrc/hello; \
         mke2fs -q -t ext4 -d /run/fsrc /run/fuse.img 8M >/dev/null; fuse2fs -o ro,fakeroot /run/fuse.img /mnt/fuse; \
         cat /mnt/fuse/hello; grep -c ' /mnt/fuse fuse' /proc/mounts; umount /mnt/fuse",
    );
    assert_eq!(fuse, "fuse-bytes\n1\n");

    // The VM's network, which the distro shares (docs/networking.md): an
    // address on the VM's subnet and the host's resolvers, written by hearth.
    let net = h.sh(
        "debian",
        "head -n 1 /etc/resolv.conf; getent hosts deb.debian.org >/dev/null && echo resolved; \
         ip -4 -o addr show eth0 | awk '{print $4}'",
    );
    let net: Vec<&str> = net.lines().collect();
    assert_eq!(net.len(), 3, "{net:?}");
    assert!(net[0].starts_with("# Written by hearth"), "the distro's resolv.conf: {net:?}");
    assert_eq!(net[1], "resolved", "{net:?}");
    assert!(net[2].starts_with("10.89.0."), "the VM's address: {net:?}");

    // overlayfs, with a lower layer on the distro's own root filesystem.
    let overlay = h.sh(
        "debian",
        "set -e; mkdir -p /run/ov/u /run/ov/w /run/ov/m; \
         mount -t overlay ov -o lowerdir=/usr/lib,upperdir=/run/ov/u,workdir=/run/ov/w /run/ov/m; \
         echo new > /run/ov/m/added; grep -c ^VERSION_CODENAME=bookworm /run/ov/m/os-release; ls /run/ov/u; umount /run/ov/m",
    );
    assert_eq!(overlay, "1\nadded\n");

    // Nested namespaces: user, pid and mount, with its own /proc.
    let nested = h.sh(
        "debian",
        "unshare --user --map-root-user --pid --mount --fork --mount-proc \
         sh -c 'echo pid=$$ uid=$(id -u) init=$(cat /proc/1/comm) systemd=$(cat /proc/[0-9]*/comm 2>/dev/null | grep -c ^systemd$)'",
    );
    // Its /proc shows only its own processes: not the distro's systemd.
    assert_eq!(nested, "pid=1 uid=0 init=sh systemd=0\n");

    // A delegated cgroup: systemd limits a unit, and a sub-cgroup made by
    // hand enforces its memory limit (an OOM kill) and pids limit.
    let unit = h.sh(
        "debian",
        "systemd-run --quiet --wait --pipe -p MemoryMax=32M -p TasksMax=16 \
         sh -c 'cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max'",
    );
    assert_eq!(unit, "33554432\n");
    let cg = h.sh(
        "debian",
        "cg=/sys/fs/cgroup/hearth-e2e; top=/sys/fs/cgroup/cgroup.subtree_control; \
         for c in memory pids; do grep -qw $c $top || echo +$c > $top; done; mkdir -p $cg; echo 33554432 > $cg/memory.max; echo 4 > $cg/pids.max; \
         sh -c \"echo \\$\\$ > $cg/cgroup.procs; exec tail /dev/zero\"; echo tail=$?; \
         grep oom_kill $cg/memory.events | head -1; \
         sh -c \"echo \\$\\$ > $cg/cgroup.procs; for i in 1 2 3 4 5 6; do sleep 5 & done\" 2>/dev/null; \
         echo $(cat $cg/pids.current) $(grep -c '^max [1-9]' $cg/pids.events); \
         for i in $(seq 60); do rmdir $cg 2>/dev/null && break; sleep 1; done",
    );
    // The memory limit: tail's endless line is killed by the OOM killer.
    assert!(cg.starts_with("tail=137\noom_kill 1\n"), "{cg}");
    // The pids limit: of six background sleeps, at most 4 tasks at once
    // (the shell among them), and the limit was hit (pids.events max > 0).
    let pids: Vec<u32> = cg.lines().nth(2).unwrap_or("").split(' ').filter_map(|n| n.parse().ok()).collect();
    assert!(matches!(pids[..], [n, 1] if n <= 4), "pids.max 4 held and hit: {cg}");

    // State survives terminate and a VM restart.
    h.sh("debian", "echo kept-across-restarts > /root/state; sync");
    let boot_before = h.sh("debian", "cat /proc/sys/kernel/random/boot_id");
    assert_eq!(h.ok(&["terminate", "debian"]), "debian: terminated\n");
    assert!(h.ok(&["list"]).lines().any(|l| l.contains("debian") && l.contains("Stopped")));
    let out = h.ok(&["shutdown"]);
    assert!(out.contains("the utility VM is off"), "{out}");
    no_vm_left(&h, &c);
    assert!(h.ok(&["status"]).contains("utility VM: not running"));
    assert_eq!(h.sh("debian", "cat /root/state"), "kept-across-restarts\n");
    let boot_after = h.sh("debian", "cat /proc/sys/kernel/random/boot_id");
    assert_ne!(boot_before, boot_after, "the VM booted again");

    // Status: the VM's uptime, memory, kernel and containers.
    let status = h.ok(&["status"]);
    assert!(status.contains("utility VM: running"), "{status}");
    assert!(status.contains(&format!("kernel:     {}", env.kernel_release)), "{status}");
    assert!(
        status.contains("memory:") && status.contains("debian") && status.contains("distros running: debian"),
        "{status}"
    );
    assert!(status.contains("network:    10.89.0."), "{status}");
    // hearth-vmm's own view, through its control socket: the distro's disk.
    assert!(status.contains("vmm:        running, disk slots 1 in use of 4"), "{status}");

    // Export (refused while running), import under another name: the same files.
    let tar = scratch.path("debian.tar");
    let o = h.run(&["distro", "export", "debian", &tar.display().to_string()]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("hearth terminate debian"),
        "{}",
        text(&o)
    );
    h.ok(&["terminate", "debian"]);
    h.ok(&["distro", "export", "debian", &tar.display().to_string()]);
    let out = h.ok(&["distro", "import", "debian2", &tar.display().to_string()]);
    assert!(out.contains("debian2 imported (Debian GNU/Linux 12 (bookworm))"), "{out}");
    assert_eq!(h.sh("debian2", "cat /root/state; hostname"), "kept-across-restarts\ndebian2\n");

    // set-default: per user, and what `hearth` without -d runs in.
    let out = h.ok(&["set-default", "debian2"]);
    assert!(out.contains("debian2 is now the default"), "{out}");
    let user_file = std::fs::read_to_string(h.user_config_home.join("hearth/cli.toml")).unwrap();
    assert!(user_file.contains("default_distro = \"debian2\""), "{user_file}");
    assert_eq!(h.ok(&["--", "hostname"]), "debian2\n");
    assert!(h.ok(&["list"]).lines().any(|l| l.starts_with("* debian2")));

    // Shutdown stops every distro and the VM, and leaves nothing behind.
    let out = h.ok(&["shutdown"]);
    assert!(out.contains("stopped: debian2") && out.contains("the utility VM is off"), "{out}");
    no_vm_left(&h, &c);
    let fifos: Vec<_> =
        std::fs::read_dir("/run/hearth/cli").into_iter().flatten().flatten().map(|e| e.path()).collect();
    assert!(fifos.is_empty(), "FIFOs left behind: {fifos:?}");
    let tasks = c.ok(&["-n", "hearth", "tasks", "ls", "-q"]);
    assert!(tasks.trim().is_empty(), "tasks left: {tasks}");

    // Unregister removes a distro and its files.
    h.ok(&["distro", "unregister", "debian2"]);
    let list = h.ok(&["list"]);
    assert!(!list.contains("debian2") && list.contains("debian"), "{list}");
    assert!(!scratch.path("disks").join("debian2.img").exists(), "debian2's disk image is left");
}

#[test]
fn mistakes_are_named_with_their_fix() {
    let env = Env::get();
    let scratch = Scratch::new("distro-errors");
    let c = Containerd::start(&env, &scratch, 30);
    let h = Hearth::new(&env, &scratch, &c, 512);
    let fails = |args: &[&str], want: &str| h.fails(args, want);
    fails(&["-d", "nosuch", "--", "true"], "install one with `hearth distro install debian`");
    fails(&["--", "true"], "no distro is installed");
    fails(&["distro", "install", "fedora"], "no recipe \"fedora\"");
    fails(&["distro", "install", "debian", "--name", "no/slash"], "is not a valid distro name");
    std::fs::write(scratch.path("not-a.tar"), vec![b'x'; 4096]).unwrap();
    fails(&["distro", "import", "x", &scratch.path("not-a.tar").display().to_string()], "root filesystem tar");
    fails(&["distro", "import", "x", "/nonexistent.tar"], "is not a file");
    fails(&["--address", "/nonexistent.sock", "list"], "is containerd running?");
    // A config with a typo names the file and the key.
    std::fs::write(&h.config, "defualt_distro = \"x\"\n").unwrap();
    fails(&["list"], "defualt_distro");
    fails(&["list"], &h.config.display().to_string());
}
