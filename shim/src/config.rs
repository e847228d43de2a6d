//! The shim's configuration: `/etc/hearth/config.toml`, or the file named by
//! `$HEARTH_CONFIG` (containerd passes its environment to the shims it
//! starts). Every key is optional; docs/usage.md lists them with defaults.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_PATH: &str = "/etc/hearth/config.toml";

/// How containers map to utility VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmMode {
    /// One VM per containerd namespace, shared by its containers (WSL style).
    Shared,
    /// One VM per container or CRI sandbox (Kata style).
    PerPod,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// hearth-vmm.
    pub vmm: PathBuf,
    /// The tuned kernel (vmlinux).
    pub kernel: PathBuf,
    /// The agent initramfs.
    pub initramfs: PathBuf,
    /// virtiofsd, which hearth-vmm starts for the shared directory.
    pub virtiofsd: Option<PathBuf>,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Appended to the VM's kernel command line.
    pub extra_cmdline: String,
    /// Seconds the VM stays up with no containers before it shuts down.
    pub idle_timeout_secs: u64,
    /// Seconds the agent may leave a health check unanswered before the shim
    /// declares it dead and stops the VM (its tasks exit with 255); 0 turns
    /// the check off.
    pub agent_timeout_secs: u64,
    pub mode: VmMode,
    /// A tracing-style level for the shim's log: error, warn, info, debug.
    pub log_level: String,
    /// Where VM state (sockets, shared directory, console log) lives.
    pub state_dir: PathBuf,
    /// The size in KiB at which a VM's console log is rotated (at most
    /// twice this is kept per VM: the guest can print forever).
    pub console_log_max_kib: u64,
    /// Empty disk devices the VM boots with, to which disk images are
    /// attached through hearth-vmm's control socket while it runs
    /// (docs/vmm.md); at most 12, leaving interrupt lines for the others.
    pub disk_slots: u8,
    /// Where the disk images that containers may run on (annotation
    /// `io.hearth.rootfs.disk`) must lie.
    pub disk_images_dir: PathBuf,
    /// How roots from containerd's overlayfs snapshotter reach the VM:
    /// `erofs` (an image of the layers on a disk, the writes kept in the
    /// guest: layers.rs) or `virtio-fs` (the snapshot shared).
    pub overlay_roots: crate::layers::OverlayRoots,
    /// Where the erofs images of layers are kept (host-only).
    pub layer_images_dir: PathBuf,
    /// How many of them are kept, the least recently used removed first.
    pub layer_images_kept: usize,
    /// The VM's own network: `nat` (to the host's network through a bridge,
    /// docs/networking.md) or `off` (loopback only).
    pub network: crate::network::NetMode,
    /// The VMs' subnet; the bridge takes its first address.
    pub network_subnet: String,
    /// The host bridge the VMs' taps join.
    pub network_bridge: String,
    /// Forward each TCP port that listens in the VM's network (distros,
    /// containers sharing it) to the same port on the host's 127.0.0.1.
    pub localhost_forwarding: bool,
    /// NIC slots the VM boots with for containers that name a network
    /// namespace (CNI, Docker): the most such containers one VM runs at
    /// once, each of their interfaces taking one (docs/networking.md).
    pub container_nics: u8,
    /// What hearth-vmm and its virtiofsd may use above the guest's RAM:
    /// the VM's cgroup gets `memory.max` = `memory_mib` + this, so a VMM
    /// that grows without bound is killed, alone, before the host suffers.
    pub vmm_memory_overhead_mib: u32,
    /// `pids.max` of the VM's cgroup: hearth-vmm's threads and virtiofsd's.
    pub vmm_pids_max: u32,
    /// The unprivileged user and group hearth-vmm becomes once jailed
    /// (docs/security.md); 0 keeps root's uid, without capabilities.
    pub vmm_uid: u32,
    pub vmm_gid: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            vmm: "/usr/local/bin/hearth-vmm".into(),
            kernel: "/usr/local/share/hearth/vmlinux".into(),
            initramfs: "/usr/local/share/hearth/agent.cpio".into(),
            virtiofsd: None,
            memory_mib: 1024,
            vcpus: 2,
            extra_cmdline: String::new(),
            idle_timeout_secs: 30,
            agent_timeout_secs: 30,
            mode: VmMode::Shared,
            log_level: "info".into(),
            state_dir: "/run/hearth/vms".into(),
            console_log_max_kib: 32 << 10,
            disk_slots: 4,
            disk_images_dir: "/var/lib/hearth/disks".into(),
            overlay_roots: crate::layers::OverlayRoots::Erofs,
            layer_images_dir: "/var/lib/hearth/layers".into(),
            layer_images_kept: 32,
            network: crate::network::NetMode::Nat,
            network_subnet: "10.89.0.0/24".into(),
            network_bridge: "hearth0".into(),
            localhost_forwarding: true,
            container_nics: 4,
            vmm_memory_overhead_mib: 256,
            vmm_pids_max: 512,
            // nobody and nogroup: no file on the host is theirs to write,
            // and the VMM reaches no file by path outside its jail anyway.
            vmm_uid: 65534,
            vmm_gid: 65534,
        }
    }
}

impl Config {
    /// The configuration in force: `$HEARTH_CONFIG`, else the default path,
    /// else the defaults. (A runtime option's `ConfigPath` may replace it
    /// later, when the first container is created: see task.rs.)
    pub fn load() -> anyhow::Result<Config> {
        match std::env::var_os("HEARTH_CONFIG") {
            Some(p) => Self::from_file(Path::new(&p)),
            None if Path::new(DEFAULT_PATH).exists() => Self::from_file(Path::new(DEFAULT_PATH)),
            None => Ok(Config::default()),
        }
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading hearth's config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("hearth's config {} is not valid: {e}", path.display()))
    }

    /// Refuses a configuration that cannot boot a VM, naming the fix.
    pub fn check(&self) -> anyhow::Result<()> {
        for (what, p) in [("hearth-vmm", &self.vmm), ("kernel", &self.kernel), ("initramfs", &self.initramfs)] {
            if !p.is_file() {
                anyhow::bail!(
                    "the {what} {} does not exist: run `cargo xtask setup` (which installs it), or set `{}` in {DEFAULT_PATH}",
                    p.display(),
                    match what {
                        "hearth-vmm" => "vmm",
                        other => other,
                    }
                );
            }
        }
        if self.console_log_max_kib < 4 {
            anyhow::bail!("console_log_max_kib must be at least 4 (have {})", self.console_log_max_kib);
        }
        if self.disk_slots > 12 {
            anyhow::bail!(
                "disk_slots must be at most 12 (have {}): the VM has 19 interrupt lines for all its devices",
                self.disk_slots
            );
        }
        // 19 interrupt lines: vsock, two shares, the balloon and the VM's
        // own NIC take five.
        if self.disk_slots as u32 + self.container_nics as u32 > 14 {
            anyhow::bail!(
                "disk_slots ({}) and container_nics ({}) add up to more than 14: the VM has 19 interrupt lines for all its devices",
                self.disk_slots,
                self.container_nics
            );
        }
        if self.network == crate::network::NetMode::Nat {
            crate::network::Subnet::parse(&self.network_subnet)?;
            hearth_vmm::devices::virtio::tap::check_name(&self.network_bridge)
                .map_err(|e| anyhow::anyhow!("network_bridge: {e}"))?;
        }
        if (self.vmm_uid == 0) != (self.vmm_gid == 0) {
            anyhow::bail!(
                "vmm_uid ({}) and vmm_gid ({}) must both be 0 (hearth-vmm keeps root's ids) or both not",
                self.vmm_uid,
                self.vmm_gid
            );
        }
        if self.vmm_pids_max < 64 {
            anyhow::bail!(
                "vmm_pids_max must be at least 64 (have {}): hearth-vmm runs a thread per vCPU and device, virtiofsd a few per share",
                self.vmm_pids_max
            );
        }
        if self.memory_mib < 128 || self.vcpus == 0 {
            anyhow::bail!(
                "memory_mib must be at least 128 and vcpus at least 1 (have {} and {})",
                self.memory_mib,
                self.vcpus
            );
        }
        Ok(())
    }
}

/// The `ConfigPath` of containerd's generic runtime options
/// (`runtimeoptions.v1.Options`, which `ctr run --runtime-config-path` and the
/// CRI's `[...runtimes.hearth.options] ConfigPath` send with a create), if
/// the options are of that type and name one.
pub fn config_path_from_options(type_url: &str, value: &[u8]) -> Option<PathBuf> {
    use containerd_shim::protos::protobuf::CodedInputStream;
    if !type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    // message Options { string type_url = 1; string config_path = 2; }
    let mut input = CodedInputStream::from_bytes(value);
    let mut path = None;
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        match tag {
            0x12 => path = input.read_string().ok(),
            _ => containerd_shim::protos::protobuf::rt::skip_field_for_tag(tag, &mut input).ok()?,
        }
    }
    path.filter(|p| !p.is_empty()).map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c: Config = toml::from_str("memory_mib = 512\nmode = \"per-pod\"\n").unwrap();
        assert_eq!(c.memory_mib, 512);
        assert_eq!(c.mode, VmMode::PerPod);
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.idle_timeout_secs, 30);
    }

    #[test]
    fn config_path_is_read_from_runtime_options() {
        // type_url = "x" (field 1), config_path = "/etc/h.toml" (field 2).
        let mut v = vec![0x0a, 1, b'x', 0x12, 11];
        v.extend_from_slice(b"/etc/h.toml");
        assert_eq!(config_path_from_options("runtimeoptions.v1.Options", &v), Some(PathBuf::from("/etc/h.toml")));
        assert_eq!(config_path_from_options("containerd.runc.v1.Options", &v), None);
        assert_eq!(config_path_from_options("runtimeoptions.v1.Options", &[0x0a, 1, b'x']), None);
        assert_eq!(config_path_from_options("runtimeoptions.v1.Options", &[0x12, 40, b'/']), None);
    }

    #[test]
    fn unknown_keys_and_missing_files_are_named() {
        let e = toml::from_str::<Config>("memory = 5\n").unwrap_err().to_string();
        assert!(e.contains("memory"), "{e}");
        let c = Config { kernel: "/nonexistent/vmlinux".into(), vmm: "/bin/sh".into(), ..Default::default() };
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/vmlinux") && e.contains("cargo xtask setup"), "{e}");
    }
}
