//! e2e suite `containerd`: Debian's containerd and `ctr` run containers with
//! the runtime `io.containerd.hearth.v2`. The test starts its own containerd
//! (its root on a tmpfs, its socket in a scratch directory) with the shim on
//! its PATH and a hearth config naming the built VMM, kernel and initramfs,
//! imports the locally built busybox image, and drives everything through
//! `ctr`, as a user would.

use std::process::{Command, Stdio};
use std::time::Duration;

use hearth_e2e::containerd::{pids_matching, tail, text, wait_until, Containerd, IMAGE, RUNTIME};
use hearth_e2e::{Env, Scratch, DEBIAN_IMAGE};

#[test]
fn containers_through_containerd() {
    let env = Env::get();
    let scratch = Scratch::new("containerd");
    let c = Containerd::start(&env, &scratch, 10);
    assert!(c.ok(&["images", "ls", "-q"]).contains(IMAGE), "the image was not imported");

    // Output and exit code, through the VM booted on first use.
    let o = c.run("hello", &[], &["sh", "-c", "echo hello from $(uname -r); exit 3"]);
    assert_eq!(o.status.code(), Some(3), "{}\n--- containerd ---\n{}", text(&o), tail(&c.log_text(), 60));
    assert_eq!(String::from_utf8_lossy(&o.stdout), format!("hello from {}\n", env.kernel_release));
    // The VM idles out with the shim; the next container starts both again.
    // That shim outlives its first container, whose log FIFO containerd then
    // stops reading: it must keep serving (its log moves on, never blocks).
    c.ok(&["images", "import", &env.debian_image.display().to_string()]);
    wait_until("the first shim idled out", Duration::from_secs(120), || {
        pids_matching("containerd-shim-hearth-v2", &c.socket.display().to_string()).is_empty()
    });
    // A Debian image, built locally with mmdebstrap: its own userland (bash,
    // dpkg, apt).
    let o = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        DEBIAN_IMAGE,
        "debian",
        "bash",
        "-c",
        ". /etc/os-release; echo $ID $VERSION_CODENAME $(uname -r); dpkg-query -W -f='${Status}\\n' apt",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("debian bookworm {}\ninstall ok installed\n", env.kernel_release),
        "{}",
        text(&o)
    );
    // `ctr task kill`: the attached `ctr run` ends with 128 + the signal.
    let mut attached = Command::new("ctr")
        .arg("--address")
        .arg(&c.socket)
        .args(["run", "--rm", "--runtime", RUNTIME, IMAGE, "killed", "sleep", "1000"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("container killed running", Duration::from_secs(60), || running(&c, "killed"));
    c.ok(&["task", "kill", "-s", "SIGKILL", "killed"]);
    assert_eq!(hearth_e2e::wait_timeout(&mut attached, Duration::from_secs(60)), Some(137));

    // Two long-running containers: exec, one VM, isolation, stats, kill.
    c.ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, "one", "sleep", "1000"]);
    c.ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, "two", "sleep", "1000"]);
    let o = c.ctr(&["task", "exec", "--exec-id", "e1", "one", "sh", "-c", "echo exec-ok; exit 5"]);
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned()),
        (Some(5), "exec-ok\n".into()),
        "{}",
        text(&o)
    );
    let boot = |id: &str| c.ok(&["task", "exec", "--exec-id", "boot", id, "cat", "/proc/sys/kernel/random/boot_id"]);
    let (b1, b2) = (boot("one"), boot("two"));
    assert_eq!(b1, b2, "the two containers run in different VMs");
    assert_eq!(c.vmm_pids().len(), 1, "one utility VM for both");
    // containerd is told host pids only: the VMM's, which runs both
    // containers' processes (a guest pid would name some unrelated host
    // process to `docker top` or `ctr task ps`).
    let vmm = c.vmm_pids()[0].to_string();
    let ls = c.ok(&["task", "ls"]);
    for id in ["one", "two"] {
        assert!(
            ls.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == [id, &vmm, "RUNNING"]),
            "task ls does not give {id} the VMM's pid {vmm}:\n{ls}"
        );
    }
    let ps = c.ok(&["task", "ps", "one"]);
    let pids: Vec<&str> = ps.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(pids, [vmm.as_str()], "task ps: {ps}");
    c.ok(&["task", "exec", "--exec-id", "mark", "one", "touch", "/marker"]);
    // Each sees its own sleep only (pid namespace), and not the other's
    // files (mount namespace, own rootfs).
    let script = "ps -o comm | grep -c sleep; if test -e /marker; then echo shared; else echo private; fi";
    let ps = c.ok(&["task", "exec", "--exec-id", "ps", "two", "sh", "-c", script]);
    assert_eq!(ps, "1\nprivate\n", "container two sees the other's processes or files");
    let metrics = c.ok(&["task", "metrics", "one"]);
    assert!(metrics.contains("memory") && metrics.contains("pids"), "metrics: {metrics}");
    c.ok(&["task", "kill", "-s", "SIGKILL", "two"]);
    wait_until("container two stopped after SIGKILL", Duration::from_secs(60), || stopped(&c, "two"));
    c.ok(&["task", "rm", "two"]);
    c.ok(&["containers", "rm", "two"]);

    // A memory limit: the OOM kill is seen as an event and as 137.
    let mut events = Command::new("ctr")
        .arg("--address")
        .arg(&c.socket)
        .arg("events")
        .stdout(std::fs::File::create(scratch.path("events.log")).unwrap())
        .spawn()
        .unwrap();
    let o = c.run("oom", &["--memory-limit", "33554432"], &["hearth-guest-tool", "hog", "512"]);
    assert_eq!(o.status.code(), Some(137), "{}", text(&o));
    wait_until("the OOM event", Duration::from_secs(30), || {
        std::fs::read_to_string(scratch.path("events.log")).unwrap_or_default().contains("/tasks/oom")
    });
    let _ = events.kill();
    let _ = events.wait();

    // A terminal: ctr -t sends its size; the container sees it.
    let o = Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "stty rows 40 cols 100; ctr --address {} run -t --rm --runtime {RUNTIME} {IMAGE} tty stty size",
            c.socket.display()
        ))
        .arg("/dev/null")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("40 100"), "tty: {}", text(&o));

    // The VM crashing: the task exits, the shim keeps answering, the next
    // container boots a new VM.
    let vmm = c.vmm_pids();
    assert_eq!(vmm.len(), 1);
    // SAFETY: kill(2) on a pid we just found.
    unsafe { libc::kill(vmm[0], libc::SIGKILL) };
    wait_until("container one reported stopped after its VM died", Duration::from_secs(60), || stopped(&c, "one"));
    c.ok(&["task", "rm", "one"]);
    c.ok(&["containers", "rm", "one"]);
    wait_until("the crashed VM's virtiofsd ended", Duration::from_secs(30), || {
        pids_matching("virtiofsd", &c.vms.display().to_string()).is_empty()
    });
    let o = c.run("after-crash", &[], &["true"]);
    let shim_log: Vec<String> =
        c.log_text().lines().filter(|l| !l.contains("loading plugin")).map(String::from).collect();
    assert_eq!(o.status.code(), Some(0), "{}\n--- containerd ---\n{}", text(&o), tail(&shim_log.join("\n"), 80));

    // Idle: with no containers left the VM and the shim go away, leaving
    // nothing behind.
    wait_until("the VM shut down after the idle time", Duration::from_secs(120), || c.vmm_pids().is_empty());
    wait_until("the shim exited", Duration::from_secs(60), || {
        pids_matching("containerd-shim-hearth-v2", "").is_empty()
    });
    assert!(pids_matching("virtiofsd", &c.vms.display().to_string()).is_empty(), "virtiofsd left running");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let leftover: Vec<&str> = mounts.lines().filter(|l| l.contains(&*c.vms.display().to_string())).collect();
    assert!(leftover.is_empty(), "mounts left: {leftover:?}");
    let vm_dirs: Vec<_> =
        std::fs::read_dir(&c.vms).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(vm_dirs.is_empty(), "VM state left: {vm_dirs:?}");
}

/// Stdout and stderr of a finished `ctr` run in the background.
fn output_of(child: &mut std::process::Child) -> String {
    use std::io::Read;
    let mut s = String::new();
    for r in [
        child.stdout.take().map(|o| Box::new(o) as Box<dyn Read>),
        child.stderr.take().map(|e| Box::new(e) as Box<dyn Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut r = r;
        let _ = r.read_to_string(&mut s);
    }
    s
}

fn running(c: &Containerd, id: &str) -> bool {
    c.ok(&["task", "ls"]).lines().any(|l| l.starts_with(&format!("{id} ")) && l.contains("RUNNING"))
}

fn stopped(c: &Containerd, id: &str) -> bool {
    c.ok(&["task", "ls"]).lines().any(|l| l.starts_with(&format!("{id} ")) && l.contains("STOPPED"))
}

/// containerd restarting finds the shim and its containers again; an agent
/// that stops answering is declared dead and its tasks exit with a reason; a
/// broken configuration is refused by name.
#[test]
fn restart_dead_agent_and_bad_config() {
    let env = Env::get();
    let scratch = Scratch::new("containerd-faults");
    let mut c = Containerd::start_with(&env, &scratch, "idle_timeout_secs = 3\nagent_timeout_secs = 15\n");
    let address = c.socket.display().to_string();
    let shims = || pids_matching("containerd-shim-hearth-v2", &address);

    c.ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, "long", "sleep", "1000"]);
    let shim_before = shims();
    c.restart();
    wait_until("long running after containerd restarted", Duration::from_secs(60), || running(&c, "long"));
    let o = c.ctr(&["task", "exec", "--exec-id", "after-restart", "long", "echo", "still-here"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "still-here\n", "{}\n{}", text(&o), tail(&c.log_text(), 40));
    assert_eq!(shims(), shim_before, "the restarted containerd uses the same shim");

    // An attached container sees why it ended when the agent stops
    // answering (here: the whole VM frozen with SIGSTOP).
    let mut attached = Command::new("ctr")
        .arg("--address")
        .arg(&c.socket)
        .args(["run", "--rm", "--runtime", RUNTIME, IMAGE, "frozen", "sleep", "1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("frozen running", Duration::from_secs(60), || running(&c, "frozen"));
    let vmm = c.vmm_pids();
    assert_eq!(vmm.len(), 1);
    // SAFETY: kill(2) on the VMM we just found.
    unsafe { libc::kill(vmm[0], libc::SIGSTOP) };
    let code = hearth_e2e::wait_timeout(&mut attached, Duration::from_secs(180));
    let out = output_of(&mut attached);
    assert_eq!(code, Some(255), "{out}\n--- containerd ---\n{}", tail(&c.log_text(), 40));
    assert!(out.contains("did not answer a health check within 15 s"), "no reason given: {out:?}");
    wait_until("long stopped with its VM", Duration::from_secs(60), || stopped(&c, "long"));
    wait_until("the frozen VMM killed", Duration::from_secs(30), || c.vmm_pids().is_empty());
    c.ok(&["task", "rm", "long"]);
    c.ok(&["containers", "rm", "long"]);

    // A configuration with a mistake: the next shim refuses to boot from it
    // and names the file and the key.
    wait_until("the idle shim exited", Duration::from_secs(60), || shims().is_empty());
    let config = c.hearth_config_path().to_path_buf();
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{good}vcpu = 4\n")).unwrap();
    let o = c.run("bad-config", &[], &["true"]);
    assert!(!o.status.success(), "a container ran from a broken config");
    let err = text(&o);
    assert!(err.contains(&config.display().to_string()) && err.contains("vcpu"), "unclear error: {err}");
    assert!(c.vmm_pids().is_empty(), "a VM booted from a broken config");
    std::fs::write(&config, good).unwrap();
    wait_until("the refusing shim exited", Duration::from_secs(60), || shims().is_empty());
    let o = c.run("good-again", &[], &["echo", "fixed"]);
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned()),
        (Some(0), "fixed\n".into()),
        "{}",
        text(&o)
    );

    wait_until("the VM idled out", Duration::from_secs(120), || c.vmm_pids().is_empty());
    wait_until("the shim exited", Duration::from_secs(60), || shims().is_empty());
}

/// Per-pod mode (one VM per CRI sandbox, Kata style), chosen by a runtime
/// option's ConfigPath as the CRI or `ctr --runtime-config-path` send it.
#[test]
fn per_pod_vms_through_a_runtime_config_path() {
    let env = Env::get();
    let scratch = Scratch::new("containerd-pods");
    let c = Containerd::start(&env, &scratch, 3);
    let per_pod = scratch.path("per-pod.toml");
    std::fs::write(&per_pod, Containerd::hearth_config(&env, &c.vms, "mode = \"per-pod\"\nidle_timeout_secs = 3\n"))
        .unwrap();
    let per_pod = per_pod.display().to_string();
    for (id, pod) in [("a1", "pod-a"), ("a2", "pod-a"), ("b1", "pod-b")] {
        let sandbox = format!("io.kubernetes.cri.sandbox-id={pod}");
        c.ok(&["run", "-d", "--runtime", RUNTIME, "--runtime-config-path", &per_pod, "--annotation", &sandbox]
            .into_iter()
            .chain([IMAGE, id, "sleep", "1000"])
            .collect::<Vec<_>>());
    }
    let boot = |id: &str| c.ok(&["task", "exec", "--exec-id", "boot", id, "cat", "/proc/sys/kernel/random/boot_id"]);
    assert_eq!(boot("a1"), boot("a2"), "one pod, one VM");
    assert_ne!(boot("a1"), boot("b1"), "two pods, two VMs");
    assert_eq!(c.vmm_pids().len(), 2, "one VM per pod");
    for id in ["a1", "a2", "b1"] {
        c.ok(&["task", "kill", "-s", "SIGKILL", id]);
        wait_until(&format!("{id} stopped"), Duration::from_secs(60), || stopped(&c, id));
        c.ok(&["task", "rm", id]);
        c.ok(&["containers", "rm", id]);
    }
    wait_until("both VMs idled out", Duration::from_secs(120), || c.vmm_pids().is_empty());
    wait_until("the shims exited", Duration::from_secs(60), || {
        pids_matching("containerd-shim-hearth-v2", &c.socket.display().to_string()).is_empty()
    });
    let vm_dirs: Vec<_> =
        std::fs::read_dir(&c.vms).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(vm_dirs.is_empty(), "VM state left: {vm_dirs:?}");
}

/// An ext4 image for a container root: busybox as /bin/sh and a marker file.
fn root_image(scratch: &Scratch, image: &std::path::Path, marker: &str) {
    let dir = scratch.path(&format!("tree-{marker}"));
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/usr/bin/busybox", dir.join("bin/busybox")).expect("busybox-static (cargo xtask setup)");
    for applet in ["sh", "cat", "dd", "rm", "sync", "sleep", "echo"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
    std::fs::write(dir.join("hello.txt"), format!("from {marker}\n")).unwrap();
    hearth_e2e::ext4_image(&dir, image, 64);
}

/// Containers whose root is an ext4 disk image (annotation
/// io.hearth.rootfs.disk), attached to the running VM and detached at
/// delete: two at once on two disks, each detached on its own while the
/// other runs; files kept across delete and a VM restart; deleted files'
/// space given back to the sparse image; an image in use, a damaged one, a
/// missing one and one outside disk_images_dir each refused by name.
#[test]
fn containers_run_on_disk_images_attached_while_the_vm_runs() {
    let env = Env::get();
    let scratch = Scratch::new("containerd-disks");
    let disks = scratch.path("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let a = disks.join("a.img");
    let b = disks.join("b.img");
    root_image(&scratch, &a, "a");
    root_image(&scratch, &b, "b");
    let c = Containerd::start_with(
        &env,
        &scratch,
        &format!("idle_timeout_secs = 3\ndisk_images_dir = \"{}\"\n", disks.display()),
    );
    let on = |img: &std::path::Path| format!("io.hearth.rootfs.disk={}", img.display());

    // c1 runs on a, and keeps running.
    c.ok(&["run", "-d", "--runtime", RUNTIME, "--annotation", &on(&a), IMAGE, "c1", "sleep", "1000"]);
    wait_until("c1 running", Duration::from_secs(120), || running(&c, "c1"));
    assert_eq!(c.ok(&["task", "exec", "--exec-id", "e1", "c1", "cat", "/hello.txt"]), "from a\n");
    c.ok(&["task", "exec", "--exec-id", "e2", "c1", "sh", "-c", "echo kept > /kept.txt && sync"]);

    // c2 on b, beside it: writes 24 MiB, deletes it; the image gets it back.
    let b_before = hearth_e2e::allocated_bytes(&b);
    let o = c.run(
        "c2",
        &["--annotation", &on(&b)],
        &[
            "sh",
            "-c",
            "cat /hello.txt && dd if=/dev/zero of=/big bs=1M count=24 2>/dev/null && sync && rm /big && sync",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "from b\n");
    let b_after = hearth_e2e::allocated_bytes(&b);
    hearth_e2e::figure(&format!(
        "disk root b.img allocated on the host: {} KiB before, {} KiB after writing and deleting 24 MiB",
        b_before >> 10,
        b_after >> 10
    ));
    assert!(b_after < b_before + (8 << 20), "deleting 24 MiB did not shrink the image: {b_before} -> {b_after}");

    // b went with c2; a stays attached to the running c1.
    let vm_dir = std::fs::read_dir(&c.vms).unwrap().flatten().next().expect("the VM's directory").path();
    let info = hearth_vmm::api::Client::new(vm_dir.join("jail/api.sock")).info().unwrap();
    let attached: Vec<_> = info.disks.iter().filter(|d| d.id.is_some()).collect();
    assert_eq!(attached.len(), 1, "{info:?}");
    assert!(attached[0].stats.written_bytes > 0, "{info:?}");

    // Refusals, each by name, leaving c1 alone.
    let refused = |id: &str, image: &std::path::Path, why: &str| {
        let o = c.run(id, &["--annotation", &on(image)], &["cat", "/hello.txt"]);
        assert!(!o.status.success() && text(&o).contains(why), "{id}: want {why:?}: {}", text(&o));
    };
    refused("c3", &a, "is in use");
    let bad = disks.join("bad.img");
    std::fs::write(&bad, vec![0x5au8; 4 << 20]).unwrap();
    refused("c4", &bad, "damaged or not an ext4");
    refused("c5", &disks.join("missing.img"), "does not exist");
    let outside = scratch.path("outside.img");
    std::fs::copy(&b, &outside).unwrap();
    refused("c6", &outside, "not directly in");
    assert_eq!(c.ok(&["task", "exec", "--exec-id", "e3", "c1", "cat", "/hello.txt"]), "from a\n", "c1 kept its disk");

    // c1 goes; the VM idles out; a new VM finds what c1 wrote on a.
    c.ok(&["task", "kill", "-s", "SIGKILL", "c1"]);
    wait_until("c1 stopped", Duration::from_secs(60), || stopped(&c, "c1"));
    c.ok(&["task", "rm", "c1"]);
    c.ok(&["container", "rm", "c1"]);
    wait_until("the VM to idle out", Duration::from_secs(120), || c.vmm_pids().is_empty());
    let o = c.run("c7", &["--annotation", &on(&a)], &["cat", "/kept.txt"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "kept\n",
        "a file written on the disk outlives its container and VM"
    );
    // The image is whole on the host too.
    assert_eq!(hearth_e2e::ext4_read(&a, "kept.txt"), b"kept\n");
    let fsck = Command::new("e2fsck").args(["-n", "-f"]).arg(&a).output().unwrap();
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
}

/// containerd's devmapper snapshotter gives a container's root as a block
/// device (a thin device of an ext4 file system): the shim attaches it to
/// the running VM as a disk instead of mounting it on the host and sharing
/// it over virtio-fs, and the guest's writes land in the snapshot.
#[test]
fn containers_run_on_devmapper_snapshots_attached_as_disks() {
    let env = Env::get();
    let scratch = Scratch::new("containerd-devmapper");
    let pool = hearth_e2e::devmapper::ThinPool::new(&scratch.path("pool"), "hearth-e2e-pool", 1024);
    let c = pool.containerd(&env, &scratch, "idle_timeout_secs = 3\n");
    let dm = ["--snapshotter", "devmapper", "--runtime", RUNTIME];

    // Two containers at once, each on its own thin device, both attached.
    for id in ["dm1", "dm2"] {
        let mut args = vec!["run", "-d"];
        args.extend(dm);
        args.extend([IMAGE, id, "sleep", "1000"]);
        c.ok(&args);
        wait_until(&format!("{id} running"), Duration::from_secs(120), || running(&c, id));
    }
    let vm = std::fs::read_dir(&c.vms).unwrap().flatten().next().unwrap().path();
    let info = hearth_vmm::api::Client::new(vm.join("jail/api.sock")).info().expect("the VMM's control socket");
    assert_eq!(info.disks.iter().filter(|d| d.id.is_some()).count(), 2, "two roots attached: {info:?}");
    // The root is the thin device, ext4, in the guest's own kernel.
    let root = c.ok(&["task", "exec", "--exec-id", "m", "dm1", "sh", "-c", "grep ' / ' /proc/mounts"]);
    assert!(root.starts_with("/dev/vd") && root.contains(" / ext4 "), "dm1's root: {root}");
    c.ok(&["task", "exec", "--exec-id", "w", "dm1", "sh", "-c", "echo written-in-the-guest > /proof && sync"]);
    assert_eq!(pool.devices().len(), 2, "each container's own thin device, active: {:?}", pool.devices());
    // Held exclusively while attached: the host cannot mount it meanwhile.
    let mounts = c.ok(&["snapshots", "--snapshotter", "devmapper", "mounts", "/mnt", "dm1"]);
    let device = mounts.split_whitespace().find(|w| w.starts_with("/dev/mapper/")).expect(&mounts).to_string();
    let at = scratch.path("dm1-root");
    std::fs::create_dir_all(&at).unwrap();
    let o = Command::new("mount").args(["-o", "ro", &device]).arg(&at).output().unwrap();
    assert!(!o.status.success(), "the host mounted {device} while the VM had it");

    for id in ["dm1", "dm2"] {
        c.ok(&["task", "kill", "-s", "SIGKILL", id]);
        wait_until(&format!("{id} stopped"), Duration::from_secs(60), || stopped(&c, id));
        c.ok(&["task", "rm", id]);
    }
    // Detached at delete; the VM idles out with nothing attached.
    wait_until("the VM idled out", Duration::from_secs(120), || c.vmm_pids().is_empty());

    // dm1's writes are in its snapshot: mounted on the host now that no
    // VM holds it.
    hearth_e2e::host(Command::new("mount").args(["-o", "ro", &device]).arg(&at));
    let proof = std::fs::read_to_string(at.join("proof"));
    hearth_e2e::host(Command::new("umount").arg(&at));
    assert_eq!(proof.unwrap(), "written-in-the-guest\n", "dm1's snapshot on the host");
    for id in ["dm1", "dm2"] {
        c.ok(&["containers", "rm", id]);
    }
    c.ok(&["images", "rm", IMAGE]);
    drop(c);
    drop(pool);
}

#[test]
fn overlayfs_roots_run_on_an_erofs_image_of_their_layers() {
    let env = Env::get();
    let scratch = Scratch::new("containerd-erofs");
    let layers = scratch.path("layers");
    let c = Containerd::start_with(
        &env,
        &scratch,
        &format!("idle_timeout_secs = 3\noverlay_roots = \"erofs\"\nlayer_images_dir = \"{}\"\n", layers.display()),
    );
    let vm_info = || {
        let vm = std::fs::read_dir(&c.vms).unwrap().flatten().find(|e| e.path().join("jail").is_dir()).unwrap().path();
        hearth_vmm::api::Client::new(vm.join("jail/api.sock")).info().expect("the VMM's control socket")
    };
    let attached =
        |info: &hearth_vmm::api::VmInfo| -> Vec<String> { info.disks.iter().filter_map(|d| d.id.clone()).collect() };

    // Two containers of one image: one image built, one disk attached.
    for id in ["e1", "e2"] {
        c.ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "1000"]);
        wait_until(&format!("{id} running"), Duration::from_secs(120), || running(&c, id));
    }
    let images: Vec<_> = std::fs::read_dir(&layers).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(images.len(), 1, "one erofs image for the image's layers: {images:?}");
    let disks = attached(&vm_info());
    assert!(disks.len() == 1 && disks[0].starts_with("lay"), "one layer disk for both: {disks:?}");
    // The root is an overlay in the guest over the erofs disk.
    let mounts = c.ok(&["task", "exec", "--exec-id", "m", "e1", "cat", "/proc/mounts"]);
    assert!(mounts.lines().any(|l| l.starts_with("overlay / overlay ")), "e1's root: {mounts}");
    // Each writes its own upper layer: e2 sees none of e1's files, and the
    // image's files are all there.
    c.ok(&[
        "task",
        "exec",
        "--exec-id",
        "w",
        "e1",
        "sh",
        "-c",
        "echo mine > /proof && rm /bin/ls && mkdir -p /a/b && echo x > /a/b/c",
    ]);
    assert_eq!(c.ok(&["task", "exec", "--exec-id", "r", "e1", "cat", "/proof", "/a/b/c"]), "mine\nx\n");
    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "r",
        "e2",
        "sh",
        "-c",
        "test ! -e /proof && ls / >/dev/null && echo clean",
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "clean\n", "e2 beside e1: {}", text(&o));

    // The disk stays while one container is on it, and goes with the last.
    c.kill_and_remove(&["e1"]);
    assert_eq!(attached(&vm_info()).len(), 1, "e2 still runs on the layer disk");
    // Chosen per container by annotation: this one is shared over virtio-fs.
    c.ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.hearth.rootfs.layers=virtio-fs",
        IMAGE,
        "v1",
        "sleep",
        "1000",
    ]);
    wait_until("v1 running", Duration::from_secs(120), || running(&c, "v1"));
    let root = c.ok(&["task", "exec", "--exec-id", "m", "v1", "sh", "-c", "grep ' / ' /proc/mounts"]);
    assert!(root.contains(" / virtiofs "), "v1's root: {root}");
    c.kill_and_remove(&["e2"]);
    assert!(attached(&vm_info()).is_empty(), "the layer disk detached with its last container");
    c.kill_and_remove(&["v1"]);

    // A mistaken annotation is named with its fix, and nothing is left.
    let o = c.run("bad", &["--annotation", "io.hearth.rootfs.layers=nfs"], &["true"]);
    assert!(!o.status.success() && text(&o).contains("use erofs or virtio-fs"), "{}", text(&o));
    let _ = c.ctr(&["containers", "rm", "bad"]);
    wait_until("the VM idled out", Duration::from_secs(120), || c.vmm_pids().is_empty());
    drop(c);
}
