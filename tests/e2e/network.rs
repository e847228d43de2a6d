//! e2e suite `network`: the utility VM on the network (docs/networking.md),
//! through containerd and `ctr` with the hearth runtime, in the test host,
//! whose own NIC is on QEMU's user-mode network (this machine's network).
//!
//! What is checked is what a user sees: an address on the VM's subnet, a
//! name that resolves, `apt-get update` against the package registry this
//! machine uses, a server in the VM reached from the host (at the VM's
//! address, and at the host's 127.0.0.1 by localhost forwarding), loopback only in
//! a container with a network namespace of its own; and on the host, the
//! bridge, the tap and the NAT rules while the VM runs, and none of them
//! (nor a lease, nor forwarding turned on) once it is gone.

use std::process::Command;
use std::time::Duration;

use hearth_e2e::cni;
use hearth_e2e::containerd::{text, wait_until, Containerd, IMAGE, RUNTIME};
use hearth_e2e::{Env, Scratch, DEBIAN_IMAGE};

const BRIDGE: &str = "hearth0";

/// Prints the network interfaces backed by a device (a NIC; the kernel's
/// own sit0 and dummy0 are not) whose link is up (the VM's empty NIC slots,
/// kept for containers' interfaces, are down), and those with an IPv4
/// address.
const NICS_AND_ADDRESSES: &str = "echo nics: $(for d in /sys/class/net/*/device; do n=${d%/device}; \
     [ \"$(cat $n/operstate 2>/dev/null)\" = up ] && echo ${n##*/}; done); \
     echo addresses: $(ip -4 -o addr show | awk '{print $2}')";

fn host_out(args: &[&str]) -> String {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The taps on this host that hearth made (`hth` + 8 hex digits).
fn hearth_taps() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("hth") && n.len() == 11)
        .collect()
}

/// What hearth puts in a container's network namespace on the host: its
/// tap (`tap0_hearth`) and the veth's ingress qdisc (the redirection).
const HEARTH_IN_NAMESPACE: &str = "ip -o link show; tc qdisc show dev eth0";

/// `state` (the output of [`HEARTH_IN_NAMESPACE`]) shows neither.
fn assert_as_cni_left(what: &str, state: &str) {
    assert!(
        !state.contains("tap0_hearth") && !state.contains("ingress"),
        "{what}: hearth's tap or qdisc left: {state}"
    );
}

/// Whether this test host reaches the package registry at all: if not, the
/// test fails saying so (rather than passing without having tried).
fn registry_reachable() -> Result<(), String> {
    let o = Command::new("timeout")
        .args(["30", "busybox", "wget", "-q", "-O", "/dev/null", "http://deb.debian.org/debian/dists/bookworm/Release"])
        .output()
        .unwrap();
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "the test host itself cannot fetch from deb.debian.org ({}): the machine's network or QEMU's \
             user-mode network is down, so the VM's NAT cannot be tested",
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// A container sharing the VM's network (`--net-host`, which also gives it
/// the host's resolv.conf) gets an address on the VM's subnet, resolves the
/// package registry's name and runs `apt-get update` against it, and
/// reaches a server on the host's bridge address; the host reaches a server
/// in the VM. A container with a network namespace of its own sees only
/// loopback. While the VM runs the host has the bridge, one tap on it and
/// the NAT table; once it idled out, none of them, no lease, and IPv4
/// forwarding as it was.
#[test]
fn the_vm_reaches_the_network_through_nat_and_leaves_nothing_behind() {
    registry_reachable().unwrap_or_else(|e| panic!("{e}"));
    let env = Env::get();
    let scratch = Scratch::new("network-nat");
    let forwarding_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let c = Containerd::start(&env, &scratch, 3);

    // A server in the VM: the host reaches it at the VM's address.
    c.ok(&["run", "-d", "--net-host", "--runtime", RUNTIME, IMAGE, "server", "hearth-guest-tool", "tcp-echo", "7070"]);
    let addr = c.ok(&["task", "exec", "--exec-id", "a", "server", "sh", "-c", "ip -4 -o addr show eth0"]);
    let vm_ip = addr
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .unwrap_or_else(|| panic!("no IPv4 address on the VM's eth0: {addr:?}"))
        .to_string();
    assert!(vm_ip.starts_with("10.89.0."), "the VM's address is on the default subnet: {vm_ip}");
    let stream = echo_at(&vm_ip, 7070, 50);
    assert_eq!(stream.as_deref(), Some("through the bridge\n"), "the host reaches a server in the VM at {vm_ip}");

    // Localhost forwarding: the same server at the host's 127.0.0.1:7070,
    // a server bound to the VM's loopback only at 127.0.0.1:7071, and a port
    // the host already uses (7072) reported, not taken over.
    let host_own = std::net::TcpListener::bind(("127.0.0.1", 7072)).unwrap();
    c.ok(&["task", "exec", "-d", "--exec-id", "lo", "server", "hearth-guest-tool", "tcp-echo", "7071", "127.0.0.1"]);
    c.ok(&["task", "exec", "-d", "--exec-id", "taken", "server", "hearth-guest-tool", "tcp-echo", "7072"]);
    assert_eq!(echo_at("127.0.0.1", 7070, 60).as_deref(), Some("through the bridge\n"), "127.0.0.1:7070 on the host");
    assert_eq!(echo_at("127.0.0.1", 7071, 60).as_deref(), Some("through the bridge\n"), "a loopback-only server");
    let vm_dir = std::fs::read_dir(&c.vms).unwrap().flatten().next().unwrap().path();
    wait_until("port 7072 reported as taken on the host", Duration::from_secs(30), || {
        std::fs::read_to_string(vm_dir.join("ports.json")).is_ok_and(|p| p.contains("\"taken\":[7072]"))
    });
    let ports = std::fs::read_to_string(vm_dir.join("ports.json")).unwrap();
    assert!(ports.contains("7070") && ports.contains("7071"), "{ports}");
    hearth_e2e::figure(&format!("localhost forwarding: {ports}"));
    drop(host_own);

    // The host side while the VM runs.
    let bridge = host_out(&["ip", "-4", "-o", "addr", "show", "dev", BRIDGE]);
    assert!(bridge.contains("10.89.0.1/24"), "the bridge holds the gateway address: {bridge:?}");
    let taps = hearth_taps();
    assert_eq!(taps.len(), 1, "one tap for the one VM: {taps:?}");
    let master = std::fs::read_link(format!("/sys/class/net/{}/master", taps[0])).unwrap();
    assert!(master.ends_with(BRIDGE), "the tap is a port of the bridge: {master:?}");
    let rules = host_out(&["nft", "list", "table", "ip", "hearth"]);
    assert!(rules.contains("masquerade"), "the NAT rules: {rules}");

    // Out through the NAT: a name, and the package registry with apt.
    c.ok(&["images", "import", &env.debian_image.display().to_string()]);
    let o = c.ctr_within(
        &[
            "run",
            "--rm",
            "--net-host",
            "--runtime",
            RUNTIME,
            DEBIAN_IMAGE,
            "apt",
            "sh",
            "-c",
            // One small suite of the registry (bookworm-updates: its lists are
            // kilobytes), so that the test measures the path, not the emulated
            // download of bookworm's 9 MB package list.
            "getent hosts deb.debian.org && \
         echo 'deb http://deb.debian.org/debian bookworm-updates main' > /tmp/hearth.list && \
         timeout 240 apt-get update -o Dir::Etc::sourcelist=/tmp/hearth.list -o Dir::Etc::sourceparts=- \
             -o Acquire::Retries=2 2>&1 | tail -n 3",
        ],
        Duration::from_secs(600),
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "apt-get update in the VM: {}", text(&o));
    assert!(out.contains("deb.debian.org"), "the name resolved: {out}");
    assert!(out.contains("Reading package lists"), "apt-get update read its lists: {out}");
    assert!(!out.contains("Err:") && !out.contains("Failed to fetch"), "apt-get update failed: {out}");
    hearth_e2e::figure(&format!("apt-get update in the VM through its NAT: ok ({})", out.lines().last().unwrap_or("")));

    // The host's bridge address from inside the VM (the gateway).
    let o = c.run("ping", &["--net-host"], &["sh", "-c", "ping -c 2 -W 10 10.89.0.1 >/dev/null && echo reached"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "reached\n", "{}", text(&o));

    // A network namespace of its own (no path, as runc gives): loopback only.
    let o = c.run("isolated", &[], &["sh", "-c", NICS_AND_ADDRESSES]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "nics:\naddresses: lo\n", "{}", text(&o));

    c.kill_and_remove(&["server"]);
    wait_until("the VM idled out", Duration::from_secs(120), || c.vmm_pids().is_empty());
    wait_until("the VM network torn down", Duration::from_secs(30), || {
        !std::path::Path::new("/sys/class/net").join(BRIDGE).exists()
    });
    assert!(hearth_taps().is_empty(), "taps left: {:?}", hearth_taps());
    let tables = host_out(&["nft", "list", "tables"]);
    assert!(!tables.contains("hearth"), "the NAT table is left: {tables}");
    let leases: Vec<_> =
        std::fs::read_dir("/run/hearth/net/leases").into_iter().flatten().flatten().map(|e| e.path()).collect();
    assert!(leases.is_empty(), "leases left: {leases:?}");
    assert_eq!(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(), forwarding_before);
    assert!(std::net::TcpStream::connect(("127.0.0.1", 7070)).is_err(), "127.0.0.1:7070 still forwarded");
}

/// Sends a line to ADDR:PORT (retrying up to `tries` times, 200 ms apart,
/// while nothing listens yet) and returns what came back.
fn echo_at(addr: &str, port: u16, tries: u32) -> Option<String> {
    use std::io::{Read, Write};
    for _ in 0..tries {
        if let Ok(mut s) = std::net::TcpStream::connect((addr, port)) {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            if s.write_all(b"through the bridge\n").is_ok() {
                let mut buf = [0u8; 19];
                if s.read_exact(&mut buf).is_ok() {
                    return Some(String::from_utf8_lossy(&buf).into_owned());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    None
}

/// `network = "off"`: the VM has no NIC and nothing is made on the host.
#[test]
fn with_the_network_off_the_vm_has_loopback_only_and_the_host_is_untouched() {
    let env = Env::get();
    let scratch = Scratch::new("network-off");
    let c = Containerd::start_with(&env, &scratch, "idle_timeout_secs = 3\nnetwork = \"off\"\n");
    let o = c.run("off", &["--net-host"], &["sh", "-c", NICS_AND_ADDRESSES]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "nics:\naddresses: lo\n", "{}", text(&o));
    assert!(!std::path::Path::new("/sys/class/net").join(BRIDGE).exists(), "a bridge was made");
    assert!(hearth_taps().is_empty(), "taps: {:?}", hearth_taps());
}

/// A subnet that the host already uses elsewhere is refused with the fix,
/// and the next container (after the config is fixed) runs.
#[test]
fn a_subnet_the_host_already_uses_is_refused_with_its_fix() {
    let env = Env::get();
    let scratch = Scratch::new("network-clash");
    let _clash = hearth_e2e::TapDevice::new("hearthclash0", "10.99.0.1/24");
    let c = Containerd::start_with(&env, &scratch, "idle_timeout_secs = 3\nnetwork_subnet = \"10.99.0.0/24\"\n");
    let o = c.run("clash", &[], &["true"]);
    let all = text(&o);
    assert!(!o.status.success(), "{all}");
    assert!(all.contains("already used on this host by hearthclash0"), "{all}");
    assert!(all.contains("network_subnet"), "the error names the setting to change: {all}");
    assert!(!std::path::Path::new("/sys/class/net").join(BRIDGE).exists(), "a bridge was left");
}

/// A network namespace as a CNI plugin leaves it (the bridge plugin's
/// shape, without the bridge): a veth pair whose host end holds the
/// gateway addresses, and whose other end, `eth0` in the namespace, holds
/// the container's addresses (IPv4 and IPv6), a MAC and MTU of its own, and
/// the default routes.
struct CniNamespace {
    name: String,
    host_end: String,
}

impl CniNamespace {
    fn new(name: &str, host_end: &str, subnet: u8, mac: &str) -> CniNamespace {
        let ns = CniNamespace { name: name.into(), host_end: host_end.into() };
        ns.remove();
        let gw = format!("10.{subnet}.0.1");
        for cmd in [
            format!("ip netns add {name}"),
            format!("ip link add {host_end} type veth peer name eth0 netns {name}"),
            format!("ip addr add {gw}/24 dev {host_end}"),
            format!("ip link set {host_end} up"),
            format!("ip -n {name} link set eth0 address {mac} mtu 1400"),
            format!("ip -n {name} addr add 10.{subnet}.0.2/24 dev eth0"),
            format!("ip -n {name} link set eth0 up"),
            format!("ip -n {name} link set lo up"),
            format!("ip -n {name} route add default via {gw}"),
            // Dual stack, as CNI's bridge plugin gives with an IPv6 range
            // (nodad: the addresses are usable at once).
            format!("ip addr add fd00:{subnet}::1/64 dev {host_end} nodad"),
            format!("ip -n {name} addr add fd00:{subnet}::2/64 dev eth0 nodad"),
            format!("ip -n {name} -6 route add default via fd00:{subnet}::1"),
            // Static neighbours, as some CNI plugins set.
            format!("ip -n {name} neigh add 10.{subnet}.0.9 lladdr 0a:58:00:00:00:09 dev eth0 nud permanent"),
            format!("ip -n {name} neigh add fd00:{subnet}::9 lladdr 0a:58:00:00:00:09 dev eth0 nud permanent"),
        ] {
            let o = Command::new("sh").args(["-c", &cmd]).output().unwrap();
            assert!(o.status.success(), "{cmd}: {}", String::from_utf8_lossy(&o.stderr));
        }
        ns
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// What shell command `cmd` prints, run in the namespace.
    fn out(&self, cmd: &str) -> String {
        cni::in_netns(&self.name, cmd)
    }

    fn remove(&self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_end]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

impl Drop for CniNamespace {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Containers given a network namespace by path, as nerdctl, the CRI and
/// Docker give them (CNI made it): each gets that namespace's interface in
/// the VM (its name, MAC, MTU, address and default route), is reached at
/// its address from the host and reaches the host through its gateway, two
/// at once in two namespaces; deleting one removes what hearth added to its
/// namespace (the tap, the tc redirection) and leaves the other running;
/// the NIC it used serves the next container; with hearth-vmm killed under
/// the last two, their delete still leaves both namespaces as CNI made them.
#[test]
fn containers_in_cni_namespaces_are_reached_at_their_addresses() {
    let env = Env::get();
    let scratch = Scratch::new("network-cni");
    let one = CniNamespace::new("hearth-cni1", "hcni1", 77, "0a:58:0a:4d:00:02");
    let two = CniNamespace::new("hearth-cni2", "hcni2", 78, "0a:58:0a:4e:00:02");
    let c = Containerd::start(&env, &scratch, 3);
    // At `::`: IPv6 and IPv4 both.
    let serve = |id: &str, ns: &CniNamespace| c.echo_server_in(id, RUNTIME, &ns.path(), Some("::"));
    serve("web1", &one);
    serve("web2", &two);

    // What the container sees: the namespace's interface, as it was.
    let seen = c.ok(&[
        "task",
        "exec",
        "--exec-id",
        "look",
        "web1",
        "sh",
        "-c",
        "ip -o link show eth0; ip -4 -o addr show; ip -4 route; ip -6 -o addr show scope global; ip -6 route; \
         cat /proc/net/arp; ip -6 neigh show",
    ]);
    assert!(seen.contains("0a:58:0a:4d:00:02"), "the veth's MAC: {seen}");
    assert!(seen.contains("mtu 1400"), "the veth's MTU: {seen}");
    assert!(seen.contains("10.77.0.2/24"), "the veth's address: {seen}");
    assert!(seen.contains("default via 10.77.0.1"), "the default route: {seen}");
    assert!(!seen.contains("10.89.0."), "not the VM's own network: {seen}");
    assert!(seen.contains("fd00:77::2/64"), "the veth's IPv6 address: {seen}");
    assert!(seen.contains("default via fd00:77::1"), "the IPv6 default route: {seen}");
    assert!(
        seen.lines().any(|l| l.starts_with("10.77.0.9 ") && l.contains("0a:58:00:00:00:09")),
        "the static ARP entry: {seen}"
    );
    assert!(
        seen.lines().any(|l| l.starts_with("fd00:77::9 ") && l.contains("0a:58:00:00:00:09")),
        "the static NDP entry: {seen}"
    );

    // Reached from the host at each address, and the host reached back.
    assert_eq!(echo_at("10.77.0.2", 8080, 60).as_deref(), Some("through the bridge\n"), "web1 at 10.77.0.2");
    assert_eq!(echo_at("10.78.0.2", 8080, 60).as_deref(), Some("through the bridge\n"), "web2 at 10.78.0.2");
    assert_eq!(echo_at("fd00:77::2", 8080, 60).as_deref(), Some("through the bridge\n"), "web1 at fd00:77::2");
    let ping = c.ok(&[
        "task",
        "exec",
        "--exec-id",
        "ping",
        "web2",
        "sh",
        "-c",
        "ping -c 2 -W 10 10.78.0.1 >/dev/null && echo reached",
    ]);
    assert_eq!(ping, "reached\n", "web2 reaches its gateway on the host");

    // In the namespace, hearth's tap and the redirection, while it runs.
    let state = one.out(HEARTH_IN_NAMESPACE);
    assert!(state.contains("tap0_hearth"), "the tap in the namespace: {state}");
    assert!(state.contains("ingress"), "the veth's ingress qdisc: {state}");

    // web1 goes: its namespace is as CNI left it, web2 runs on.
    c.kill_and_remove(&["web1"]);
    assert_as_cni_left("web1's namespace after delete", &one.out(HEARTH_IN_NAMESPACE));
    assert_eq!(echo_at("10.78.0.2", 8080, 60).as_deref(), Some("through the bridge\n"), "web2 still reached");

    // The NIC web1 had serves the next container in that namespace.
    serve("web3", &one);
    assert_eq!(echo_at("10.77.0.2", 8080, 60).as_deref(), Some("through the bridge\n"), "web3 at 10.77.0.2");
    let seen = c.ok(&["task", "exec", "--exec-id", "look", "web3", "sh", "-c", "ip -o link show eth0"]);
    assert!(seen.contains("0a:58:0a:4d:00:02"), "{seen}");
    hearth_e2e::figure("CNI namespaces: web1 and web2 reached at their addresses; web3 on web1's NIC after it");

    // hearth-vmm killed under web2 and web3: their taps went with it, and
    // the redirection on each veth goes with their delete.
    for pid in c.vmm_pids() {
        // SAFETY: kill(2) on the VMM this test's containerd started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    c.remove_stopped(&["web2", "web3"]);
    for ns in [&one, &two] {
        assert_as_cni_left(&ns.name, &ns.out(HEARTH_IN_NAMESPACE));
    }
    wait_until("the killed VM's tap gone", Duration::from_secs(30), || hearth_taps().is_empty());
}

/// Sends `n` pseudo-random bytes on `s` while reading them back from the
/// `tcp-echo` at its other end; panics naming `what` if any byte is lost,
/// repeated or changed.
fn round_trip(s: &mut std::net::TcpStream, n: usize, seed: u64, what: &str) {
    use std::io::{Read, Write};
    let mut x = seed | 1;
    let data: Vec<u8> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent));
    let mut back = vec![0u8; n];
    s.read_exact(&mut back).unwrap_or_else(|e| panic!("{what}: reading the echo: {e}"));
    writer.join().unwrap().unwrap_or_else(|e| panic!("{what}: writing: {e}"));
    assert!(back == data, "{what}: the echo differs from what was sent");
}

fn connect(addr: &str, port: u16) -> std::net::TcpStream {
    for _ in 0..60 {
        if let Ok(s) = std::net::TcpStream::connect((addr, port)) {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            return s;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("nothing answers at {addr}:{port}");
}

/// Containers on a bridge network made by Debian's CNI plugins (`bridge`,
/// `host-local`, `portmap`), run as the CRI runs them, each container's
/// namespace mirrored into one shared VM: each container has the address
/// CNI gave; the host reaches one (1 MiB each way, every byte checked), the
/// other container reaches it (the same, from inside the VM, through the
/// host's bridge), it reaches its gateway; portmap's host port reaches it;
/// a TCP stream to the second stays whole while a third container's NIC is
/// attached and detached; nothing of hearth's is left in the namespaces.
#[test]
fn containers_on_a_cni_bridge_network_work_as_with_runc() {
    let env = Env::get();
    let scratch = Scratch::new("network-cni-bridge");
    let net = cni::Network::new("hearth-e2e", "hcni0", "10.66.0.0/24", &scratch.path("ipam").display().to_string());
    let a = net.attach("web-a", "hearth-cnia", Some((18080, 8080)));
    let b = net.attach("web-b", "hearth-cnib", None);
    assert_ne!(a.ip, b.ip);
    let c = Containerd::start(&env, &scratch, 3);
    let serve = |id: &str, at: &cni::Attachment| c.echo_server_in(id, RUNTIME, &at.path(), None);
    serve("web-a", &a);
    serve("web-b", &b);

    let seen =
        c.ok(&["task", "exec", "--exec-id", "look", "web-a", "sh", "-c", "ip -4 -o addr show eth0; ip -4 route"]);
    assert!(seen.contains(&format!("{}/24", a.ip)), "web-a has the address CNI gave ({}): {seen}", a.ip);
    assert!(seen.contains("default via 10.66.0.1"), "and CNI's default route: {seen}");

    // Host to container, container to container, container to host.
    round_trip(&mut connect(&a.ip, 8080), 1 << 20, 1, "host to web-a");
    let check = c.ok(&[
        "task",
        "exec",
        "--exec-id",
        "check",
        "web-b",
        "hearth-guest-tool",
        "tcp-check",
        &a.ip,
        "8080",
        "1048576",
    ]);
    assert_eq!(check.trim(), "HEARTH-TCP-CHECK: ok 1048576", "web-b to web-a");
    let ping = c.ok(&[
        "task",
        "exec",
        "--exec-id",
        "ping",
        "web-a",
        "sh",
        "-c",
        "ping -c 2 -W 10 10.66.0.1 >/dev/null && echo reached",
    ]);
    assert_eq!(ping, "reached\n", "web-a reaches the host at its gateway");

    // portmap: the host's own address, port 18080, reaches web-a's 8080.
    let host_ip = host_out(&["sh", "-c", "ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1"]);
    let host_ip = host_ip.trim();
    assert!(!host_ip.is_empty(), "the test host has no eth0 address");
    round_trip(&mut connect(host_ip, 18080), 64 << 10, 2, "portmap's host port");

    // A stream to web-b stays whole while web-c's NIC comes and goes.
    let mut stream = connect(&b.ip, 8080);
    round_trip(&mut stream, 256 << 10, 3, "web-b before web-c");
    {
        let cc = net.attach("web-c", "hearth-cnic", None);
        serve("web-c", &cc);
        round_trip(&mut connect(&cc.ip, 8080), 64 << 10, 4, "host to web-c");
        round_trip(&mut stream, 256 << 10, 5, "web-b while web-c runs");
        c.kill_and_remove(&["web-c"]);
        assert_as_cni_left("web-c's namespace after delete", &cc.out(HEARTH_IN_NAMESPACE));
    }
    round_trip(&mut stream, 256 << 10, 6, "web-b after web-c");
    drop(stream);
    hearth_e2e::figure(&format!(
        "CNI bridge: web-a {} and web-b {} (1 MiB each way checked, host and container to container), portmap 18080, a stream kept across web-c's NIC",
        a.ip, b.ip
    ));

    c.kill_and_remove(&["web-a", "web-b"]);
    for at in [&a, &b] {
        assert_as_cni_left(&at.id, &at.out(HEARTH_IN_NAMESPACE));
    }
    wait_until("the VM idled out", Duration::from_secs(120), || c.vmm_pids().is_empty());
    // The VM's tap goes as the kernel finishes closing hearth-vmm's files.
    wait_until("the VM's tap gone", Duration::from_secs(30), || hearth_taps().is_empty());
}
