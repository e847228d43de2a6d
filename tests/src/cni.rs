//! CNI driven as the CRI drives it: Debian's containernetworking-plugins
//! (`/usr/lib/cni`), each plugin run with the CNI_* environment and its
//! network configuration on stdin, in a network namespace this module makes
//! (`ip netns add`), for the network suite's containers.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

pub const CNI_PATH: &str = "/usr/lib/cni";

/// A bridge network (`bridge` + `host-local` IPAM, the gateway on the
/// bridge, a default route), with `portmap` chained when a port is mapped.
pub struct Network {
    pub name: String,
    pub bridge: String,
    pub subnet: String,
    ipam_dir: String,
}

/// One container's namespace on a [`Network`], removed (CNI DEL, then the
/// namespace) when dropped.
pub struct Attachment<'a> {
    net: &'a Network,
    pub id: String,
    pub netns: String,
    /// The address CNI gave, without its prefix.
    pub ip: String,
    port: Option<(u16, u16)>,
    bridge_result: Value,
}

fn run_plugin(plugin: &str, command: &str, id: &str, netns: &str, conf: &Value) -> Result<Value, String> {
    let exe = format!("{CNI_PATH}/{plugin}");
    let mut child = Command::new(&exe)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {exe} (install containernetworking-plugins: `cargo xtask setup`): {e}"))?;
    child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        return Err(format!(
            "CNI {plugin} {command} for {id}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if out.stdout.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("CNI {plugin} answered no JSON: {e}"))
}

impl Network {
    /// `subnet` as `A.B.C.0/24`; `ipam_dir` where host-local keeps its
    /// leases (a scratch directory).
    pub fn new(name: &str, bridge: &str, subnet: &str, ipam_dir: &str) -> Network {
        Network { name: name.into(), bridge: bridge.into(), subnet: subnet.into(), ipam_dir: ipam_dir.into() }
    }

    fn bridge_conf(&self) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": self.name,
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.ipam_dir,
            },
        })
    }

    fn portmap_conf(&self, port: (u16, u16), prev: &Value) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": self.name,
            "type": "portmap",
            "capabilities": {"portMappings": true},
            "runtimeConfig": {"portMappings": [{"hostPort": port.0, "containerPort": port.1, "protocol": "tcp"}]},
            "prevResult": prev,
        })
    }

    /// A namespace `netns` for container `id`, CNI ADD run on it (and
    /// portmap's, mapping host port `port.0` to the container's `port.1`).
    pub fn attach(&self, id: &str, netns: &str, port: Option<(u16, u16)>) -> Attachment<'_> {
        let _ = Command::new("ip").args(["netns", "del", netns]).output();
        let o = Command::new("ip").args(["netns", "add", netns]).output().unwrap();
        assert!(o.status.success(), "ip netns add {netns}: {}", String::from_utf8_lossy(&o.stderr));
        let path = format!("/var/run/netns/{netns}");
        let mut a = Attachment {
            net: self,
            id: id.into(),
            netns: netns.into(),
            ip: String::new(),
            port,
            bridge_result: Value::Null,
        };
        a.bridge_result = run_plugin("bridge", "ADD", id, &path, &self.bridge_conf()).unwrap_or_else(|e| panic!("{e}"));
        let cidr =
            a.bridge_result["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("no address: {}", a.bridge_result));
        a.ip = cidr.split('/').next().unwrap().to_string();
        if let Some(p) = port {
            run_plugin("portmap", "ADD", id, &path, &self.portmap_conf(p, &a.bridge_result))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        a
    }
}

impl Attachment<'_> {
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.netns)
    }

    /// What `cmd` prints (stdout and stderr), run in the namespace.
    pub fn out(&self, cmd: &str) -> String {
        in_netns(&self.netns, cmd)
    }
}

/// What shell command `cmd` prints (stdout, then stderr), run in the named
/// network namespace `netns` (`ip netns exec`).
pub fn in_netns(netns: &str, cmd: &str) -> String {
    let o = Command::new("ip").args(["netns", "exec", netns, "sh", "-c", cmd]).output().unwrap();
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

impl Drop for Attachment<'_> {
    fn drop(&mut self) {
        let path = self.path();
        if let Some(p) = self.port {
            let _ = run_plugin("portmap", "DEL", &self.id, &path, &self.net.portmap_conf(p, &self.bridge_result));
        }
        let _ = run_plugin("bridge", "DEL", &self.id, &path, &self.net.bridge_conf());
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).output();
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
    }
}
