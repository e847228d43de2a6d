//! What a VM is made of, as given on the command line (or, later, by the shim).

use std::path::PathBuf;

pub use crate::devices::virtio::block::DiskConfig;

/// Options the VMM always puts first on the kernel command line; the user's
/// `--cmdline` follows, so it can override any of them (the kernel takes the
/// last value). `reboot=k` makes a reboot reach our i8042 reset line;
/// `panic=-1` makes a panicking guest reboot at once instead of hanging;
/// `quiet` keeps the boot log short, since every console byte is a VM exit.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

pub const DEFAULT_MEMORY_MIB: u64 = 256;
pub const DEFAULT_VCPUS: u8 = 1;

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Console {
    Stdout,
    File(PathBuf),
    Off,
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub console: Console,
    /// Feed this process's stdin to the guest's serial console.
    pub console_input: bool,
    /// virtio-blk disks, in order: the first is /dev/vda in the guest.
    pub disks: Vec<DiskConfig>,
}

impl DiskConfig {
    /// Parses `PATH[,ro]`.
    pub fn parse(s: &str) -> Result<DiskConfig, String> {
        let mut parts = s.split(',');
        let path = parts.next().filter(|p| !p.is_empty()).ok_or("a disk needs a path: PATH[,ro]")?;
        let mut read_only = false;
        for opt in parts {
            match opt {
                "ro" | "readonly" => read_only = true,
                "rw" => read_only = false,
                other => return Err(format!("unknown disk option {other:?}: use PATH[,ro]")),
            }
        }
        Ok(DiskConfig { path: path.into(), read_only })
    }
}

impl VmConfig {
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initramfs: None,
            cmdline: String::new(),
            memory_mib: DEFAULT_MEMORY_MIB,
            vcpus: DEFAULT_VCPUS,
            console: Console::Stdout,
            console_input: false,
            disks: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options() {
        assert_eq!(DiskConfig::parse("/a.img").unwrap(), DiskConfig { path: "/a.img".into(), read_only: false });
        assert!(DiskConfig::parse("/a.img,ro").unwrap().read_only);
        assert!(DiskConfig::parse("/a.img,fast").unwrap_err().contains("fast"));
        assert!(DiskConfig::parse(",ro").is_err());
    }
}
