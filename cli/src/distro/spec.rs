//! The OCI runtime spec of a distro: its init (systemd) as PID 1 of a
//! long-lived container that may do what a whole system does (mount,
//! create namespaces and cgroups, run dockerd, use FUSE), and the processes
//! `hearth -d` runs in it.
//!
//! A distro is privileged inside the utility VM, as WSL's distributions
//! are in theirs: the VM is the isolation boundary from the host, and
//! Docker-class workloads need every capability, no seccomp filter, the
//! whole of /proc and a writable cgroup tree. It still gets namespaces of
//! its own (pid, mount, ipc, uts, cgroup), so distros do not see each
//! other's processes and files, and its own cgroup, delegated to its
//! systemd. Its network is the VM's, as WSL's distributions share their
//! VM's: the VM's NAT network out, the host's resolvers (the annotation
//! below has the agent write them into its /etc/resolv.conf at each start),
//! and one set of ports for all distros (docs/networking.md).

use std::path::Path;

use serde_json::{json, Value};

/// Every capability of Linux 6.12 (CAP_CHOWN .. CAP_CHECKPOINT_RESTORE).
pub const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

pub const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// systemd's signal for a clean shutdown (SIGRTMIN+3).
pub fn systemd_stop_signal() -> i32 {
    libc::SIGRTMIN() + 3
}

/// An init for a tree that has none: waits, and ends on SIGTERM.
const WAIT_FOREVER: &str = "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done";

/// What a distro's spec depends on.
pub struct DistroSpec<'a> {
    pub name: &'a str,
    /// The init's path in the tree; without one, a shell that waits.
    pub init: Option<&'a str>,
    /// The host directory to share, and where it appears.
    pub host_share: Option<(&'a Path, &'a str)>,
    /// More environment for the init.
    pub init_env: &'a [String],
}

fn caps() -> Value {
    json!({
        "bounding": ALL_CAPS, "effective": ALL_CAPS, "permitted": ALL_CAPS,
        "inheritable": ALL_CAPS, "ambient": ALL_CAPS,
    })
}

/// A process as OCI describes it: root, every capability.
pub fn process(args: &[String], terminal: bool, cwd: &str, env: &[String]) -> Value {
    json!({
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": caps(),
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1048576u64, "soft": 1048576u64}],
        "noNewPrivileges": false,
    })
}

impl DistroSpec<'_> {
    pub fn to_json(&self) -> Value {
        let args: Vec<String> = match self.init {
            Some(init) => vec![init.to_string()],
            None => vec!["/bin/sh".into(), "-c".into(), WAIT_FOREVER.into()],
        };
        // systemd recognises a container by `container`, and then leaves
        // alone what a container does not own (udev, the clock). No getty
        // on the console: shells come through `hearth -d`, and agetty's
        // hangup of the console would end the console log.
        let mut env = vec![PATH_ENV.to_string(), "container=hearth".to_string(), "SYSTEMD_GETTY_AUTO=0".to_string()];
        env.extend(self.init_env.iter().cloned());
        let mut mounts = vec![
            json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
            json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
            json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
            json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
            // Read-only /sys tells systemd it is in a container (no udev);
            // the cgroup tree below is the distro's own and writable.
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
            json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "rw"]}),
        ];
        if let Some((host, at)) = self.host_share {
            mounts.push(json!({"destination": at, "type": "bind", "source": host, "options": ["rbind", "rw"]}));
        }
        let char_dev = |path: &str, major: u32, minor: u32| json!({"path": path, "type": "c", "major": major, "minor": minor, "fileMode": 0o666, "uid": 0, "gid": 0});
        json!({
            "ociVersion": "1.0.2",
            // A terminal: the PTY becomes the container's /dev/console, where
            // systemd writes its boot (the shim copies it to the console log).
            "process": process(&args, true, "/", &env),
            "root": {"path": "rootfs", "readonly": false},
            "hostname": self.name,
            "mounts": mounts,
            "annotations": {"io.hearth.distro": self.name, (hearth_oci::ANNOTATION_RESOLV_CONF): "vm"},
            "linux": {
                "namespaces": [
                    {"type": "pid"}, {"type": "mount"},
                    {"type": "ipc"}, {"type": "uts"}, {"type": "cgroup"},
                ],
                "devices": [
                    char_dev("/dev/fuse", 10, 229),
                    char_dev("/dev/net/tun", 10, 200),
                ],
                // Every device of the VM may be used (created with mknod).
                "resources": {"devices": [{"allow": true, "access": "rwm"}]},
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_parses_as_oci_and_says_what_a_system_needs() {
        let home = Path::new("/home/u");
        let p = process(&["true".into()], true, "/root", &[PATH_ENV.into()]);
        hearth_oci::parse_process(&serde_json::to_vec(&p).unwrap()).expect("a valid OCI process");
        let s =
            DistroSpec { name: "deb", init: Some("/sbin/init"), host_share: Some((home, "/mnt/host")), init_env: &[] }
                .to_json();
        let spec = hearth_oci_parse(&s);
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &vec!["/sbin/init".to_string()]);
        assert!(p.env().as_ref().unwrap().contains(&"container=hearth".to_string()));
        let caps = p.capabilities().as_ref().unwrap().bounding().as_ref().unwrap();
        assert_eq!(caps.len(), ALL_CAPS.len());
        let mounts = spec.mounts().as_ref().unwrap();
        let cg = mounts.iter().find(|m| m.destination() == Path::new("/sys/fs/cgroup")).unwrap();
        assert!(cg.options().as_ref().unwrap().contains(&"rw".to_string()));
        let share = mounts.iter().find(|m| m.destination() == Path::new("/mnt/host")).unwrap();
        assert_eq!(share.source().as_deref(), Some(home));
        assert!(spec.linux().as_ref().unwrap().seccomp().is_none(), "no seccomp filter");
        assert_eq!(spec.hostname().as_deref(), Some("deb"));
    }

    #[test]
    fn a_tree_without_init_waits_in_a_shell() {
        let s = DistroSpec { name: "x", init: None, host_share: None, init_env: &["A=b".to_string()] }.to_json();
        let spec = hearth_oci_parse(&s);
        let args = spec.process().as_ref().unwrap().args().clone().unwrap();
        assert_eq!(args[0], "/bin/sh");
        assert!(spec.mounts().as_ref().unwrap().iter().all(|m| m.destination() != Path::new("/mnt/host")));
    }

    /// Parsed and checked as the shim and the agent will.
    fn hearth_oci_parse(v: &Value) -> oci_spec::runtime::Spec {
        hearth_oci::parse_spec(&serde_json::to_vec(v).unwrap()).expect("a valid OCI runtime spec")
    }
}
