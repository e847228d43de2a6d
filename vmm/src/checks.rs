//! Start-up checks: each problem a user can cause or meet on a host is found
//! here, before any VM exists, and explained with what to do about it.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::arch::memory::MIN_MEMORY_MIB;
use crate::arch::mptable::MAX_CPUS;
use crate::config::VmConfig;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{dev} does not exist: KVM is not available on this host. Enable hardware \
         virtualization (VT-x/AMD-V) and load kvm_intel or kvm_amd, or run the suites \
         inside hearth's test host (`cargo xtask e2e <suite>` does this by itself)"
    )]
    NoKvm { dev: PathBuf },
    #[error(
        "permission denied opening {dev}: add your user to the group that owns it \
         (usually `kvm`: `sudo usermod -aG kvm $USER`, then log in again) or run as root"
    )]
    KvmPermission { dev: PathBuf },
    #[error("cannot open {dev}: {source}")]
    KvmOpen { dev: PathBuf, source: std::io::Error },
    #[error(
        "this host's KVM is PVM (module kvm_pvm is loaded, no kvm_intel/kvm_amd): it runs \
         only guest kernels built as PVM guests, and a standard kernel such as hearth's \
         dies early in boot with an emulation failure. Run on a host with VT-x/AMD-V, or \
         inside hearth's test host (`cargo xtask e2e boot` boots one under QEMU with \
         emulated AMD SVM, where this VMM runs unchanged)"
    )]
    PvmOnly,
    #[error("the {what} {path} does not exist; build it with `cargo xtask setup` or pass another path")]
    Missing { what: &'static str, path: PathBuf },
    #[error("the {what} {path} cannot be read: {source}")]
    Unreadable { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the {what} {path} is not a regular file")]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("{mib} MiB of guest memory is too little: the guest needs at least {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall { mib: u64 },
    #[error("{mib} MiB of guest memory is more than this host has ({host_mib} MiB)")]
    MemoryTooBig { mib: u64, host_mib: u64 },
    #[error("{0} vCPUs requested: hearth's guest supports 1 to {MAX_CPUS}")]
    VcpuCount(u8),
}

/// Where the checks look; tests point these at fake trees.
pub struct Host {
    pub kvm_dev: PathBuf,
    pub sys_module: PathBuf,
    pub meminfo: PathBuf,
}

impl Default for Host {
    fn default() -> Self {
        Host { kvm_dev: "/dev/kvm".into(), sys_module: "/sys/module".into(), meminfo: "/proc/meminfo".into() }
    }
}

impl Host {
    /// True when the only KVM vendor module is PVM (see design.md, fact 1).
    pub fn is_pvm_only(&self) -> bool {
        self.sys_module.join("kvm_pvm").exists()
            && !self.sys_module.join("kvm_intel").exists()
            && !self.sys_module.join("kvm_amd").exists()
    }

    pub fn check_kvm(&self) -> Result<File, Error> {
        if self.is_pvm_only() {
            return Err(Error::PvmOnly);
        }
        let dev = self.kvm_dev.clone();
        OpenOptions::new().read(true).write(true).open(&dev).map_err(|source| match source.kind() {
            ErrorKind::NotFound => Error::NoKvm { dev },
            ErrorKind::PermissionDenied => Error::KvmPermission { dev },
            _ => Error::KvmOpen { dev, source },
        })
    }

    fn memtotal_mib(&self) -> Option<u64> {
        let text = std::fs::read_to_string(&self.meminfo).ok()?;
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024)
    }

    /// Checks the configuration against this host, everything but KVM itself.
    pub fn check_config(&self, config: &VmConfig) -> Result<(), Error> {
        check_file("kernel", &config.kernel)?;
        if let Some(initramfs) = &config.initramfs {
            check_file("initramfs", initramfs)?;
        }
        if config.memory_mib < MIN_MEMORY_MIB {
            return Err(Error::MemoryTooSmall { mib: config.memory_mib });
        }
        if let Some(host_mib) = self.memtotal_mib() {
            if config.memory_mib > host_mib {
                return Err(Error::MemoryTooBig { mib: config.memory_mib, host_mib });
            }
        }
        if config.vcpus == 0 || config.vcpus > MAX_CPUS {
            return Err(Error::VcpuCount(config.vcpus));
        }
        Ok(())
    }
}

fn check_file(what: &'static str, path: &Path) -> Result<(), Error> {
    let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
        ErrorKind::NotFound => Error::Missing { what, path: path.into() },
        _ => Error::Unreadable { what, path: path.into(), source },
    })?;
    if !meta.is_file() {
        return Err(Error::NotAFile { what, path: path.into() });
    }
    File::open(path).map_err(|source| Error::Unreadable { what, path: path.into(), source })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tree(PathBuf);
    impl Tree {
        fn new(name: &str) -> Tree {
            let p = std::env::temp_dir().join(format!("hearth-checks-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(p.join("module")).unwrap();
            std::fs::write(p.join("meminfo"), "MemTotal:        2097152 kB\nMemFree: 1 kB\n").unwrap();
            std::fs::write(p.join("vmlinux"), b"kernel").unwrap();
            Tree(p)
        }
        fn host(&self) -> Host {
            Host { kvm_dev: self.0.join("kvm"), sys_module: self.0.join("module"), meminfo: self.0.join("meminfo") }
        }
    }
    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn pvm_only_host_is_named_as_such() {
        let t = Tree::new("pvm");
        std::fs::create_dir(t.0.join("module/kvm_pvm")).unwrap();
        let err = t.host().check_kvm().unwrap_err();
        assert!(matches!(err, Error::PvmOnly));
        assert!(err.to_string().contains("test host"));
        // kvm_amd beside it means hardware virtualization is there too.
        std::fs::create_dir(t.0.join("module/kvm_amd")).unwrap();
        assert!(!t.host().is_pvm_only());
    }

    #[test]
    fn missing_kvm_device() {
        let t = Tree::new("nokvm");
        let err = t.host().check_kvm().unwrap_err();
        assert!(matches!(err, Error::NoKvm { .. }), "{err}");
    }

    #[test]
    fn config_errors_name_the_problem() {
        let t = Tree::new("config");
        let host = t.host();
        let mut c = VmConfig::new(t.0.join("vmlinux"));
        host.check_config(&c).unwrap();

        c.memory_mib = 16;
        assert!(matches!(host.check_config(&c), Err(Error::MemoryTooSmall { mib: 16 })));
        c.memory_mib = 4096;
        assert!(matches!(host.check_config(&c), Err(Error::MemoryTooBig { mib: 4096, host_mib: 2048 })));
        c.memory_mib = 256;
        c.vcpus = 0;
        assert!(matches!(host.check_config(&c), Err(Error::VcpuCount(0))));
        c.vcpus = 65;
        assert!(matches!(host.check_config(&c), Err(Error::VcpuCount(65))));
        c.vcpus = 2;
        c.initramfs = Some(t.0.join("nope.cpio"));
        let err = host.check_config(&c).unwrap_err();
        assert!(matches!(err, Error::Missing { what: "initramfs", .. }));
        assert!(err.to_string().contains("cargo xtask setup"));
        c.initramfs = Some(t.0.clone());
        assert!(matches!(host.check_config(&c), Err(Error::NotAFile { .. })));
    }
}
