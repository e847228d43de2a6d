//! containerd 1.7's CRI plugin with hearth as a runtime handler, driven
//! over its gRPC socket as the kubelet drives it (the CRI v1 protobufs of
//! the k8s-cri crate), for the cri suite and `cargo xtask bench cri`.
//!
//! The containerd is the tests' own: Debian 13's 1.7, which setup unpacks
//! beside Debian 12's 1.6 (xtask/src/apt.rs), with its own root on tmpfs,
//! its own socket, a CNI bridge network for pods, the locally built pause
//! image as `sandbox_image`, and three runtime handlers, as a cluster's
//! RuntimeClasses would name them: `hearth` (the shared VM), `hearth-pod`
//! (a VM per pod, through the ConfigPath option) and `runc`, the reference.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use k8s_cri::v1 as api;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::containerd::{tail, wait_until, Containerd};
use crate::{Env, Scratch, PAUSE_IMAGE};

pub const IMAGE: &str = crate::containerd::IMAGE;
/// The shared VM.
pub const HEARTH: &str = "hearth";
/// A VM per pod (`mode = "per-pod"` in the file its ConfigPath names).
pub const HEARTH_PER_POD: &str = "hearth-pod";
pub const RUNC: &str = "runc";
/// The pods' CNI network.
pub const SUBNET: &str = "10.89.7.0/24";
pub const BRIDGE: &str = "hcri0";

/// How long one CRI call may take before the test fails (a first
/// RunPodSandbox boots the VM under emulation).
const CALL_GUARD: Duration = Duration::from_secs(300);

pub struct Cri {
    child: Child,
    pub socket: PathBuf,
    root: PathBuf,
    log: PathBuf,
    /// The hearth VMs' state directories (per handler).
    pub vms: PathBuf,
    /// Where pods' logs go (each pod's log_directory is beneath).
    pub logs: PathBuf,
    /// containerd 1.7's binaries (its ctr, its runc shim).
    bin: PathBuf,
    rt: tokio::runtime::Runtime,
    channel: Channel,
}

/// The containerd configuration: the CRI plugin with the handlers, the CNI
/// network and the registry mirror for 127.0.0.1:5000 over plain HTTP.
fn config(scratch: &Scratch, hearth: &Path, hearth_per_pod: &Path) -> String {
    let cri = "[plugins.\"io.containerd.grpc.v1.cri\"]";
    let runtimes = "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes";
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
{cri}
  sandbox_image = "{PAUSE_IMAGE}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "{HEARTH}"
  {runtimes}.{HEARTH}]
    runtime_type = "io.containerd.hearth.v2"
  {runtimes}.{HEARTH}.options]
    ConfigPath = "{hearth}"
  {runtimes}.{HEARTH_PER_POD}]
    runtime_type = "io.containerd.hearth.v2"
  {runtimes}.{HEARTH_PER_POD}.options]
    ConfigPath = "{hearth_per_pod}"
  {runtimes}.{RUNC}]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{net_d}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs_d}"
"#,
        root = scratch.path("root").display(),
        state = scratch.path("state").display(),
        socket = scratch.path("cri.sock").display(),
        hearth = hearth.display(),
        hearth_per_pod = hearth_per_pod.display(),
        cni_bin = crate::cni::CNI_PATH,
        net_d = scratch.path("net.d").display(),
        certs_d = scratch.path("certs.d").display(),
    )
}

impl Cri {
    /// Starts containerd 1.7 with the CRI plugin and imports the busybox
    /// and pause images into its `k8s.io` namespace.
    pub fn start(env: &Env, scratch: &Scratch) -> Cri {
        let root = scratch.path("root");
        std::fs::create_dir_all(&root).unwrap();
        // Snapshots need a filesystem that can be an overlay's upper layer.
        crate::host(Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(&root));
        let vms = scratch.path("vms");
        let hearth = scratch.path("hearth.toml");
        std::fs::write(&hearth, Containerd::hearth_config(env, &vms.join("shared"), "idle_timeout_secs = 5\n"))
            .unwrap();
        let per_pod = scratch.path("hearth-pod.toml");
        std::fs::write(
            &per_pod,
            Containerd::hearth_config(env, &vms.join("per-pod"), "idle_timeout_secs = 5\nmode = \"per-pod\"\n"),
        )
        .unwrap();
        // The pods' network, as a cluster's CNI configuration gives it.
        let net_d = scratch.path("net.d");
        std::fs::create_dir_all(&net_d).unwrap();
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "hearth-cri",
            "plugins": [
                {
                    "type": "bridge", "bridge": BRIDGE, "isGateway": true, "ipMasq": false,
                    "ipam": {
                        "type": "host-local", "ranges": [[{"subnet": SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": scratch.path("ipam").display().to_string()
                    }
                },
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        });
        std::fs::write(net_d.join("10-hearth-cri.conflist"), conflist.to_string()).unwrap();
        // The local registry speaks plain HTTP.
        let certs = scratch.path("certs.d/127.0.0.1:5000");
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::write(
            certs.join("hosts.toml"),
            "server = \"http://127.0.0.1:5000\"\n[host.\"http://127.0.0.1:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        )
        .unwrap();
        let config_file = scratch.path("containerd.toml");
        std::fs::write(&config_file, config(scratch, &hearth, &per_pod)).unwrap();
        let logs = scratch.path("pod-logs");
        std::fs::create_dir_all(&logs).unwrap();
        let bin = env.containerd_cri.join("usr/bin");
        // containerd 1.7's own shims and ctr first, then hearth's shim.
        let path = format!(
            "{}:{}:{}",
            bin.display(),
            env.shim.parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = scratch.path("containerd.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin.join("containerd"))
            .arg("--config")
            .arg(&config_file)
            .env("PATH", path)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting containerd 1.7 from {} (`cargo xtask setup` unpacks it): {e}", bin.display())
            });
        let socket = scratch.path("cri.sock");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        wait_until("containerd's CRI socket", Duration::from_secs(60), || socket.exists());
        let channel =
            rt.block_on(connect(&socket)).unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()));
        let cri = Cri { child, socket, root, log, vms, logs, bin, rt, channel };
        cri.ctr_ok(&["images", "import", &env.busybox_image.display().to_string()]);
        cri.ctr_ok(&["images", "import", &env.pause_image.display().to_string()]);
        cri
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// containerd 1.7's `ctr` in the CRI's `k8s.io` namespace.
    pub fn ctr(&self, args: &[&str]) -> std::process::Output {
        let child = Command::new(self.bin.join("ctr"))
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        crate::output_within(child, CALL_GUARD).unwrap_or_else(|| panic!("ctr {args:?} hung"))
    }

    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let o = self.ctr(args);
        assert!(
            o.status.success(),
            "ctr {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    pub fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
    }

    /// Runs one CRI call to its answer; a call still going after five
    /// minutes fails the test with containerd's log.
    pub fn call<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        match self.rt.block_on(async { tokio::time::timeout(CALL_GUARD, f).await }) {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => panic!("{what} hung ({CALL_GUARD:?})\n{}", self.diagnostics()),
        }
    }

    /// [`Cri::call`] that must succeed.
    pub fn ok<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> T {
        self.call(what, f).unwrap_or_else(|e| panic!("{what}: {} {}\n{}", e.code(), e.message(), self.diagnostics()))
    }

    /// A pod's configuration, as the kubelet writes one: its own log
    /// directory, a hostname, CNI networking, and namespaces `ns`.
    pub fn pod_config(&self, name: &str, ns: api::NamespaceOption) -> api::PodSandboxConfig {
        let log_directory = self.logs.join(name);
        std::fs::create_dir_all(&log_directory).unwrap();
        api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: log_directory.display().to_string(),
            linux: Some(api::LinuxPodSandboxConfig {
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(ns),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox on `handler`; the pod's id.
    pub fn run_pod(&self, config: &api::PodSandboxConfig, handler: &str) -> String {
        let req = api::RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: handler.into() };
        self.ok("RunPodSandbox", self.runtime().run_pod_sandbox(req)).pod_sandbox_id
    }

    pub fn pod_status(&self, id: &str) -> api::PodSandboxStatus {
        let req = api::PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose: false };
        self.ok("PodSandboxStatus", self.runtime().pod_sandbox_status(req)).status.expect("a pod status")
    }

    /// A container's configuration running `cmd` in the busybox image,
    /// logging to `<name>.log` in its pod's directory.
    pub fn container_config(name: &str, cmd: &[&str]) -> api::ContainerConfig {
        api::ContainerConfig {
            metadata: Some(api::ContainerMetadata { name: name.into(), attempt: 0 }),
            image: Some(api::ImageSpec { image: IMAGE.into(), ..Default::default() }),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(api::LinuxContainerConfig::default()),
            ..Default::default()
        }
    }

    /// CreateContainer in pod `pod`; the container's id.
    pub fn create(&self, pod: &str, pod_config: &api::PodSandboxConfig, config: api::ContainerConfig) -> String {
        let req = api::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        };
        self.ok("CreateContainer", self.runtime().create_container(req)).container_id
    }

    pub fn start_container(&self, id: &str) {
        let req = api::StartContainerRequest { container_id: id.into() };
        self.ok("StartContainer", self.runtime().start_container(req));
    }

    /// CreateContainer then StartContainer.
    pub fn run(&self, pod: &str, pod_config: &api::PodSandboxConfig, config: api::ContainerConfig) -> String {
        let id = self.create(pod, pod_config, config);
        self.start_container(&id);
        id
    }

    pub fn status(&self, id: &str) -> api::ContainerStatus {
        let req = api::ContainerStatusRequest { container_id: id.into(), verbose: false };
        self.ok("ContainerStatus", self.runtime().container_status(req)).status.expect("a container status")
    }

    /// Waits for container `id` to exit; its status.
    pub fn wait_exited(&self, id: &str) -> api::ContainerStatus {
        let deadline = Instant::now() + CALL_GUARD;
        loop {
            let s = self.status(id);
            if s.state == api::ContainerState::ContainerExited as i32 {
                return s;
            }
            assert!(Instant::now() < deadline, "container {id} did not exit: {s:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn exec_sync(&self, id: &str, cmd: &[&str], timeout_secs: i64) -> Result<api::ExecSyncResponse, tonic::Status> {
        let req = api::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_secs,
        };
        self.call("ExecSync", self.runtime().exec_sync(req))
    }

    /// ExecSync that must succeed with exit code 0; its stdout.
    pub fn exec_ok(&self, id: &str, cmd: &[&str]) -> String {
        let r = self
            .exec_sync(id, cmd, 0)
            .unwrap_or_else(|e| panic!("ExecSync {cmd:?} in {id}: {e}\n{}", self.diagnostics()));
        assert_eq!(
            r.exit_code,
            0,
            "ExecSync {cmd:?} in {id}: {}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
        String::from_utf8_lossy(&r.stdout).into_owned()
    }

    pub fn stop_container(&self, id: &str, timeout: i64) {
        let req = api::StopContainerRequest { container_id: id.into(), timeout };
        self.ok("StopContainer", self.runtime().stop_container(req));
    }

    pub fn remove_container(&self, id: &str) {
        let req = api::RemoveContainerRequest { container_id: id.into() };
        self.ok("RemoveContainer", self.runtime().remove_container(req));
    }

    /// StopPodSandbox then RemovePodSandbox, as the kubelet ends a pod
    /// (its containers go with it).
    pub fn remove_pod(&self, id: &str) {
        let stop = api::StopPodSandboxRequest { pod_sandbox_id: id.into() };
        self.ok("StopPodSandbox", self.runtime().stop_pod_sandbox(stop));
        let remove = api::RemovePodSandboxRequest { pod_sandbox_id: id.into() };
        self.ok("RemovePodSandbox", self.runtime().remove_pod_sandbox(remove));
    }

    pub fn list_containers(&self, pod: &str) -> Vec<api::Container> {
        let filter = api::ContainerFilter { pod_sandbox_id: pod.into(), ..Default::default() };
        self.ok("ListContainers", self.runtime().list_containers(api::ListContainersRequest { filter: Some(filter) }))
            .containers
    }

    pub fn list_pods(&self) -> Vec<api::PodSandbox> {
        self.ok("ListPodSandbox", self.runtime().list_pod_sandbox(api::ListPodSandboxRequest { filter: None })).items
    }

    /// The lines of a container's log file (CRI format: `TIME STREAM TAG
    /// TEXT`), once `until` holds for them.
    pub fn log_lines(&self, pod: &str, container: &str, until: impl Fn(&[String]) -> bool) -> Vec<String> {
        let path = self.logs.join(pod).join(format!("{container}.log"));
        let mut lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            lines = std::fs::read_to_string(&path).unwrap_or_default().lines().map(String::from).collect();
            if until(&lines) {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the log {} never had what was expected: {lines:?}", path.display());
    }

    /// containerd's log (the shims' lines included) and the VMs' consoles,
    /// the ends of each, for a failure's message.
    pub fn diagnostics(&self) -> String {
        let mut out = format!("--- containerd ---\n{}", tail(&self.log_text(), 80));
        // Where each hearth shim's threads wait, for a hang.
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if !comm.starts_with("containerd-shim") {
                continue;
            }
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if !String::from_utf8_lossy(&cmdline).contains("hearth") {
                continue;
            }
            out.push_str(&format!("\n--- shim {} threads ---\n", e.file_name().to_string_lossy()));
            for t in std::fs::read_dir(e.path().join("task")).into_iter().flatten().flatten() {
                let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                let stack = std::fs::read_to_string(t.path().join("stack")).unwrap_or_default();
                let first: Vec<&str> = stack.lines().take(6).collect();
                out.push_str(&format!("{} {}: {}\n", t.file_name().to_string_lossy(), name.trim(), first.join(" < ")));
            }
        }
        let consoles = walk(&self.vms, 4).into_iter().filter(|p| p.ends_with("console.log"));
        for c in consoles {
            let text = std::fs::read_to_string(&c).unwrap_or_default();
            out.push_str(&format!("\n--- {} ---\n{}", c.display(), tail(&text, 60)));
        }
        out
    }

    /// What the host still has of containerd's tasks and hearth's VMs:
    /// mount points beneath either, for the cleanup checks.
    pub fn leftover_mounts(&self) -> Vec<String> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let state = self.socket.parent().unwrap().join("state");
        mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
            .filter(|m| m.starts_with(&*self.vms.to_string_lossy()) || m.starts_with(&*state.to_string_lossy()))
            .collect()
    }
}

/// What a CRI stream (Exec, Attach) carried from the container, and the
/// status the server sent at its end (JSON, on the error channel).
#[derive(Debug, Default)]
pub struct Streamed {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: String,
}

/// Opens `url`, as an Exec or Attach call returned it, with the
/// `v4.channel.k8s.io` WebSocket protocol that kubectl speaks through the
/// API server: writes `stdin` on channel 0, then reads stdout (1), stderr
/// (2) and the status (3) until the server closes the stream. v4 cannot
/// close stdin on its own, so a command that reads it must stop by itself.
pub fn stream(url: &str, stdin: &[u8]) -> Streamed {
    use tungstenite::client::IntoClientRequest;
    use tungstenite::Message;
    // containerd hands out an http:// URL; the same URL upgraded is ws://.
    let url = &url.replacen("http://", "ws://", 1);
    let mut req = url.as_str().into_client_request().unwrap_or_else(|e| panic!("the stream URL {url:?}: {e}"));
    req.headers_mut().insert("Sec-WebSocket-Protocol", "v4.channel.k8s.io".parse().unwrap());
    let uri = req.uri().clone();
    let addr = format!("{}:{}", uri.host().unwrap_or("127.0.0.1"), uri.port_u16().unwrap_or(80));
    let tcp = std::net::TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connecting to the stream at {addr}: {e}"));
    tcp.set_read_timeout(Some(CALL_GUARD)).unwrap();
    let (mut ws, _) = tungstenite::client(req, tcp).unwrap_or_else(|e| panic!("the WebSocket handshake at {url}: {e}"));
    if !stdin.is_empty() {
        let mut m = vec![0u8];
        m.extend_from_slice(stdin);
        ws.send(Message::Binary(m.into())).unwrap();
    }
    let mut out = Streamed::default();
    loop {
        match ws.read() {
            Ok(Message::Binary(data)) if data.len() > 1 => match data[0] {
                1 => out.stdout.extend_from_slice(&data[1..]),
                2 => out.stderr.extend_from_slice(&data[1..]),
                3 => out.status.push_str(&String::from_utf8_lossy(&data[1..])),
                _ => {}
            },
            Ok(Message::Close(_)) => break,
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => break,
            Err(tungstenite::Error::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake)) => break,
            Err(e) => panic!("reading the stream {url}: {e} (so far {out:?})"),
        }
    }
    out
}

/// The files beneath `dir`, `depth` levels down at most.
fn walk(dir: &Path, depth: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() && depth > 0 {
            out.extend(walk(&p, depth - 1));
        } else if p.is_file() {
            out.push(p);
        }
    }
    out
}

async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    // The URI is not used: every connection goes to the socket.
    Endpoint::from_static("http://[::]:0")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(socket).await?))
            }
        }))
        .await
}

/// A namespace mode of the CRI (POD, CONTAINER, NODE).
pub fn namespaces(
    network: api::NamespaceMode,
    pid: api::NamespaceMode,
    ipc: api::NamespaceMode,
) -> api::NamespaceOption {
    api::NamespaceOption { network: network as i32, pid: pid as i32, ipc: ipc as i32, ..Default::default() }
}

/// The kubelet's defaults: the pod's own network and IPC, a pid namespace
/// per container.
pub fn default_namespaces() -> api::NamespaceOption {
    namespaces(api::NamespaceMode::Pod, api::NamespaceMode::Container, api::NamespaceMode::Pod)
}

impl Drop for Cri {
    fn drop(&mut self) {
        // Pods left by a failed test go first, so that no VM outlives it.
        let mut rs = self.runtime();
        let list = rs.list_pod_sandbox(api::ListPodSandboxRequest { filter: None });
        let pods = self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), list).await });
        if let Ok(Ok(pods)) = pods {
            for p in pods.into_inner().items {
                let mut rs = self.runtime();
                let _ = self.rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(60), async {
                        let _ = rs.stop_pod_sandbox(api::StopPodSandboxRequest { pod_sandbox_id: p.id.clone() }).await;
                        let _ =
                            rs.remove_pod_sandbox(api::RemovePodSandboxRequest { pod_sandbox_id: p.id.clone() }).await;
                    })
                    .await
                });
            }
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        if crate::wait_timeout(&mut self.child, Duration::from_secs(30)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = Command::new("umount").arg("-R").arg("-l").arg(&self.root).status();
    }
}
