//! OCI hooks, run on the host as runc runs them, around a container whose
//! processes live in the VM (docs/usage.md, "Hooks").
//!
//! A hook is a host program named by whoever made the spec (dockerd,
//! nerdctl, an admin's hook configuration), never by the guest. Those that
//! run in the runtime's namespaces (prestart, createRuntime, poststart,
//! poststop) run here; those that must run inside the container's own
//! namespaces (createContainer, startContainer) cannot, since those
//! namespaces are in the VM, where the host's programs are not: a spec
//! with them is refused by name rather than run without them.
//!
//! A hook is given the container's state, whose `pid` names the process
//! the hook may enter. The container's processes are in the VM, so hearth
//! gives the hook a host thread of its own instead ([`Holder`]): in the
//! network namespace the container will have on the host (a new one, or
//! the one the spec names), and in a private copy of the shim's mount
//! namespace, so that a hook that mounts "into the container" changes
//! nothing of the host's. Docker's `libnetwork-setkey` prestart hook then
//! plugs the container's veth into that namespace, and the shim mirrors
//! it into the VM (netns.rs) as it does a CNI namespace.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use oci_spec::runtime::{Hook, Spec};
use serde::Serialize;

/// How long a hook without a timeout of its own may run: longer than any
/// sane hook takes, so that a hung one fails the create instead of
/// hanging it.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// A container's state as a hook reads it on its stdin (runtime-spec's
/// "State").
#[derive(Serialize, Debug, Clone)]
pub struct State {
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    pub id: String,
    pub status: &'static str,
    pub pid: i32,
    pub bundle: String,
    #[serde(skip_serializing_if = "std::collections::HashMap::is_empty")]
    pub annotations: std::collections::HashMap<String, String>,
}

impl State {
    /// Container `id`'s state, from its spec.
    pub fn new(spec: &Spec, id: &str, bundle: &str, status: &'static str, pid: i32) -> State {
        State {
            oci_version: spec.version().clone(),
            id: id.to_string(),
            status,
            pid,
            bundle: bundle.to_string(),
            annotations: spec.annotations().clone().unwrap_or_default(),
        }
    }
}

/// The hooks of a spec that hearth runs on the host.
#[derive(Debug, Default, Clone)]
pub struct Hooks {
    /// createRuntime then prestart: both run after the namespaces exist
    /// and before the container's process is started.
    create: Vec<Hook>,
    poststart: Vec<Hook>,
    poststop: Vec<Hook>,
}

impl Hooks {
    /// The spec's hooks, or an error naming those that cannot run.
    pub fn from_spec(spec: &Spec) -> Result<Hooks> {
        let Some(h) = spec.hooks() else { return Ok(Hooks::default()) };
        let list = |v: &Option<Vec<Hook>>| v.clone().unwrap_or_default();
        for (kind, v) in [("createContainer", h.create_container()), ("startContainer", h.start_container())] {
            if let Some(first) = v.as_ref().and_then(|v| v.first()) {
                bail!(
                    "the spec has {kind} hooks ({} first): they run inside the container's namespaces, which \
                     are in hearth's VM, where the host's programs are not; hearth runs prestart, createRuntime, \
                     poststart and poststop hooks on the host, and cannot run these: use runc for this container, \
                     or make the hook a createRuntime one",
                    first.path().display()
                );
            }
        }
        let mut create = list(h.create_runtime());
        create.extend(list(h.prestart()));
        Ok(Hooks { create, poststart: list(h.poststart()), poststop: list(h.poststop()) })
    }

    /// Whether there is any hook to run (then the container gets a
    /// [`Holder`] for their `pid`).
    pub fn any(&self) -> bool {
        !(self.create.is_empty() && self.poststart.is_empty() && self.poststop.is_empty())
    }

    /// The createRuntime and prestart hooks, in order; the first failure
    /// fails the create, with the hook's output.
    pub fn run_create(&self, state: &State) -> Result<()> {
        for h in &self.create {
            run(h, state).with_context(|| format!("the prestart/createRuntime hook {}", h.path().display()))?;
        }
        Ok(())
    }

    /// Runs the createRuntime and prestart hooks of container `id` with a
    /// [`Holder`] as their pid, in the container's host-side network
    /// namespace: the one the spec names (`requested`), a new one, or the
    /// host's when the spec gives it none (it shares the VM's). Returns
    /// that namespace, held, when the container has one of its own.
    pub fn run_create_held(
        &self,
        spec: &Spec,
        id: &str,
        bundle: &str,
        requested: Option<&Path>,
    ) -> Result<Option<HostNetns>> {
        let own = crate::netns::has_namespace(spec);
        let join = if own { requested } else { Some(Path::new("/proc/self/ns/net")) };
        let (holder, ns) = Holder::start(join)?;
        let ran = self.run_create(&State::new(spec, id, bundle, "creating", holder.tid));
        holder.release();
        ran?;
        Ok(own.then_some(ns))
    }

    /// The poststart hooks: a failure is logged, as runtime-spec says.
    pub fn run_poststart(&self, state: &State) {
        run_logged("poststart", &self.poststart, state);
    }

    /// The poststop hooks: a failure is logged, as runtime-spec says.
    pub fn run_poststop(&self, state: &State) {
        run_logged("poststop", &self.poststop, state);
    }
}

fn run_logged(kind: &str, hooks: &[Hook], state: &State) {
    for h in hooks {
        if let Err(e) = run(h, state) {
            log::warn!("container {}: the {kind} hook {}: {e:#}", state.id, h.path().display());
        }
    }
}

/// Runs one hook with the state on its stdin, its own arguments (the first
/// is its argv[0]) and environment only, within its timeout.
fn run(hook: &Hook, state: &State) -> Result<()> {
    let mut cmd = Command::new(hook.path());
    let args = hook.args().clone().unwrap_or_default();
    if let Some((argv0, rest)) = args.split_first() {
        cmd.arg0(argv0).args(rest);
    }
    cmd.env_clear();
    for kv in hook.env().iter().flatten() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    let limit = match hook.timeout() {
        Some(s) if s > 0 => Duration::from_secs(s as u64),
        _ => DEFAULT_TIMEOUT,
    };
    let input = serde_json::to_vec(state)?;
    let out = crate::tool::output_with(&mut cmd, Some(&input), Some(limit))
        .with_context(|| format!("running {}", hook.path().display()))?;
    if !out.status.success() {
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim().chars().take(2000).collect::<String>();
        bail!("{} (stderr: {:?}, stdout: {:?})", out.status, text(&out.stderr), text(&out.stdout));
    }
    Ok(())
}

/// A host thread that stands for the container's process while hooks run:
/// in the container's host-side network namespace and a private mount
/// namespace. The network namespace outlives it, held by [`HostNetns`].
pub struct Holder {
    pub tid: i32,
    release: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// The host-side network namespace of a container whose hooks set it up
/// (Docker's bridge network), held open while the container exists.
#[derive(Debug)]
pub struct HostNetns {
    file: File,
}

impl HostNetns {
    /// A path to the namespace that any process of the host can open while
    /// the shim holds it (nsenter, tc).
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), self.file.as_raw_fd()))
    }
}

impl Holder {
    /// Starts the thread in a new network namespace, or in `join` (a
    /// namespace file the spec names).
    pub fn start(join: Option<&Path>) -> Result<(Holder, HostNetns)> {
        let join = match join {
            Some(p) => Some(File::open(p).with_context(|| format!("opening the network namespace {}", p.display()))?),
            None => None,
        };
        let (ready_tx, ready_rx) = mpsc::channel::<Result<i32>>();
        let (release, release_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hook-holder".into())
            .spawn(move || {
                let setup = || -> Result<i32> {
                    // SAFETY: unshare, mount and setns change only this
                    // thread (unshare(CLONE_NEWNS) unshares its fs state
                    // too), which does nothing else and then ends.
                    unsafe {
                        if libc::unshare(libc::CLONE_NEWNS) != 0 {
                            bail!("a mount namespace: {}", std::io::Error::last_os_error());
                        }
                        let root = c"/";
                        if libc::mount(
                            std::ptr::null(),
                            root.as_ptr(),
                            std::ptr::null(),
                            libc::MS_REC | libc::MS_PRIVATE,
                            std::ptr::null(),
                        ) != 0
                        {
                            bail!("making its mounts private: {}", std::io::Error::last_os_error());
                        }
                        let rc = match &join {
                            Some(f) => libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET),
                            None => libc::unshare(libc::CLONE_NEWNET),
                        };
                        if rc != 0 {
                            bail!("the network namespace: {}", std::io::Error::last_os_error());
                        }
                        Ok(libc::gettid())
                    }
                };
                let ok = setup();
                let failed = ok.is_err();
                let _ = ready_tx.send(ok);
                if !failed {
                    let _ = release_rx.recv();
                }
            })
            .context("starting the hooks' holder thread")?;
        let tid = ready_rx
            .recv()
            .map_err(|_| anyhow!("the hooks' holder thread ended early"))?
            .context("putting the hooks' holder thread in the container's namespaces")?;
        let file = File::open(format!("/proc/self/task/{tid}/ns/net"))
            .context("opening the container's host-side network namespace")?;
        Ok((Holder { tid, release, thread }, HostNetns { file }))
    }

    /// Ends the thread (its namespaces stay held elsewhere, or go).
    pub fn release(self) {
        let _ = self.release.send(());
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(hooks: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "hooks": hooks}))
            .unwrap()
    }

    fn state() -> State {
        State {
            oci_version: "1.0.2".into(),
            id: "c1".into(),
            status: "created",
            pid: 42,
            bundle: "/b".into(),
            annotations: Default::default(),
        }
    }

    #[test]
    fn hooks_that_run_in_the_container_are_refused_by_name() {
        let e = Hooks::from_spec(&spec(serde_json::json!({"createContainer": [{"path": "/usr/bin/nvidia-hook"}]})))
            .unwrap_err()
            .to_string();
        assert!(e.contains("createContainer") && e.contains("/usr/bin/nvidia-hook"), "{e}");
        let h = Hooks::from_spec(&spec(serde_json::json!({
            "createRuntime": [{"path": "/a"}], "prestart": [{"path": "/b"}], "poststop": [{"path": "/c"}]
        })))
        .unwrap();
        assert!(h.any());
        let order: Vec<_> = h.create.iter().map(|h| h.path().display().to_string()).collect();
        assert_eq!(order, ["/a", "/b"]);
        assert!(!Hooks::from_spec(&spec(serde_json::json!({}))).unwrap().any());
    }

    #[test]
    fn a_hook_reads_the_state_and_its_failure_is_reported_with_its_output() {
        let dir = std::env::temp_dir().join(format!("hearth-hooks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("state.json");
        let h = spec(serde_json::json!({"prestart": [
            {"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}; echo $HOOKVAR >> {}", out.display(), out.display())],
             "env": ["HOOKVAR=from-the-spec"]},
            {"path": "/bin/sh", "args": ["sh", "-c", "echo broken >&2; exit 7"]}
        ]}));
        let e = Hooks::from_spec(&h).unwrap().run_create(&state()).unwrap_err();
        let written = std::fs::read_to_string(&out).unwrap();
        assert!(written.contains("\"pid\":42") && written.contains("\"id\":\"c1\""), "{written}");
        assert!(written.ends_with("from-the-spec\n"), "{written}");
        let e = format!("{e:#}");
        assert!(e.contains("broken") && e.contains('7'), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_holder_is_in_a_new_or_the_named_network_namespace() {
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let ours = ino(Path::new("/proc/self/ns/net"));
        let (holder, ns) = Holder::start(None).expect("a new network namespace (the shim's tests run as root)");
        assert_eq!(ino(Path::new(&format!("/proc/self/task/{}/ns/net", holder.tid))), ino(&ns.path()));
        holder.release();
        // Held after the thread is gone.
        assert_ne!(ino(&ns.path()), ours);
        let (holder, joined) = Holder::start(Some(Path::new("/proc/self/ns/net"))).unwrap();
        holder.release();
        assert_eq!(ino(&joined.path()), ours);
    }

    #[test]
    fn a_hung_hook_fails_within_its_timeout() {
        let h = spec(serde_json::json!({"prestart": [{"path": "/bin/sleep", "args": ["sleep", "30"], "timeout": 1}]}));
        let e = format!("{:#}", Hooks::from_spec(&h).unwrap().run_create(&state()).unwrap_err());
        assert!(e.contains("did not end"), "{e}");
    }
}
