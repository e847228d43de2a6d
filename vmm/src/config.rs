//! What a VM is made of, as given on the command line (or, later, by the shim).

use std::path::PathBuf;

pub use crate::devices::virtio::balloon::BalloonConfig;
pub use crate::devices::virtio::block::DiskConfig;
pub use crate::devices::virtio::fs::FsConfig;
pub use crate::devices::virtio::vsock::VsockConfig;

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
    /// Where a console log file is rotated (see `console_log.rs`).
    pub console_max_bytes: u64,
    /// virtio-blk disks, in order: the first is /dev/vda in the guest.
    pub disks: Vec<DiskConfig>,
    /// Empty virtio-blk devices after `disks`, to which the control socket
    /// attaches images while the VM runs.
    pub disk_slots: u8,
    /// The control socket (see [`crate::api`]).
    pub api_socket: Option<PathBuf>,
    /// virtio-net devices over host taps, in order: the first is eth0 in the guest.
    pub nets: Vec<NetConfig>,
    /// virtio-net devices after `nets` with no tap and their link down, to
    /// which the control socket attaches taps while the VM runs.
    pub nic_slots: u8,
    /// A virtio-vsock device and the host socket behind it.
    pub vsock: Option<VsockConfig>,
    /// virtio-fs shares (vhost-user, served by virtiofsd).
    pub shares: Vec<FsConfig>,
    /// A virtio-balloon device (free page reporting gives memory the guest
    /// frees back to the host); off unless given.
    pub balloon: Option<BalloonConfig>,
    /// Jail the VMM in this directory once set up (see [`crate::jail`]):
    /// the vsock socket and the console log must be directly inside it.
    pub jail: Option<PathBuf>,
    /// The unprivileged user and group the jailed VMM becomes (see
    /// [`crate::jail`]); root, without capabilities, when not given.
    pub jail_ids: Option<crate::jail::Ids>,
}

/// A virtio-net device: the host tap behind it and the guest's MAC address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Name of the host tap interface, attached to if it exists, else created.
    pub tap: String,
    pub mac: [u8; 6],
}

impl NetConfig {
    /// Parses `tap=NAME[,mac=AA:BB:CC:DD:EE:FF]`. Without `mac`, the MAC is
    /// [`NetConfig::default_mac`] of the tap's name.
    pub fn parse(s: &str) -> Result<NetConfig, String> {
        const USAGE: &str = "use tap=NAME[,mac=AA:BB:CC:DD:EE:FF]";
        let mut tap = None;
        let mut mac = None;
        for opt in s.split(',') {
            let (key, value) = opt.split_once('=').ok_or_else(|| format!("{opt:?} is not KEY=VALUE: {USAGE}"))?;
            match key {
                "tap" if tap.is_none() => {
                    crate::devices::virtio::tap::check_name(value)?;
                    tap = Some(value.to_string());
                }
                "mac" if mac.is_none() => mac = Some(parse_mac(value)?),
                "tap" | "mac" => return Err(format!("{key} is given twice: {USAGE}")),
                other => return Err(format!("unknown network option {other:?}: {USAGE}")),
            }
        }
        let tap = tap.ok_or_else(|| format!("a network device needs a tap: {USAGE}"))?;
        let mac = mac.unwrap_or_else(|| Self::default_mac(&tap));
        Ok(NetConfig { tap, mac })
    }

    /// A locally administered unicast MAC, 52:54:00:xx:xx:xx, the last three
    /// bytes a hash (FNV-1a) of the tap's name: stable across runs and builds,
    /// different for different taps.
    pub fn default_mac(tap: &str) -> [u8; 6] {
        let mut h: u32 = 0x811c_9dc5;
        for b in tap.bytes() {
            h = (h ^ b as u32).wrapping_mul(0x0100_0193);
        }
        let [a, b, c, _] = h.to_be_bytes();
        [0x52, 0x54, 0x00, a, b, c]
    }
}

/// Parses `AA:BB:CC:DD:EE:FF` (hex, either case); refuses multicast and
/// all-zero addresses, which no NIC may have.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("{s:?} is not a MAC address like 52:54:00:12:34:56");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next().filter(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit())).ok_or_else(bad)?;
        *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{s} is a multicast address: a NIC needs a unicast one (even first byte)"));
    }
    if mac == [0; 6] {
        return Err("00:00:00:00:00:00 is not a usable MAC address".into());
    }
    Ok(mac)
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
            console_max_bytes: crate::devices::legacy::console_log::MAX_BYTES,
            disks: Vec::new(),
            disk_slots: 0,
            api_socket: None,
            nets: Vec::new(),
            nic_slots: 0,
            vsock: None,
            shares: Vec::new(),
            balloon: None,
            jail: None,
            jail_ids: None,
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

    #[test]
    fn net_options() {
        let n = NetConfig::parse("tap=hearth0,mac=02:aA:bb:cc:dd:0f").unwrap();
        assert_eq!(n, NetConfig { tap: "hearth0".into(), mac: [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x0f] });
        // Options in any order.
        assert_eq!(NetConfig::parse("mac=02:aa:bb:cc:dd:0f,tap=hearth0").unwrap(), n);
        for bad in [
            "",
            "hearth0",
            "mac=02:aa:bb:cc:dd:0f",
            "tap=",
            "tap=a/b",
            "tap=this-name-is-too-long",
            "tap=a,tap=b",
            "tap=a,speed=10",
            "tap=a,mac=02:aa:bb:cc:dd",
            "tap=a,mac=02:aa:bb:cc:dd:0f:00",
            "tap=a,mac=02:aa:bb:cc:dd:0g",
            "tap=a,mac=2:aa:bb:cc:dd:0f",
            "tap=a,mac=+2:aa:bb:cc:dd:0f",
            "tap=a,mac=01:00:5e:00:00:01",
            "tap=a,mac=00:00:00:00:00:00",
        ] {
            assert!(NetConfig::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn default_mac_is_local_unicast_stable_and_per_tap() {
        let a = NetConfig::parse("tap=hearth0").unwrap().mac;
        assert_eq!(a, NetConfig::default_mac("hearth0"));
        assert_eq!(a[..3], [0x52, 0x54, 0x00]);
        assert_eq!(a[0] & 0b11, 0b10, "locally administered, unicast");
        assert_ne!(a, NetConfig::default_mac("hearth1"));
        // Fixed: FNV-1a of "hearth0" is 0x16c3bd33 (a change here would
        // change guests' MAC addresses).
        assert_eq!(a, [0x52, 0x54, 0x00, 0x16, 0xc3, 0xbd]);
    }
}
