//! The VM's own network: NAT from the utility VM to the host's network, as
//! WSL's default and Docker's bridge give (docs/networking.md).
//!
//! Host side, set up when a VM boots:
//! - a bridge (`network_bridge`, default `hearth0`) holding the subnet's
//!   first address, shared by every VM of every shim;
//! - an nftables table `ip hearth` that masquerades the subnet's traffic
//!   leaving it and accepts forwarding to and from the bridge; IPv4
//!   forwarding on;
//! - per VM, a tap on the bridge that the shim creates and hands to
//!   hearth-vmm through its control socket (NIC slot 0). The shim closes
//!   its own descriptor, so the tap lives exactly as long as hearth-vmm
//!   holds it: a VMM that dies in any way takes its tap with it;
//! - per VM, an address of the subnet, leased by holding a lock on
//!   `/run/hearth/net/leases/ADDR` for the VM's life: a shim that dies
//!   releases its leases with its descriptors, so nothing is handed out
//!   twice and nothing leaks.
//!
//! The last VM to go removes the bridge and the table and puts forwarding
//! back as it found it, under `/run/hearth/net/lock`.
//!
//! Guest side: `hearth.ip=ADDR/PREFIX hearth.gw=GATEWAY hearth.dns=NS,..`
//! on the kernel command line; the agent configures eth0 and writes the
//! VM's /etc/resolv.conf (guest-runtime/src/pid1/network.rs).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

/// Where leases and the set-up lock live.
pub const RUN_DIR: &str = "/run/hearth/net";
/// The nftables table (family ip) holding hearth's rules.
pub const NFT_TABLE: &str = "hearth";
/// What the VM calls its own NIC on the control socket.
const NIC_ID: &str = "vm";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetMode {
    /// NAT to the host's network through a bridge and a tap per VM.
    Nat,
    /// No network device: the VM has loopback only.
    Off,
}

/// An IPv4 subnet, `ADDR/PREFIX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    pub fn parse(s: &str) -> Result<Subnet> {
        let bad = || anyhow!("network_subnet = {s:?} is not an IPv4 subnet such as \"10.89.0.0/24\"");
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if !(16..=29).contains(&prefix) {
            bail!("network_subnet = {s:?}: use a prefix from /16 to /29 (room for the bridge and a VM or more)");
        }
        let mask = u32::MAX << (32 - prefix);
        if u32::from(addr) & !mask != 0 {
            bail!(
                "network_subnet = {s:?} has host bits set: did you mean {}/{prefix}?",
                Ipv4Addr::from(u32::from(addr) & mask)
            );
        }
        Ok(Subnet { base: addr, prefix })
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.base)
    }

    /// The bridge's address: the subnet's first.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }

    /// The addresses VMs may get: after the gateway, before broadcast.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.base) + 2;
        let last = u32::from(self.base) | !self.mask();
        (first..last).map(Ipv4Addr::from)
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// One VM's network: its leased address, its resolvers and its tap's name.
pub struct VmNetwork {
    subnet: Subnet,
    bridge: String,
    pub addr: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub tap: String,
    /// Held (locked) for the VM's life: the lease.
    lease: Option<File>,
    lease_path: PathBuf,
}

impl VmNetwork {
    /// Leases an address for the VM named `vm` (its directory's name),
    /// before it boots. None when the network is off.
    pub fn reserve(mode: NetMode, subnet: &str, bridge: &str, vm: &str) -> Result<Option<VmNetwork>> {
        if mode == NetMode::Off {
            return Ok(None);
        }
        let subnet = Subnet::parse(subnet)?;
        check_bridge_name(bridge)?;
        // Under the lock: a teardown may be freeing stale leases.
        let _lock = global_lock()?;
        let leases = Path::new(RUN_DIR).join("leases");
        std::fs::create_dir_all(&leases).with_context(|| format!("creating {}", leases.display()))?;
        for addr in subnet.hosts() {
            let path = leases.join(addr.to_string());
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("opening the lease {}", path.display()))?;
            if try_lock(&file) {
                use std::io::Write;
                let _ = file.set_len(0);
                let _ = writeln!(&file, "{vm}");
                return Ok(Some(VmNetwork {
                    subnet,
                    bridge: bridge.to_string(),
                    addr,
                    dns: host_resolvers(),
                    tap: tap_name(vm),
                    lease: Some(file),
                    lease_path: path,
                }));
            }
        }
        bail!(
            "every address of network_subnet {subnet} is leased to a running VM: give the VMs a larger \
             network_subnet in the shim's config"
        )
    }

    /// `ADDR/PREFIX via BRIDGE`, for `hearth status`.
    pub fn summary(&self) -> String {
        format!("{}/{} via {}", self.addr, self.subnet.prefix, self.bridge)
    }

    /// The kernel command line words that configure the guest's eth0.
    pub fn cmdline(&self) -> String {
        let mut s = format!("hearth.ip={}/{} hearth.gw={}", self.addr, self.subnet.prefix, self.subnet.gateway());
        if !self.dns.is_empty() {
            let dns: Vec<String> = self.dns.iter().map(|a| a.to_string()).collect();
            s.push_str(&format!(" hearth.dns={}", dns.join(",")));
        }
        s
    }

    /// Once the VM runs: the bridge and NAT rules (made if missing), the
    /// VM's tap on the bridge, handed to hearth-vmm's NIC slot.
    pub fn attach(&self, api: &hearth_vmm::api::Client) -> Result<()> {
        let _lock = global_lock()?;
        ensure_host_side(&self.subnet, &self.bridge)?;
        let tap = hearth_vmm::devices::virtio::tap::Tap::open(&self.tap)
            .with_context(|| format!("creating the VM's tap {}", self.tap))?;
        ip(&["link", "set", &self.tap, "master", &self.bridge, "up"])?;
        api.attach_nic(&tap, NIC_ID).map_err(|e| anyhow!("handing the tap {} to hearth-vmm: {e}", self.tap))?;
        // hearth-vmm holds it now; when it goes, so does the tap.
        drop(tap);
        Ok(())
    }

    /// After the VM ended: its lease goes, and with the last VM the bridge,
    /// the rules and the forwarding setting we changed.
    pub fn release(&mut self) {
        let Ok(_lock) = global_lock() else { return };
        // The tap went with hearth-vmm; one left (its delete raced) goes now.
        if Path::new("/sys/class/net").join(&self.tap).exists() {
            let _ = ip(&["link", "del", &self.tap]);
        }
        if self.lease.take().is_some() {
            let _ = std::fs::remove_file(&self.lease_path);
        }
        if let Err(e) = teardown_if_unused(&self.bridge) {
            log::warn!("removing the VM network's bridge and rules: {e:#}");
        }
    }
}

impl Drop for VmNetwork {
    fn drop(&mut self) {
        if self.lease.is_some() {
            self.release();
        }
    }
}

/// After a shim died: with no VM left holding a lease, the bridge `bridge`,
/// the NAT table and our forwarding setting go (its VMs' taps went with
/// them). containerd runs the shim's `delete` for a dead shim's containers,
/// which calls this.
pub fn teardown_stale(bridge: &str) {
    if !Path::new(RUN_DIR).exists() {
        return;
    }
    let result = global_lock().and_then(|_lock| teardown_if_unused(bridge));
    if let Err(e) = result {
        log::warn!("removing a dead shim's VM network: {e:#}");
    }
}

/// A tap name from the VM's name: `hth` and 8 hex digits (interface names
/// are at most 15 bytes).
pub fn tap_name(vm: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    vm.hash(&mut h);
    format!("hth{:08x}", h.finish() as u32)
}

fn check_bridge_name(name: &str) -> Result<()> {
    hearth_vmm::devices::virtio::tap::check_name(name).map_err(|e| anyhow!("network_bridge: {e}"))
}

/// The host's IPv4 resolvers that a guest can reach: systemd-resolved's
/// upstream list where it runs (its stub at 127.0.0.53 is the host's own
/// loopback), else /etc/resolv.conf; loopback resolvers are left out.
pub fn host_resolvers() -> Vec<Ipv4Addr> {
    for path in ["/run/systemd/resolve/resolv.conf", "/etc/resolv.conf"] {
        let Ok(text) = std::fs::read_to_string(path) else { continue };
        let found = parse_resolvers(&text);
        if !found.is_empty() {
            return found;
        }
    }
    log::warn!("the host has no IPv4 resolver a VM can reach: the VM's names will not resolve");
    Vec::new()
}

pub fn parse_resolvers(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback() && !a.is_unspecified())
        .take(3)
        .collect()
}

fn try_lock(f: &File) -> bool {
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Serializes making and removing the host side across shims.
fn global_lock() -> Result<File> {
    std::fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
    let path = Path::new(RUN_DIR).join("lock");
    let f = File::options().create(true).truncate(false).write(true).open(&path)?;
    // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("locking {}: {}", path.display(), std::io::Error::last_os_error());
    }
    Ok(f)
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = crate::tool::output(cmd).with_context(|| {
        format!(
            "running {:?} (hearth's VM network needs iproute2 and nftables: `apt-get install iproute2 nftables`)",
            cmd.get_program()
        )
    })?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

const FORWARDING: &str = "/proc/sys/net/ipv4/ip_forward";
/// Present while hearth turned IPv4 forwarding on (it was off before).
fn forwarding_marker() -> PathBuf {
    Path::new(RUN_DIR).join("forwarding-was-off")
}

/// The bridge with the gateway's address, the NAT table, forwarding on.
fn ensure_host_side(subnet: &Subnet, bridge: &str) -> Result<()> {
    // The subnet must not be in use on another interface: routing would
    // send the VMs' traffic, or the host's, the wrong way.
    for line in ip(&["-4", "-o", "addr", "show"])?.lines() {
        let mut w = line.split_whitespace();
        let (Some(_), Some(dev), Some("inet"), Some(cidr)) = (w.next(), w.next(), w.next(), w.next()) else { continue };
        let Some(a) = cidr.split('/').next().and_then(|a| a.parse::<Ipv4Addr>().ok()) else { continue };
        if dev != bridge && subnet.contains(a) {
            bail!(
                "network_subnet {subnet} is already used on this host by {dev} ({cidr}): choose another \
                 network_subnet in the shim's config, or network = \"off\""
            );
        }
    }
    if !Path::new("/sys/class/net").join(bridge).exists() {
        ip(&["link", "add", bridge, "type", "bridge"])
            .context("creating the VM network's bridge (is the bridge module available? `modprobe bridge`)")?;
    }
    let cidr = format!("{}/{}", subnet.gateway(), subnet.prefix);
    if !ip(&["-4", "-o", "addr", "show", "dev", bridge])?.contains(&format!(" {cidr} ")) {
        ip(&["addr", "add", &cidr, "dev", bridge])?;
    }
    ip(&["link", "set", bridge, "up"])?;
    // One atomic transaction: the table made (so that deleting it cannot
    // fail), deleted, and made anew with the current rules.
    let rules = format!(
        "table ip {NFT_TABLE} {{}}\n\
         delete table ip {NFT_TABLE}\n\
         table ip {NFT_TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {subnet} ip daddr != {subnet} masquerade\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{bridge}\" accept\n\
         \t\toifname \"{bridge}\" ct state established,related accept\n\
         \t}}\n\
         }}\n"
    );
    let file = Path::new(RUN_DIR).join("rules.nft");
    std::fs::write(&file, &rules).with_context(|| format!("writing {}", file.display()))?;
    let out = crate::tool::output(Command::new("nft").arg("-f").arg(&file))
        .context("running nft (install nftables: `apt-get install nftables`)")?;
    let _ = std::fs::remove_file(&file);
    if !out.status.success() {
        bail!(
            "nft could not load hearth's NAT rules: {} (are nf_tables and nft_masq available? `modprobe nft_masq`)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let forwarding = std::fs::read_to_string(FORWARDING).unwrap_or_default();
    if forwarding.trim() != "1" {
        std::fs::write(FORWARDING, "1").context("turning IPv4 forwarding on")?;
        let _ = std::fs::write(forwarding_marker(), "");
    }
    Ok(())
}

/// With no lease held by any VM: the bridge, the table and our forwarding
/// setting go. Call with the global lock held.
fn teardown_if_unused(bridge: &str) -> Result<()> {
    let leases = Path::new(RUN_DIR).join("leases");
    for e in std::fs::read_dir(&leases).into_iter().flatten().flatten() {
        let Ok(f) = File::options().write(true).open(e.path()) else { continue };
        if !try_lock(&f) {
            return Ok(()); // a VM still runs
        }
        // A lease no one holds (its shim died): free it.
        let _ = std::fs::remove_file(e.path());
    }
    // The bridge last: its going is what says the rest is gone.
    let listed = run(Command::new("nft").args(["list", "tables", "ip"])).unwrap_or_default();
    if listed.lines().any(|l| l.trim() == format!("table ip {NFT_TABLE}")) {
        run(Command::new("nft").args(["delete", "table", "ip", NFT_TABLE]))?;
    }
    if forwarding_marker().exists() {
        std::fs::write(FORWARDING, "0").context("turning IPv4 forwarding back off")?;
        let _ = std::fs::remove_file(forwarding_marker());
    }
    if Path::new("/sys/class/net").join(bridge).exists() {
        ip(&["link", "del", bridge])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_give_the_gateway_and_the_vm_addresses() {
        let s = Subnet::parse("10.89.0.0/24").unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 89, 0, 1));
        let hosts: Vec<_> = s.hosts().collect();
        assert_eq!(hosts.first(), Some(&Ipv4Addr::new(10, 89, 0, 2)));
        assert_eq!(hosts.last(), Some(&Ipv4Addr::new(10, 89, 0, 254)));
        assert!(s.contains(Ipv4Addr::new(10, 89, 0, 77)) && !s.contains(Ipv4Addr::new(10, 89, 1, 1)));
        let small = Subnet::parse("192.168.5.8/29").unwrap();
        assert_eq!(small.hosts().count(), 5);
        for bad in ["10.89.0.0", "10.89.0.1/24", "10.89.0.0/8", "10.89.0.0/30", "x/24"] {
            assert!(Subnet::parse(bad).is_err(), "{bad}");
        }
        assert!(Subnet::parse("10.89.0.1/24").unwrap_err().to_string().contains("10.89.0.0/24"));
    }

    #[test]
    fn resolvers_skip_loopback_and_junk() {
        let text =
            "# x\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver ::1\nnameserver 1.1.1.1\nsearch a\n";
        assert_eq!(parse_resolvers(text), vec![Ipv4Addr::new(10, 255, 255, 53), Ipv4Addr::new(1, 1, 1, 1)]);
    }

    #[test]
    fn tap_names_fit_an_interface_name_and_differ_per_vm() {
        let a = tap_name("default-1234");
        assert!(a.len() <= 15 && a.starts_with("hth"), "{a}");
        assert_ne!(a, tap_name("default-1235"));
        assert_eq!(a, tap_name("default-1234"));
    }
}
