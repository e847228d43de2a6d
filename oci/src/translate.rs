//! Translating a spec written for the host (by containerd) into one for the
//! utility VM: what names host paths must name paths the guest can reach.
//!
//! The shim exports one shared directory over virtio-fs. Each host path a
//! container needs (bind-mount sources) is bind-mounted by the shim into that
//! directory, and the spec is rewritten to name the guest's view of it.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespace, Spec};

/// One host path to bind into the shared directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    /// The host path.
    pub source: PathBuf,
    /// Where to bind it, relative to the shared directory.
    pub in_share: PathBuf,
    /// `rbind`: the mounts beneath the source come along; a plain `bind`
    /// binds the source alone.
    pub recursive: bool,
    /// `ro`: the bind in the share is read-only on the host too, so that
    /// root in the guest, which can reach the share directly, cannot write
    /// through it either.
    pub readonly: bool,
}

fn is_bind(kind: Option<&str>, options: &[String]) -> bool {
    kind == Some("bind") || options.iter().any(|o| o == "bind" || o == "rbind")
}

/// Rewrites `spec` for the guest, where the shared directory is mounted at
/// `guest_shared`, and returns the host paths to bind into the share for
/// container `id`.
///
/// - bind mounts with a host source: moved into the share;
/// - namespaces given by path (a host's netns file, say): the guest cannot
///   join a host namespace, so the container gets a new one (the shim
///   mirrors a network namespace's interfaces into it: shim/src/netns.rs);
/// - hooks: they name host programs, which the guest does not have (the
///   shim runs those it can on the host: shim/src/hooks.rs).
pub fn for_guest(spec: &mut Spec, id: &str, guest_shared: &Path) -> Vec<HostBind> {
    let mut binds = Vec::new();
    if let Some(mounts) = spec.mounts().clone() {
        let mut out = Vec::with_capacity(mounts.len());
        for (i, mut m) in mounts.into_iter().enumerate() {
            let options = m.options().clone().unwrap_or_default();
            if let Some(src) = m.source().clone() {
                if is_bind(m.typ().as_deref(), &options) && src.is_absolute() {
                    let in_share = PathBuf::from(id).join("mounts").join(i.to_string());
                    m.set_source(Some(guest_shared.join(&in_share)));
                    let recursive = options.iter().any(|o| o == "rbind");
                    // The last of ro and rw wins, as in mount(8).
                    let readonly = options.iter().rev().find(|o| *o == "ro" || *o == "rw").is_some_and(|o| o == "ro");
                    binds.push(HostBind { source: src, in_share, recursive, readonly });
                }
            }
            out.push(m);
        }
        spec.set_mounts(Some(out));
    }
    if let Some(mut linux) = spec.linux().clone() {
        if let Some(nss) = linux.namespaces().clone() {
            let nss: Vec<LinuxNamespace> = nss
                .into_iter()
                .map(|mut ns| {
                    ns.set_path(None);
                    ns
                })
                .collect();
            linux.set_namespaces(Some(nss));
        }
        spec.set_linux(Some(linux));
    }
    spec.set_hooks(None);
    binds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_sources_move_into_the_share_and_paths_go() {
        let mut spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro"]},
                {"destination": "/etc/hosts", "source": "/var/lib/x/hosts", "options": ["bind"]},
                {"destination": "/cfg", "type": "bind", "source": "/etc/x", "options": ["ro", "bind", "rw"]}
            ],
            "hooks": {"prestart": [{"path": "/usr/bin/hook"}]},
            "linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "pid"}]}
        }))
        .unwrap();
        let binds = for_guest(&mut spec, "c1", Path::new("/run/hearth/shared"));
        assert_eq!(
            binds,
            vec![
                HostBind {
                    source: "/srv/data".into(),
                    in_share: "c1/mounts/1".into(),
                    recursive: true,
                    readonly: true
                },
                HostBind {
                    source: "/var/lib/x/hosts".into(),
                    in_share: "c1/mounts/2".into(),
                    recursive: false,
                    readonly: false
                },
                HostBind { source: "/etc/x".into(), in_share: "c1/mounts/3".into(), recursive: false, readonly: false },
            ]
        );
        let mounts = spec.mounts().as_ref().unwrap();
        assert_eq!(mounts[0].source().as_deref(), Some(Path::new("proc")));
        assert_eq!(mounts[1].source().as_deref(), Some(Path::new("/run/hearth/shared/c1/mounts/1")));
        assert!(spec.hooks().is_none());
        let nss = spec.linux().as_ref().unwrap().namespaces().as_ref().unwrap();
        assert!(nss.iter().all(|n| n.path().is_none()));
    }
}
