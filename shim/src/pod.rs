//! Pods, as the CRI makes them: a sandbox container (the pause process)
//! whose namespaces the pod's other containers join.
//!
//! containerd's CRI plugin names those namespaces by host paths: the pod's
//! network namespace file, and `/proc/<pid>/ns/{ipc,uts,pid}` of the pid the
//! shim reported for the sandbox, which for hearth is hearth-vmm's (task.rs,
//! `host_pid`). Neither means anything in the VM, and the translation for the
//! guest drops every namespace path (oci/src/translate.rs). So a container
//! that belongs to a pod whose sandbox this shim serves joins, in the VM,
//! the namespaces of the sandbox's init there: the namespaces the spec named
//! by path, and only those (a pod without shared pids gives no pid path).
//!
//! The sandbox's guest pid comes from the agent; it is only ever used to
//! name a path in the guest, never a host process.

use anyhow::{bail, Result};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// The sandbox `spec`'s container belongs to, if it is a CRI pod's
/// container (not the sandbox itself).
pub fn sandbox_of(spec: &Spec) -> Option<String> {
    let a = spec.annotations().as_ref()?;
    (a.get(CONTAINER_TYPE).map(String::as_str) == Some("container"))
        .then(|| a.get(SANDBOX_ID).cloned())
        .flatten()
        .filter(|id| !id.is_empty())
}

/// The pod's cgroup on the host, relative to the cgroup v2 root, from a
/// sandbox's spec: containerd gives the sandbox `<cgroup_parent>/<id>` with
/// cgroupfs paths. None for systemd's `slice:prefix:name` form, for a
/// pod's container, and for a path that would leave the hierarchy.
pub fn cgroup_parent(spec: &Spec) -> Option<std::path::PathBuf> {
    let a = spec.annotations().as_ref()?;
    if a.get(CONTAINER_TYPE).map(String::as_str) != Some("sandbox") {
        return None;
    }
    let path = spec.linux().as_ref()?.cgroups_path().clone()?;
    if !path.is_absolute() {
        return None;
    }
    let parent = path.parent()?.strip_prefix("/").ok()?.to_path_buf();
    crate::cgroup::is_beneath(&parent).then_some(parent)
}

/// The namespaces the spec asks to join by path: those the pod shares.
pub fn shared_namespaces(spec: &Spec) -> Vec<LinuxNamespaceType> {
    let nss = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref());
    nss.into_iter()
        .flatten()
        .filter(|ns| ns.path().as_ref().is_some_and(|p| !p.as_os_str().is_empty()))
        .map(|ns| ns.typ())
        .collect()
}

/// The name of a namespace kind under /proc/<pid>/ns.
fn proc_name(t: LinuxNamespaceType) -> Option<&'static str> {
    Some(match t {
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Pid => "pid",
        _ => return None,
    })
}

/// Points each of `shared` (from [`shared_namespaces`], read before the
/// translation dropped the paths) at the sandbox's in the guest, whose init
/// is `sandbox_pid` there. A kind a pod does not share (mount, user,
/// cgroup) is refused by name rather than silently made new.
pub fn join_sandbox(spec: &mut Spec, shared: &[LinuxNamespaceType], sandbox_pid: u32) -> Result<()> {
    for t in shared {
        if proc_name(*t).is_none() {
            bail!("the spec joins a {t:?} namespace by path, which a hearth pod does not share (only network, ipc, uts and pid)");
        }
    }
    let Some(mut linux) = spec.linux().clone() else { return Ok(()) };
    if let Some(nss) = linux.namespaces().clone() {
        let nss = nss
            .into_iter()
            .map(|mut ns| {
                if shared.contains(&ns.typ()) {
                    let name = proc_name(ns.typ()).unwrap_or_default();
                    ns.set_path(Some(format!("/proc/{sandbox_pid}/ns/{name}").into()));
                }
                ns
            })
            .collect();
        linux.set_namespaces(Some(nss));
    }
    spec.set_linux(Some(linux));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: &str, nss: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "annotations": {CONTAINER_TYPE: kind, SANDBOX_ID: "sb1"},
            "linux": {"namespaces": nss}
        }))
        .unwrap()
    }

    #[test]
    fn a_pod_container_joins_the_sandboxs_namespaces_it_named() {
        let nss = serde_json::json!([
            {"type": "pid", "path": "/proc/4242/ns/pid"},
            {"type": "ipc", "path": "/proc/4242/ns/ipc"},
            {"type": "uts", "path": "/proc/4242/ns/uts"},
            {"type": "mount"},
            {"type": "network", "path": "/var/run/netns/cni-1"}
        ]);
        let mut s = spec("container", nss);
        assert_eq!(sandbox_of(&s).as_deref(), Some("sb1"));
        let shared = shared_namespaces(&s);
        assert_eq!(shared.len(), 4);
        join_sandbox(&mut s, &shared, 77).unwrap();
        let got: Vec<(String, Option<String>)> = s
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|ns| (format!("{:?}", ns.typ()), ns.path().as_ref().map(|p| p.display().to_string())))
            .collect();
        assert_eq!(got[0].1.as_deref(), Some("/proc/77/ns/pid"));
        assert_eq!(got[1].1.as_deref(), Some("/proc/77/ns/ipc"));
        assert_eq!(got[2].1.as_deref(), Some("/proc/77/ns/uts"));
        assert_eq!(got[3].1, None, "the mount namespace stays the container's own");
        assert_eq!(got[4].1.as_deref(), Some("/proc/77/ns/net"));
    }

    #[test]
    fn a_pod_without_shared_pids_keeps_its_own_pid_namespace() {
        let nss = serde_json::json!([{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]);
        let mut s = spec("container", nss);
        let shared = shared_namespaces(&s);
        join_sandbox(&mut s, &shared, 77).unwrap();
        let nss = s.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert_eq!(nss[0].path(), &None);
    }

    #[test]
    fn the_sandbox_itself_and_plain_containers_are_no_pod_members() {
        assert_eq!(sandbox_of(&spec("sandbox", serde_json::json!([]))), None);
        let plain: Spec =
            serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2", "root": {"path": "rootfs"}})).unwrap();
        assert_eq!(sandbox_of(&plain), None);
    }

    #[test]
    fn a_sandboxs_cgroup_parent_is_its_cgroupfs_path_less_its_id() {
        let with = |kind: &str, path: &str| -> Spec {
            serde_json::from_value(serde_json::json!({
                "ociVersion": "1.0.2",
                "root": {"path": "rootfs"},
                "annotations": {CONTAINER_TYPE: kind, SANDBOX_ID: "sb1"},
                "linux": {"cgroupsPath": path}
            }))
            .unwrap()
        };
        let p = cgroup_parent(&with("sandbox", "/kubepods/besteffort/pod-u1/sb1"));
        assert_eq!(p.as_deref(), Some(std::path::Path::new("kubepods/besteffort/pod-u1")));
        assert_eq!(cgroup_parent(&with("container", "/kubepods/pod-u1/c1")), None);
        assert_eq!(cgroup_parent(&with("sandbox", "kubepods-pod.slice:cri-containerd:sb1")), None);
        assert_eq!(cgroup_parent(&with("sandbox", "/kubepods/../../x/sb1")), None);
        assert_eq!(cgroup_parent(&with("sandbox", "/sb1")), None);
    }

    #[test]
    fn a_shared_user_namespace_is_refused_by_name() {
        let mut s = spec("container", serde_json::json!([{"type": "user", "path": "/proc/1/ns/user"}]));
        let shared = shared_namespaces(&s);
        let e = join_sandbox(&mut s, &shared, 77).unwrap_err().to_string();
        assert!(e.contains("User"), "{e}");
    }
}
