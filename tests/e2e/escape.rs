//! e2e suite `escape`: a privileged guest attacks the host through the VM
//! boundary, and the host stays as it was (docs/security.md lists each
//! attack, its fix and the test here that shows it).
//!
//! Each test starts its own containerd with the hearth runtime (as the
//! `containerd` suite does), lets a privileged container (every capability,
//! as a distro's root has) try an attack, then checks the host side: host
//! files, `/proc/self/mountinfo` on the host, and that the shim still
//! serves the next container correctly.

use std::process::Command;
use std::time::Duration;

use hearth_e2e::containerd::{pids_matching, text, wait_until, Containerd, IMAGE, RUNTIME};
use hearth_e2e::{Env, Scratch};

/// The guest mounts both virtio-fs shares itself (as any privileged
/// container can) and plants symlinks to a host directory where the next
/// container's root and bind mount will go, at the shares' top and in its
/// own mounts directory: the shim must not follow any of them. Before the
/// shares' host side was split into a host-only tree and a read-only export
/// (shim/src/share.rs), the shim mounted the next container's volume over
/// the symlink's target.
#[test]
fn symlinks_planted_in_the_shares_redirect_nothing() {
    let env = Env::get();
    let scratch = Scratch::new("escape-symlinks");
    // The roots share is the attack surface: the containers' roots on it
    // (an overlayfs root otherwise goes on an erofs image, off the share).
    let c = Containerd::start_with(&env, &scratch, "idle_timeout_secs = 3\noverlay_roots = \"virtio-fs\"\n");
    // `precious` stands in for /etc: what the attacker aims the shim at.
    let (precious, volume, own) = (scratch.path("precious"), scratch.path("volume"), scratch.path("own"));
    for d in [&precious, &volume, &own] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(precious.join("keep"), "host\n").unwrap();

    let own_mount = format!("type=bind,src={},dst=/vol,options=rbind:rw", own.display());
    c.ok(&[
        "run",
        "-d",
        "--privileged",
        "--runtime",
        RUNTIME,
        "--mount",
        &own_mount,
        IMAGE,
        "attacker",
        "sleep",
        "1000",
    ]);
    // Root in a privileged container is root of the whole guest: it sets
    // the kernel's core-dump helper, which the guest kernel runs as root in
    // the guest's own namespaces, where the agent has the shares mounted.
    // The helper is the attack.
    let attack = format!(
        "#!/run/hearth/roots/attacker/rootfs/bin/sh\n\
         BB=/run/hearth/roots/attacker/rootfs/bin/busybox\n\
         S=/run/hearth/shared; R=/run/hearth/roots\n\
         {{\n\
         [ -d $S/attacker/mounts ] && [ -d $R/attacker/rootfs/bin ] && echo SEES-THE-SHARES\n\
         for p in $S/victim $S/attacker/mounts/77 $S/top $R/victim $R/attacker/other; do\n\
           echo TRIED $p; $BB ln -s {precious} $p && echo PLANTED $p\n\
         done\n\
         $BB mkdir $S/victim2 && echo MADE-DIR\n\
         $BB mv $S/attacker $S/moved && echo MOVED\n\
         echo DONE\n\
         }} > $R/attacker/rootfs/result.tmp 2>&1\n\
         $BB mv $R/attacker/rootfs/result.tmp $R/attacker/rootfs/result\n",
        precious = precious.display()
    );
    std::fs::write(own.join("attack.sh"), attack).unwrap();
    let script = "cp /vol/attack.sh /attack.sh && chmod +x /attack.sh && \
         echo '|/run/hearth/roots/attacker/rootfs/attack.sh' > /proc/sys/kernel/core_pattern && \
         echo CORE-PATTERN-SET; \
         ulimit -c unlimited; sh -c 'kill -SEGV $$'; \
         for i in $(seq 150); do [ -f /result ] && break; sleep 0.2; done; cat /result; \
         echo mine > /vol/own && echo OWN-VOLUME-WRITABLE";
    let out = c.ok(&["task", "exec", "--exec-id", "attack", "attacker", "sh", "-c", script]);
    assert!(
        out.contains("CORE-PATTERN-SET") && out.contains("SEES-THE-SHARES") && out.contains("DONE"),
        "the attack did not run as the guest's root, so nothing was tried: {out}"
    );
    assert_eq!(out.matches("TRIED").count(), 5, "{out}");
    for bad in ["PLANTED", "MADE-DIR", "MOVED"] {
        assert!(!out.contains(bad), "the guest changed the shares' layout ({bad}): {out}");
    }
    assert!(out.contains("OWN-VOLUME-WRITABLE"), "a read-write volume must stay writable: {out}");
    assert_eq!(std::fs::read_to_string(own.join("own")).unwrap(), "mine\n");

    // The next container, with a volume of its own, in the same VM.
    let volume_mount = format!("type=bind,src={},dst=/data,options=rbind:rw", volume.display());
    let o = c.run("victim", &["--mount", &volume_mount], &["sh", "-c", "echo victim > /data/f && ls /bin/sh"]);
    assert!(o.status.success(), "the next container did not run correctly: {}", text(&o));
    assert_eq!(std::fs::read_to_string(volume.join("f")).unwrap(), "victim\n", "the volume went elsewhere");

    // The host: the target untouched, nothing mounted on it.
    let left: Vec<_> = std::fs::read_dir(&precious).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, ["keep"], "files appeared in the host directory");
    assert_eq!(std::fs::read_to_string(precious.join("keep")).unwrap(), "host\n");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(precious.to_str().unwrap()), "a mount on the host directory:\n{mounts}");

    // The attacker's VM still serves it, and everything goes at the end.
    let o = c.ctr(&["task", "exec", "--exec-id", "after", "attacker", "echo", "still-here"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "still-here\n", "{}", text(&o));
    c.ok(&["task", "kill", "-s", "SIGKILL", "attacker"]);
    wait_until("the attacker exited", Duration::from_secs(60), || {
        !c.ok(&["task", "ls"]).lines().any(|l| l.starts_with("attacker ") && l.contains("RUNNING"))
    });
    c.ok(&["task", "rm", "attacker"]);
    c.ok(&["containers", "rm", "attacker"]);
    wait_until("the VM idled out", Duration::from_secs(120), || c.vmm_pids().is_empty());
    // The shim unmounts the shares once hearth-vmm has ended.
    wait_until("the shares unmounted", Duration::from_secs(30), || {
        !std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(c.vms.to_str().unwrap())
    });
    assert_eq!(std::fs::read_to_string(volume.join("f")).unwrap(), "victim\n");
    assert_eq!(std::fs::read_to_string(own.join("own")).unwrap(), "mine\n");
}

/// hearth-vmm runs jailed (see assert_jailed). A guest floods the host with
/// vsock connections to a port something on the host listens on: hearth-vmm takes at most its cap (512, the shim's
/// own streams included) and refuses the rest, frees them when the guest
/// closes them (a second flood gets as many again), its memory stays
/// bounded, and the shim and other containers keep serving.
#[test]
fn a_vsock_flood_is_capped() {
    let env = Env::get();
    let scratch = Scratch::new("escape-vsock-flood");
    // The listener below holds up to a thousand connections.
    let files = libc::rlimit { rlim_cur: 8192, rlim_max: 8192 };
    // SAFETY: setrlimit with a valid struct; the tests run as root.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &files) }, 0);
    let c = Containerd::start(&env, &scratch, 3);
    c.ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, "bystander", "sleep", "1000"]);
    let dirs: Vec<_> = std::fs::read_dir(&c.vms).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    // A host listener at port 7000 of the VM's hybrid vsock, holding every
    // connection it gets.
    let listener = std::os::unix::net::UnixListener::bind(dirs[0].join("jail/vsock.sock_7000")).unwrap();
    // hearth-vmm connects as its own unprivileged user.
    std::fs::set_permissions(dirs[0].join("jail/vsock.sock_7000"), std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(s);
        }
    });
    let vmm = c.vmm_pids()[0];
    assert_jailed(vmm);
    // Its control socket, inside the jail, answers the host: running, with
    // the configured disk slots, empty but for the container's layer image
    // (its root on erofs, layers.rs), which is read-only.
    let info = hearth_vmm::api::Client::new(dirs[0].join("jail/api.sock")).info().expect("the VMM's control socket");
    assert_eq!(info.state, hearth_vmm::api::protocol::VmState::Running);
    assert_eq!(info.disks.iter().filter(|d| d.slot).count(), 4, "{info:?}");
    assert!(
        info.disks
            .iter()
            .filter_map(|d| d.id.as_ref().map(|id| (id, d.read_only)))
            .all(|(id, ro)| id.starts_with("lay") && ro),
        "{info:?}"
    );
    let cgroup = assert_in_its_cgroup(vmm, &dirs[0], &c);
    let rss_before = hearth_e2e::proc_status_kib(vmm as u32, "VmRSS").unwrap();

    let flood = |id: &str| {
        let o = c.run(id, &["--privileged"], &["hearth-guest-tool", "vsock-flood", "2", "7000", "900"]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "{}", text(&o));
        let field = |k: &str| -> usize {
            out.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{k} in {out}"))
        };
        (field("connected="), field("refused="))
    };
    let (connected, refused) = flood("flood1");
    assert!(connected > 0 && connected <= 512, "connected {connected}: the cap is 512");
    assert_eq!(connected + refused, 900);
    let (again, _) = flood("flood2");
    hearth_e2e::figure(&format!("vsock flood of 900: {connected} then {again} connected, the rest refused"));
    assert!(again * 10 >= connected * 9, "the first flood's connections were not freed: {connected} then {again}");
    let seen = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(seen <= connected + again, "the host listener saw {seen} connections, more than the guest got");

    let rss_after = hearth_e2e::proc_status_kib(vmm as u32, "VmRSS").unwrap();
    hearth_e2e::figure(&format!("hearth-vmm RSS {rss_before} KiB before the floods, {rss_after} KiB after"));
    assert!(rss_after < rss_before + 64 * 1024, "hearth-vmm grew from {rss_before} KiB to {rss_after} KiB");
    let o = c.ctr(&["task", "exec", "--exec-id", "after", "bystander", "echo", "still-here"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "still-here\n", "{}", text(&o));
    assert_eq!(c.vmm_pids(), [vmm], "the same VM serves on");
    c.ok(&["task", "kill", "-s", "SIGKILL", "bystander"]);
    wait_until("the bystander exited", Duration::from_secs(60), || {
        !c.ok(&["task", "ls"]).lines().any(|l| l.starts_with("bystander ") && l.contains("RUNNING"))
    });
    c.ok(&["task", "rm", "bystander"]);
    c.ok(&["containers", "rm", "bystander"]);
    figure_peak(&cgroup, "two vsock floods");
    wait_until("the VM idled out", Duration::from_secs(120), || c.vmm_pids().is_empty());
    wait_until("the VM's cgroup removed", Duration::from_secs(30), || !cgroup.exists());
}

/// A privileged container floods the serial console (every byte a VM exit,
/// every byte into the host's log): the log on the host is rotated at its
/// cap (here `console_log_max_kib = 64`), so at most twice the cap is kept,
/// the current file begins with the rotation marker, and the VM serves on.
#[test]
fn a_console_flood_is_capped() {
    let env = Env::get();
    let scratch = Scratch::new("escape-console-flood");
    let c = Containerd::start_with(&env, &scratch, "idle_timeout_secs = 3\nconsole_log_max_kib = 64\n");
    // 200 KiB, three times the cap, in lines of 64 characters.
    let flood =
        "i=0; while [ $i -lt 3200 ]; do echo FLOOD-FLOOD-FLOOD-FLOOD-FLOOD-FLOOD-FLOOD-FLOOD-FLOOD-FLOOD-FLOO; \
                 i=$((i+1)); done > /dev/ttyS0; echo flooded";
    let o = c.run("flooder", &["--privileged"], &["sh", "-c", flood]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "flooded\n", "{}", text(&o));
    let dirs: Vec<_> = std::fs::read_dir(&c.vms).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let log = dirs[0].join("jail/console.log");
    let old = dirs[0].join("jail/console.log.1");
    let cap = 64 * 1024;
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    hearth_e2e::figure(&format!(
        "console flood of 200 KiB, cap 64 KiB: console.log {} B, console.log.1 {} B",
        size(&log),
        size(&old)
    ));
    assert!(
        size(&log) <= cap && size(&old) <= cap,
        "the console log outgrew its cap: {} and {}",
        size(&log),
        size(&old)
    );
    assert!(size(&old) > cap / 2, "the log was never rotated");
    let text_of = std::fs::read_to_string(&log).unwrap();
    assert!(text_of.starts_with("[hearth-vmm: the console log reached"), "{:?}", text_of.get(..200));
    let o = c.run("after", &[], &["echo", "still-here"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "still-here\n", "{}", text(&o));
    wait_until("the VM idled out", Duration::from_secs(120), || c.vmm_pids().is_empty());
}

/// hearth-vmm and its virtiofsd run in the VM's own cgroup, which accounts
/// the guest's memory; its path.
fn assert_in_its_cgroup(vmm: i32, vm_dir: &std::path::Path, c: &Containerd) -> std::path::PathBuf {
    let name = vm_dir.file_name().unwrap().to_string_lossy().into_owned();
    let expected = format!("0::/hearth/{name}");
    let cgroup_of = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    assert_eq!(cgroup_of(vmm).trim(), expected, "hearth-vmm's cgroup");
    let fsds = pids_matching("virtiofsd", &c.vms.display().to_string());
    // Two shares; each virtiofsd is a parent and its sandboxed child.
    assert!(fsds.len() >= 2, "a virtiofsd per share: {fsds:?}");
    for p in fsds {
        assert_eq!(cgroup_of(p).trim(), expected, "virtiofsd's cgroup");
    }
    let path = std::path::Path::new("/sys/fs/cgroup/hearth").join(&name);
    let memory: u64 = std::fs::read_to_string(path.join("memory.current")).unwrap().trim().parse().unwrap();
    let rss = hearth_e2e::proc_status_kib(vmm as u32, "VmRSS").unwrap() * 1024;
    // The guest's RAM is shared memory (virtiofsd maps it too); the
    // VMM's own heap is its anonymous memory.
    let kib = |k: &str| hearth_e2e::proc_status_kib(vmm as u32, k).unwrap_or(0);
    hearth_e2e::figure(&format!(
        "the VM's cgroup: memory.current {} KiB, hearth-vmm's RSS {} KiB (guest RAM touched {} KiB, its own heap {} KiB)",
        memory >> 10,
        rss >> 10,
        kib("RssShmem"),
        kib("RssAnon")
    ));
    // The guest's RAM, touched by the booted guest, is charged there.
    assert!(memory >= rss / 2, "memory.current {memory} is not the VMM's (RSS {rss})");
    // And capped: the test VMs' 512 MiB of RAM plus the default 256 MiB
    // for the VMM's and virtiofsd's own needs; threads capped too.
    let read = |f: &str| std::fs::read_to_string(path.join(f)).unwrap().trim().to_string();
    assert_eq!(read("memory.max"), ((512u64 + 256) << 20).to_string(), "memory.max of the VM's cgroup");
    assert_eq!(read("memory.oom.group"), "1", "memory.oom.group of the VM's cgroup");
    assert_eq!(read("pids.max"), "512", "pids.max of the VM's cgroup");
    path
}

/// What the VM's cgroup used at most, for the record (what the default
/// `vmm_memory_overhead_mib` must leave room for).
fn figure_peak(cgroup: &std::path::Path, after: &str) {
    let read = |f: &str| std::fs::read_to_string(cgroup.join(f)).unwrap_or_default().trim().to_string();
    let peak: u64 = read("memory.peak").parse().unwrap_or(0);
    hearth_e2e::figure(&format!(
        "the VM's cgroup after {after}: memory.peak {} MiB of memory.max {} MiB, pids.current {}",
        peak >> 20,
        read("memory.max").parse::<u64>().unwrap_or(0) >> 20,
        read("pids.current")
    ));
}

/// A VMM that outgrows its cgroup's memory.max is ended by the kernel,
/// alone: the host's other processes (containerd, the shim) are untouched,
/// its tasks are reported exited with a message naming the limit and the
/// setting to raise, its cgroup and state are removed, and the next
/// container gets a new VM. (The limit is lowered here, as a host's admin
/// might, so that a guest's ordinary allocation reaches it; the default
/// leaves room for the whole of the guest's RAM, asserted elsewhere.)
#[test]
fn a_vm_past_its_memory_limit_is_ended_alone() {
    let env = Env::get();
    let scratch = Scratch::new("escape-memory-limit");
    let c = Containerd::start(&env, &scratch, 3);
    c.ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, "victim", "sleep", "1000"]);
    let vmm = c.vmm_pids()[0];
    let dirs: Vec<_> = std::fs::read_dir(&c.vms).unwrap().flatten().map(|e| e.path()).collect();
    let cgroup = assert_in_its_cgroup(vmm, &dirs[0], &c);
    let current: u64 = std::fs::read_to_string(cgroup.join("memory.current")).unwrap().trim().parse().unwrap();
    std::fs::write(cgroup.join("memory.max"), (current + (48 << 20)).to_string()).unwrap();
    // 200 MiB touched by the guest, four times what is left.
    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "hog",
        "victim",
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=200M",
        "count=1",
    ]);
    assert!(!o.status.success(), "the hog outlived its VM: {}", text(&o));
    assert!(
        text(&o).contains("the host's OOM killer ended hearth-vmm") && text(&o).contains("vmm_memory_overhead_mib"),
        "the exec's output does not say why its VM ended: {}",
        text(&o)
    );
    wait_until("the victim exited", Duration::from_secs(60), || {
        c.ok(&["task", "ls"]).lines().any(|l| l.starts_with("victim ") && l.contains("STOPPED"))
    });
    assert!(c.vmm_pids().is_empty(), "hearth-vmm still runs");
    wait_until("the VM's cgroup removed", Duration::from_secs(30), || !cgroup.exists());
    c.ok(&["task", "rm", "victim"]);
    c.ok(&["containers", "rm", "victim"]);
    let o = c.run("next", &[], &["echo", "next-one"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "next-one\n", "{}", text(&o));
}

/// What an escape into hearth-vmm would inherit, as the host sees it: its
/// own mount, network, IPC, UTS and pid namespaces (in which it is pid 1,
/// seeing no host process), a root holding only the
/// vsock sockets, the control socket and the console log, an unprivileged
/// user, no capability, no_new_privs and seccomp filters.
fn assert_jailed(vmm: i32) {
    let proc = format!("/proc/{vmm}");
    for ns in ["mnt", "net", "ipc", "uts", "pid"] {
        let theirs = std::fs::read_link(format!("{proc}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "hearth-vmm shares the host's {ns} namespace");
    }
    let mut names: Vec<String> = std::fs::read_dir(format!("{proc}/root"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.contains(&"vsock.sock".to_string()), "hearth-vmm's root: {names:?}");
    assert!(names.contains(&"api.sock".to_string()), "hearth-vmm's root: {names:?}");
    assert!(
        names.iter().all(|n| n.starts_with("vsock.sock") || n.starts_with("console.log") || n == "api.sock"),
        "hearth-vmm's root holds more than its sockets and console log: {names:?}"
    );
    let status = std::fs::read_to_string(format!("{proc}/status")).unwrap();
    let field = |k: &str| {
        status.lines().find_map(|l| l.strip_prefix(k)).map(str::trim).unwrap_or_else(|| panic!("{k} in {status}"))
    };
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(caps), "0000000000000000", "hearth-vmm's {caps}");
    }
    assert_eq!(field("NoNewPrivs:"), "1");
    // nobody and nogroup (the shim's default vmm_uid and vmm_gid): real,
    // effective, saved and file-system ids, and no supplementary group.
    assert_eq!(field("Uid:").split_whitespace().collect::<Vec<_>>(), ["65534"; 4], "hearth-vmm's uids");
    assert_eq!(field("Gid:").split_whitespace().collect::<Vec<_>>(), ["65534"; 4], "hearth-vmm's gids");
    assert_eq!(field("Groups:"), "", "hearth-vmm's supplementary groups");
    // Its pid as the host sees it, then as it sees itself: the first
    // process of a namespace of its own.
    assert_eq!(field("NSpid:").split_whitespace().collect::<Vec<_>>(), [vmm.to_string().as_str(), "1"], "NSpid");
    assert_eq!(field("Seccomp:"), "2", "hearth-vmm runs without seccomp filters");
}

/// A shim killed with SIGKILL runs no clean-up of its own: its hearth-vmm
/// and virtiofsd must die with it, and containerd's clean-up after it (the
/// shim binary's `delete`) must leave no mount and no VM state; the next
/// container boots a new VM.
#[test]
fn a_killed_shim_leaves_nothing_behind() {
    let env = Env::get();
    let scratch = Scratch::new("escape-dead-shim");
    let c = Containerd::start(&env, &scratch, 3);
    let vol = scratch.path("vol");
    std::fs::create_dir_all(&vol).unwrap();
    let vol_mount = format!("type=bind,src={},dst=/vol,options=rbind:rw", vol.display());
    c.ok(&["run", "-d", "--runtime", RUNTIME, "--mount", &vol_mount, IMAGE, "doomed", "sleep", "1000"]);
    let vms = c.vms.display().to_string();
    assert_eq!(c.vmm_pids().len(), 1, "one VM");
    assert!(!pids_matching("virtiofsd", &vms).is_empty(), "virtiofsd runs for the VM");
    let dirs: Vec<String> =
        std::fs::read_dir(&c.vms).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let shim: i32 = dirs[0].rsplit('-').next().unwrap().parse().unwrap();
    let cgroup = std::path::Path::new("/sys/fs/cgroup/hearth").join(&dirs[0]);
    assert!(cgroup.join("cgroup.procs").exists(), "the VM has no cgroup of its own");

    // SAFETY: kill(2) on the shim's pid, read from its VM directory's name.
    assert_eq!(unsafe { libc::kill(shim, libc::SIGKILL) }, 0);
    wait_until("hearth-vmm died with its shim", Duration::from_secs(30), || c.vmm_pids().is_empty());
    wait_until("virtiofsd died with hearth-vmm", Duration::from_secs(30), || {
        pids_matching("virtiofsd", &vms).is_empty()
    });
    let mounted = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&vms) || l.contains("/doomed/"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    wait_until("containerd cleaned up after the dead shim", Duration::from_secs(60), || {
        mounted().is_empty() && std::fs::read_dir(&c.vms).map(|d| d.count() == 0).unwrap_or(true)
    });
    wait_until("the dead shim's VM cgroup removed", Duration::from_secs(30), || !cgroup.exists());
    assert!(!c.ok(&["task", "ls"]).lines().any(|l| l.starts_with("doomed ") && l.contains("RUNNING")));
    let _ = c.ctr(&["task", "rm", "-f", "doomed"]);
    c.ok(&["containers", "rm", "doomed"]);

    let o = c.run("after", &["--mount", &vol_mount], &["sh", "-c", "echo after > /vol/f; echo ok"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n", "{}", text(&o));
    assert_eq!(std::fs::read_to_string(vol.join("f")).unwrap(), "after\n");
    wait_until("the VM idled out", Duration::from_secs(120), || c.vmm_pids().is_empty());
    // The shim unmounts the shares once hearth-vmm has ended.
    wait_until("the shares unmounted", Duration::from_secs(30), || mounted().is_empty());
}

/// A tmpfs mounted on the host for a test, unmounted however the test ends.
struct HostTmpfs(std::path::PathBuf);

impl HostTmpfs {
    fn mount(at: &std::path::Path) -> HostTmpfs {
        std::fs::create_dir_all(at).unwrap();
        hearth_e2e::host(Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(at));
        HostTmpfs(at.to_path_buf())
    }
}

impl Drop for HostTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Read-only binds hold on the host side: root in a privileged container
/// remounts its read-only volume read-write inside the guest, and still
/// cannot write through it to the host files. `rbind` brings the source's submounts along; a plain `bind` does
/// not (as with runc).
#[test]
fn read_only_binds_hold_on_the_host_against_a_privileged_guest() {
    let env = Env::get();
    let scratch = Scratch::new("containerd-ro");
    let c = Containerd::start(&env, &scratch, 3);
    let (ro, plain) = (scratch.path("ro-src"), scratch.path("plain-src"));
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("keep.txt"), "from the host\n").unwrap();
    let _ro_sub = HostTmpfs::mount(&ro.join("sub"));
    std::fs::write(ro.join("sub/inner.txt"), "inner from the host\n").unwrap();
    let _plain_sub = HostTmpfs::mount(&plain.join("sub"));
    std::fs::write(plain.join("sub/hidden.txt"), "a submount\n").unwrap();

    let ro_mount = format!("type=bind,src={},dst=/ro,options=rbind:ro", ro.display());
    let plain_mount = format!("type=bind,src={},dst=/plain,options=bind:rw", plain.display());
    // Root in the container first makes its own mounts writable again (it
    // may: they are its mounts), then writes through them.
    let script = "echo x 2>/dev/null > /ro/keep.txt && echo GUEST-RO-WRITABLE; \
                  mount -o remount,bind,rw /ro || echo NO-REMOUNT; mount -o remount,bind,rw /ro/sub; \
                  grep -q ' /ro virtiofs rw' /proc/mounts && echo RO-NOW-RW; \
                  for f in /ro/keep.txt /ro/sub/inner.txt; do \
                    echo TRIED; \
                    (echo pwned > \"$f\") 2>/dev/null && echo WROTE $f; \
                    touch \"$f.new\" 2>/dev/null && echo CREATED $f.new; \
                  done; \
                  echo PLAIN-SUB: $(ls /plain/sub); cat /ro/sub/inner.txt";
    let o = c.run("ro-binds", &["--privileged", "--mount", &ro_mount, "--mount", &plain_mount], &["sh", "-c", script]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !out.contains("NO-REMOUNT") && out.contains("RO-NOW-RW"),
        "the guest could not make its mounts writable, so nothing was tried: {out}"
    );
    assert_eq!(out.matches("TRIED").count(), 2, "{out}");
    assert!(!out.contains("WROTE") && !out.contains("CREATED"), "the guest wrote through a read-only bind: {out}");
    assert!(!out.contains("GUEST-RO-WRITABLE"), "{out}");
    assert!(out.contains("PLAIN-SUB:\n"), "a plain bind brought a submount along: {out}");
    assert!(out.contains("inner from the host"), "rbind did not bring the submount: {out}");
    assert_eq!(std::fs::read_to_string(ro.join("keep.txt")).unwrap(), "from the host\n");
    assert_eq!(std::fs::read_to_string(ro.join("sub/inner.txt")).unwrap(), "inner from the host\n");
    let left: Vec<_> = std::fs::read_dir(&ro).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left.len(), 2, "files appeared in the read-only source: {left:?}");
    wait_until("the VM idled out", Duration::from_secs(120), || c.vmm_pids().is_empty());
}

/// One guest plants a symbolic link in a volume it shares with the host,
/// aimed at a host directory; a second container is given that link as its
/// volume's source (a path inside a shared volume, as a user might name
/// one). The shim refuses the bind, naming the link, instead of mounting
/// the host directory the guest chose; a link the host made, outside any
/// directory a guest writes, is still followed, as runc follows it.
#[test]
fn a_symlink_planted_in_a_volume_aims_no_other_containers_bind() {
    let env = Env::get();
    let scratch = Scratch::new("escape-bind-source");
    let c = Containerd::start(&env, &scratch, 3);
    let (volume, precious, real) = (scratch.path("volume"), scratch.path("precious"), scratch.path("real"));
    for d in [&volume, &precious, &real] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(precious.join("file"), "host-only\n").unwrap();
    std::fs::write(real.join("file"), "real\n").unwrap();
    let host_link = scratch.path("host-link");
    std::os::unix::fs::symlink(&real, &host_link).unwrap();

    let vol_mount = format!("type=bind,src={},dst=/vol,options=rbind:rw", volume.display());
    c.ok(&["run", "-d", "--runtime", RUNTIME, "--mount", &vol_mount, IMAGE, "planter", "sleep", "1000"]);
    let target = precious.display().to_string();
    c.ok(&["task", "exec", "--exec-id", "plant", "planter", "ln", "-s", &target, "/vol/aim"]);
    assert_eq!(std::fs::read_link(volume.join("aim")).unwrap(), precious, "the guest's link, as the host sees it");

    let aimed = format!("type=bind,src={},dst=/data,options=rbind:ro", volume.join("aim").display());
    let o = c.ctr(&["run", "--rm", "--runtime", RUNTIME, "--mount", &aimed, IMAGE, "victim", "cat", "/data/file"]);
    assert!(!o.status.success(), "the guest's link was followed: {}", text(&o));
    assert!(!text(&o).contains("host-only"), "{}", text(&o));
    assert!(
        text(&o).contains("a hearth guest can") && text(&o).contains(&volume.join("aim").display().to_string()),
        "the refusal does not name the link and why: {}",
        text(&o)
    );
    let _ = c.ctr(&["containers", "rm", "victim"]);

    let legit = format!("type=bind,src={},dst=/data,options=rbind:ro", host_link.display());
    let o = c.run("legit", &["--mount", &legit], &["cat", "/data/file"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "real\n", "a host-made link is followed: {}", text(&o));
    let o = c.ctr(&["task", "exec", "--exec-id", "after", "planter", "echo", "still-here"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "still-here\n", "{}", text(&o));
    c.ok(&["task", "kill", "-s", "SIGKILL", "planter"]);
    wait_until("the planter exited", Duration::from_secs(60), || {
        !c.ok(&["task", "ls"]).lines().any(|l| l.starts_with("planter ") && l.contains("RUNNING"))
    });
    c.ok(&["task", "rm", "planter"]);
    c.ok(&["containers", "rm", "planter"]);
}
