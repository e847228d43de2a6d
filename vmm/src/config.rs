//! What a VM is made of, as given on the command line (or, later, by the shim).

use std::path::PathBuf;

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
        }
    }
}
