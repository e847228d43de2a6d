//! Container networking from the network namespace its caller made (CNI
//! from nerdctl or the CRI, Docker's bridge network), as Kata's shim does
//! it (docs/networking.md): for each interface there with an address
//! (the veth CNI made), a tap in that same namespace, traffic redirected
//! both ways between the two with tc (an ingress qdisc and a `mirred`
//! filter on each), the tap handed to a NIC slot of hearth-vmm, and the
//! agent told to give the guest NIC the interface's name, MAC, MTU,
//! addresses and routes inside the container's own namespace in the VM.
//! Traffic to the container's address then reaches it as it would reach a
//! runc container, so Docker's `-p`, CNI's portmap and routes on the host
//! work unchanged.
//!
//! The namespace is the caller's (containerd or dockerd made it on the
//! host); nothing the guest says reaches the commands run here.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use hearth_agent_protocol::agent as pb;
use hearth_vmm::devices::virtio::tap::Tap;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// Whether the spec gives the container a network namespace at all (a
/// new one or one by path); without, it shares the VM's.
pub fn has_namespace(spec: &Spec) -> bool {
    let nss = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref());
    nss.is_some_and(|nss| nss.iter().any(|ns| ns.typ() == LinuxNamespaceType::Network))
}

/// Refuses a namespace that is no container's: the host's own, or a
/// hearth-vmm's. Docker's `--network container:NAME` names the other
/// container's namespace by the pid containerd was given, which for a
/// hearth container is its VM's, whose namespace is hearth-vmm's own
/// empty one: mirroring it would leave the container silently offline.
pub fn check_joinable(netns: &Path, vmm_pid: i32) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    let want = std::fs::metadata(netns)
        .map(|m| (m.dev(), m.ino()))
        .with_context(|| format!("the network namespace {} the spec names", netns.display()))?;
    if Some(want) == id("/proc/self/ns/net") {
        bail!("the network namespace {} is the host's own: a hearth container cannot join it", netns.display());
    }
    if Some(want) == id(&format!("/proc/{vmm_pid}/ns/net")) {
        bail!(
            "the network namespace {} is hearth-vmm's (pid {vmm_pid}), which containerd reports as another \
             container's pid: sharing a hearth container's network with another container \
             (Docker's --network container:NAME) is not supported yet; use a user-defined network instead",
            netns.display()
        );
    }
    Ok(())
}

/// The network namespace file the spec asks the container to join.
pub fn requested(spec: &Spec) -> Option<PathBuf> {
    let nss = spec.linux().as_ref()?.namespaces().as_ref()?;
    nss.iter()
        .find(|ns| ns.typ() == LinuxNamespaceType::Network)
        .and_then(|ns| ns.path().clone())
        .filter(|p| !p.as_os_str().is_empty())
}

/// One interface of the caller's namespace, to be mirrored.
#[derive(Debug, PartialEq)]
struct HostInterface {
    name: String,
    mac: String,
    mtu: u32,
    ipv4: Vec<String>,
    /// Global-scope IPv6 addresses (link-local ones the guest makes itself
    /// from the MAC).
    ipv6: Vec<String>,
}

/// The interfaces worth mirroring in `ip -j addr show` output: Ethernet
/// links other than our own taps, with at least one global address.
fn parse_interfaces(json: &str) -> Result<Vec<HostInterface>> {
    let links: Vec<serde_json::Value> = serde_json::from_str(json).context("parsing `ip -j addr show`")?;
    let mut out = Vec::new();
    for l in links {
        let name = l["ifname"].as_str().unwrap_or_default();
        if l["link_type"] != "ether" || name.is_empty() || is_our_tap(name) {
            continue;
        }
        let addresses = |family: &str| -> Vec<String> {
            l["addr_info"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["family"] == family && a["scope"] == "global")
                .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"].as_u64()?)))
                .collect()
        };
        let (ipv4, ipv6) = (addresses("inet"), addresses("inet6"));
        if ipv4.is_empty() && ipv6.is_empty() {
            continue;
        }
        out.push(HostInterface {
            name: name.to_string(),
            mac: l["address"].as_str().unwrap_or_default().to_string(),
            mtu: l["mtu"].as_u64().unwrap_or(1500) as u32,
            ipv4,
            ipv6,
        });
    }
    Ok(out)
}

/// The routes through one interface in `ip -j -4|-6 route show dev X`
/// output, less those the kernel makes itself for each address's subnet
/// (the guest kernel makes them again) and IPv6's link-local ones.
fn parse_routes(json: &str, v6: bool) -> Result<Vec<pb::Route>> {
    // iproute2 prints `[]` for none; older ones print nothing.
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let routes: Vec<serde_json::Value> = serde_json::from_str(json).context("parsing `ip -j route show`")?;
    let mut out = Vec::new();
    for r in routes {
        if r["protocol"] == "kernel" || r["type"].as_str().is_some_and(|t| t != "unicast") {
            continue;
        }
        let Some(dst) = r["dst"].as_str() else { continue };
        if dst.starts_with("fe80:") {
            continue;
        }
        let destination = match (dst, v6) {
            ("default", false) => "0.0.0.0/0".to_string(),
            ("default", true) => "::/0".to_string(),
            (d, _) if d.contains('/') => d.to_string(),
            (d, false) => format!("{d}/32"),
            (d, true) => format!("{d}/128"),
        };
        let gateway = r["gateway"].as_str().unwrap_or_default().to_string();
        out.push(pb::Route { destination, gateway, ..Default::default() });
    }
    Ok(out)
}

/// The permanent neighbour entries in `ip -j neigh show dev X nud
/// permanent` output (a CNI plugin's static ARP or NDP entries).
fn parse_neighbours(json: &str) -> Result<Vec<pb::Neighbour>> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let entries: Vec<serde_json::Value> = serde_json::from_str(json).context("parsing `ip -j neigh show`")?;
    Ok(entries
        .iter()
        .filter(|n| n["state"].as_array().is_some_and(|s| s.iter().any(|s| s == "PERMANENT")))
        .filter_map(|n| {
            Some(pb::Neighbour {
                ip: n["dst"].as_str()?.to_string(),
                mac: n["lladdr"].as_str()?.to_string(),
                ..Default::default()
            })
        })
        .collect())
}

const TAP_PREFIX: &str = "tap";
const TAP_SUFFIX: &str = "_hearth";

fn tap_name(i: usize) -> String {
    format!("{TAP_PREFIX}{i}{TAP_SUFFIX}")
}

fn is_our_tap(name: &str) -> bool {
    name.starts_with(TAP_PREFIX) && name.ends_with(TAP_SUFFIX)
}

/// hearth-vmm's id of a container's `i`th NIC (at most 20 characters).
fn nic_id(container: &str, i: usize) -> String {
    format!("c{:08x}-{i}", crate::shim::fnv1a(container.as_bytes()))
}

/// Runs `args` in the network namespace `netns` (nsenter, util-linux).
fn in_netns(netns: &Path, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display())).arg("--").args(args);
    let out = crate::tool::output(&mut cmd)
        .with_context(|| format!("running {args:?} in {} (needs util-linux and iproute2)", netns.display()))?;
    if !out.status.success() {
        bail!("{} in {}: {}", args.join(" "), netns.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a thread of its own that enters the network namespace `ns`
/// (what `f` makes there, a tap or a socket, stays there), so that the
/// shim's own threads never leave the host's namespace.
pub(crate) fn on_thread_in<T: Send + 'static>(
    ns: std::sync::Arc<std::fs::File>,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace descriptor we hold; it changes only
        // this thread, which ends after f.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(anyhow!("entering the network namespace: {}", std::io::Error::last_os_error()));
        }
        f()
    })
    .join()
    .map_err(|_| anyhow!("a thread in a network namespace panicked"))?
}

/// Opens a tap named `name` inside the network namespace `netns`.
fn open_tap_in(netns: &Path, name: &str) -> Result<Tap> {
    let ns =
        std::fs::File::open(netns).with_context(|| format!("opening the network namespace {}", netns.display()))?;
    let name = name.to_string();
    on_thread_in(ns.into(), move || Tap::open(&name).map_err(|e| anyhow!("creating the tap {name}: {e}")))
}

/// What was set up for one container, undone by [`Mirrored::teardown`].
#[derive(Debug)]
pub struct Mirrored {
    netns: PathBuf,
    /// The namespace, when the shim itself holds it (made for the
    /// container's hooks: hooks.rs).
    _held: Option<crate::hooks::HostNetns>,
    /// (the host interface, its tap, hearth-vmm's NIC id)
    links: Vec<(String, String, String)>,
}

impl Mirrored {
    /// Mirrors the interfaces of `netns` into the VM for container `id`;
    /// returns what to tell the agent. On an error everything made so far
    /// is undone.
    pub fn set_up(
        id: &str,
        netns: &Path,
        held: Option<crate::hooks::HostNetns>,
        api: &hearth_vmm::api::Client,
    ) -> Result<(Mirrored, Vec<pb::Interface>)> {
        let mut m = Mirrored { netns: netns.to_path_buf(), _held: held, links: Vec::new() };
        match m.mirror_all(id, api) {
            Ok(nics) => Ok((m, nics)),
            Err(e) => {
                m.teardown(Some(api));
                Err(e)
            }
        }
    }

    fn mirror_all(&mut self, id: &str, api: &hearth_vmm::api::Client) -> Result<Vec<pb::Interface>> {
        let interfaces = parse_interfaces(&in_netns(&self.netns, &["ip", "-j", "addr", "show"])?)?;
        let mut nics = Vec::new();
        for (i, host) in interfaces.iter().enumerate() {
            let mut routes =
                parse_routes(&in_netns(&self.netns, &["ip", "-j", "-4", "route", "show", "dev", &host.name])?, false)?;
            if !host.ipv6.is_empty() {
                let v6 = in_netns(&self.netns, &["ip", "-j", "-6", "route", "show", "dev", &host.name])?;
                routes.extend(parse_routes(&v6, true)?);
            }
            let neighbours = parse_neighbours(&in_netns(
                &self.netns,
                &["ip", "-j", "neigh", "show", "dev", &host.name, "nud", "permanent"],
            )?)?;
            let tap_name = tap_name(i);
            let tap = open_tap_in(&self.netns, &tap_name)?;
            let nic = nic_id(id, i);
            self.links.push((host.name.clone(), tap_name.clone(), String::new()));
            let mtu = host.mtu.to_string();
            in_netns(&self.netns, &["ip", "link", "set", &tap_name, "mtu", &mtu, "up"])?;
            for (from, to) in [(&host.name, &tap_name), (&tap_name, &host.name)] {
                in_netns(&self.netns, &["tc", "qdisc", "add", "dev", from, "ingress"])?;
                in_netns(
                    &self.netns,
                    &[
                        "tc", "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "matchall", "action",
                        "mirred", "egress", "redirect", "dev", to,
                    ],
                )?;
            }
            let info = api.attach_nic(&tap, &nic).map_err(|e| {
                anyhow!("attaching {}'s tap to the VM: {e} (the shim's config: container_nics)", host.name)
            })?;
            self.links.last_mut().unwrap().2 = nic;
            // hearth-vmm holds the tap now; it goes when the NIC is detached.
            drop(tap);
            nics.push(pb::Interface {
                device_mac: info.mac.clone(),
                name: host.name.clone(),
                mac: host.mac.clone(),
                mtu: host.mtu,
                ipv4: host.ipv4.clone(),
                ipv6: host.ipv6.clone(),
                routes,
                neighbours,
                ..Default::default()
            });
        }
        Ok(nics)
    }

    /// Detaches the NICs from the VM (their taps go with them) and removes
    /// the redirection from the host interfaces. The namespace may be gone
    /// already (CNI's DEL ran first): then so is everything in it.
    pub fn teardown(&self, api: Option<&hearth_vmm::api::Client>) {
        for (host, tap, nic) in &self.links {
            if let (false, Some(api)) = (nic.is_empty(), api) {
                if let Err(e) = api.detach_nic(nic) {
                    log::warn!("detaching NIC {nic} ({host}): {e}");
                }
            }
            if self.netns.exists() {
                let _ = in_netns(&self.netns, &["tc", "qdisc", "del", "dev", host, "ingress"]);
                // Normally gone with hearth-vmm's descriptor.
                let _ = in_netns(&self.netns, &["ip", "link", "del", tap]);
            }
        }
    }

    /// The interfaces mirrored, for logs.
    pub fn names(&self) -> Vec<&str> {
        self.links.iter().map(|(h, _, _)| h.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_namespace_path_comes_from_the_spec() {
        let spec: Spec = serde_json::from_str(
            r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"},
                "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}}"#,
        )
        .unwrap();
        assert_eq!(requested(&spec), Some(PathBuf::from("/var/run/netns/cni-1")));
        let own: Spec = serde_json::from_str(
            r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "linux": {"namespaces": [{"type": "network"}]}}"#,
        )
        .unwrap();
        assert_eq!(requested(&own), None);
    }

    #[test]
    fn interfaces_with_ipv4_are_mirrored_and_loopback_and_our_taps_are_not() {
        let json = r#"[
          {"ifindex":1,"ifname":"lo","mtu":65536,"link_type":"loopback","address":"00:00:00:00:00:00",
           "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
          {"ifindex":2,"ifname":"eth0","mtu":1450,"link_type":"ether","address":"0a:58:0a:58:00:05",
           "addr_info":[{"family":"inet","local":"10.88.0.5","prefixlen":16,"scope":"global"},
                        {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]},
          {"ifindex":3,"ifname":"tap0_hearth","mtu":1450,"link_type":"ether","address":"aa:bb:cc:dd:ee:ff",
           "addr_info":[{"family":"inet","local":"10.9.9.9","prefixlen":24,"scope":"global"}]},
          {"ifindex":4,"ifname":"eth1","mtu":1500,"link_type":"ether","address":"0a:58:0a:58:00:06",
           "addr_info":[{"family":"inet6","local":"fd00::5","prefixlen":64,"scope":"global"}]}
        ]"#;
        assert_eq!(
            parse_interfaces(json).unwrap(),
            vec![
                HostInterface {
                    name: "eth0".into(),
                    mac: "0a:58:0a:58:00:05".into(),
                    mtu: 1450,
                    ipv4: vec!["10.88.0.5/16".into()],
                    ipv6: vec![],
                },
                HostInterface {
                    name: "eth1".into(),
                    mac: "0a:58:0a:58:00:06".into(),
                    mtu: 1500,
                    ipv4: vec![],
                    ipv6: vec!["fd00::5/64".into()],
                }
            ]
        );
        assert!(parse_interfaces("not json").is_err());
    }

    #[test]
    fn routes_keep_what_the_kernel_does_not_make() {
        let json = r#"[
          {"dst":"default","gateway":"10.88.0.1","dev":"eth0","flags":[]},
          {"dst":"10.88.0.0/16","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.88.0.5","flags":[]},
          {"dst":"192.168.7.0/24","gateway":"10.88.0.254","dev":"eth0","flags":[]},
          {"dst":"10.1.2.3","dev":"eth0","scope":"link","flags":[]},
          {"type":"broadcast","dst":"10.88.255.255","dev":"eth0","flags":[]}
        ]"#;
        let r = parse_routes(json, false).unwrap();
        let got: Vec<(&str, &str)> = r.iter().map(|r| (r.destination.as_str(), r.gateway.as_str())).collect();
        assert_eq!(got, vec![("0.0.0.0/0", "10.88.0.1"), ("192.168.7.0/24", "10.88.0.254"), ("10.1.2.3/32", "")]);
    }

    #[test]
    fn ipv6_routes_keep_the_default_and_leave_link_local_out() {
        let json = r#"[
          {"dst":"fd00:77::/64","dev":"eth0","protocol":"kernel","metric":256,"flags":[]},
          {"dst":"fe80::/64","dev":"eth0","protocol":"kernel","metric":256,"flags":[]},
          {"dst":"default","gateway":"fd00:77::1","dev":"eth0","metric":1024,"flags":[]}
        ]"#;
        let r = parse_routes(json, true).unwrap();
        let got: Vec<(&str, &str)> = r.iter().map(|r| (r.destination.as_str(), r.gateway.as_str())).collect();
        assert_eq!(got, vec![("::/0", "fd00:77::1")]);
    }

    #[test]
    fn permanent_neighbours_are_kept_and_learnt_ones_are_not() {
        let json = r#"[
          {"dst":"10.77.0.9","dev":"eth0","lladdr":"0a:58:00:00:00:09","state":["PERMANENT"]},
          {"dst":"10.77.0.1","dev":"eth0","lladdr":"0a:58:00:00:00:01","state":["REACHABLE"]},
          {"dst":"fd00:77::9","dev":"eth0","lladdr":"0a:58:00:00:00:09","state":["PERMANENT"]}
        ]"#;
        let n = parse_neighbours(json).unwrap();
        assert!(parse_neighbours("").unwrap().is_empty() && parse_neighbours("[]").unwrap().is_empty());
        let got: Vec<(&str, &str)> = n.iter().map(|n| (n.ip.as_str(), n.mac.as_str())).collect();
        assert_eq!(got, vec![("10.77.0.9", "0a:58:00:00:00:09"), ("fd00:77::9", "0a:58:00:00:00:09")]);
    }

    #[test]
    fn names_fit_and_are_recognised() {
        assert!(tap_name(15).len() <= 15);
        assert!(is_our_tap(&tap_name(3)));
        assert!(!is_our_tap("tap0"));
        let id = nic_id(&"x".repeat(64), 15);
        assert!(id.len() <= 20, "{id}");
        assert_ne!(nic_id("a", 0), nic_id("b", 0));
    }
}
