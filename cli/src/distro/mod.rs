//! Distros: whole Linux distributions kept as long-lived containerd
//! containers in hearth's namespace, run by the hearth runtime in the
//! utility VM.
//!
//! containerd is the registry: a distro is a container whose labels say it
//! is one (name, OS, init), with an active snapshot of its own as its root
//! filesystem. That snapshot outlives the distro's task, so what is written
//! in a distro survives `terminate` and a VM restart; only `unregister`
//! removes it.
//!
//! - [`spec`]: the runtime spec of a distro's init and its processes;
//! - [`lifecycle`]: register, start, terminate, unregister;
//! - [`install`]: install from a recipe, import a root filesystem tar;
//! - [`export`]: a distro's files as a root filesystem tar;
//! - [`disk`]: distros on ext4 disk images (`import --vhd`, `export --vhd`).

pub mod disk;
pub mod export;
pub mod install;
pub mod lifecycle;
pub mod spec;

use std::collections::HashMap;

use anyhow::{bail, Result};
use containerd_client::services::v1::Container;

use crate::config::Config;
use crate::containerd::task::TaskState;
use crate::containerd::Containerd;

pub const LABEL_DISTRO: &str = "io.hearth.distro";
pub const LABEL_OS: &str = "io.hearth.os";
pub const LABEL_INIT: &str = "io.hearth.init";
pub const LABEL_SYSTEMD: &str = "io.hearth.systemd";
pub const LABEL_SOURCE: &str = "io.hearth.source";
pub const LABEL_CREATED: &str = "io.hearth.created";

/// A registered distro.
#[derive(Debug, Clone)]
pub struct Distro {
    pub name: String,
    /// Its OS, from os-release.
    pub os: String,
    /// Its init; a waiting shell when None.
    pub init: Option<String>,
    pub systemd: bool,
    /// How it came to be (`debian bookworm`, `import FILE`).
    pub source: String,
    pub image: String,
    pub snapshot_key: String,
    /// Unix seconds.
    pub created: u64,
    /// The ext4 image it runs on, for a distro on a disk image (see
    /// [`disk`]); None for one on a containerd snapshot.
    pub disk: Option<std::path::PathBuf>,
}

/// Whether a distro runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running {
        pid: u32,
    },
    Stopped,
    /// Its task exists but is neither running nor stopped (being created).
    Starting,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Running { .. } => "Running",
            State::Stopped => "Stopped",
            State::Starting => "Starting",
        })
    }
}

/// Distro names are container ids, file names and hostnames at once.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
    if !ok {
        bail!("{name:?} is not a valid distro name: use up to 63 letters, digits, '-', '.' and '_', starting with a letter or digit");
    }
    Ok(())
}

impl Distro {
    fn from_container(c: &Container) -> Option<Distro> {
        let l = &c.labels;
        let name = l.get(LABEL_DISTRO)?.clone();
        Some(Distro {
            name,
            os: l.get(LABEL_OS).cloned().unwrap_or_default(),
            init: l.get(LABEL_INIT).filter(|s| !s.is_empty()).cloned(),
            systemd: l.get(LABEL_SYSTEMD).is_some_and(|v| v == "true"),
            source: l.get(LABEL_SOURCE).cloned().unwrap_or_default(),
            image: c.image.clone(),
            snapshot_key: c.snapshot_key.clone(),
            created: l.get(LABEL_CREATED).and_then(|v| v.parse().ok()).unwrap_or(0),
            disk: l.get(disk::LABEL_DISK).filter(|s| !s.is_empty()).map(Into::into),
        })
    }

    fn labels(&self) -> HashMap<String, String> {
        let mut l = HashMap::from([
            (LABEL_DISTRO.into(), self.name.clone()),
            (LABEL_OS.into(), self.os.clone()),
            (LABEL_INIT.into(), self.init.clone().unwrap_or_default()),
            (LABEL_SYSTEMD.into(), self.systemd.to_string()),
            (LABEL_SOURCE.into(), self.source.clone()),
            (LABEL_CREATED.into(), self.created.to_string()),
        ]);
        if let Some(disk) = &self.disk {
            l.insert(disk::LABEL_DISK.into(), disk.display().to_string());
        }
        l
    }

    /// The signal that stops its init cleanly.
    pub fn stop_signal(&self) -> i32 {
        if self.systemd {
            spec::systemd_stop_signal()
        } else {
            libc::SIGTERM
        }
    }
}

/// containerd and the settings: what every command works with.
pub struct Hearth {
    pub cd: Containerd,
    pub cfg: Config,
}

impl Hearth {
    pub async fn connect(cfg: Config) -> Result<Hearth> {
        let cd = Containerd::connect(&cfg.containerd_address, &cfg.namespace).await?;
        Ok(Hearth { cd, cfg })
    }

    /// Every distro, by name.
    pub async fn distros(&self) -> Result<Vec<Distro>> {
        let cs = self.cd.list_containers(&format!("labels.\"{LABEL_DISTRO}\"")).await?;
        let mut ds: Vec<Distro> = cs.iter().filter_map(Distro::from_container).collect();
        ds.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(ds)
    }

    /// The distro `name`, or an error saying which exist.
    pub async fn distro(&self, name: &str) -> Result<Distro> {
        if let Some(d) = self.cd.container(name).await?.as_ref().and_then(Distro::from_container) {
            return Ok(d);
        }
        let names: Vec<String> = self.distros().await?.into_iter().map(|d| d.name).collect();
        if names.is_empty() {
            bail!(
                "there is no distro {name:?}, and none is installed: install one with `hearth distro install debian`"
            );
        }
        bail!("there is no distro {name:?}; the distros are: {} (`hearth list`)", names.join(", "));
    }

    /// The distro a command without `-d` means.
    pub async fn default_distro(&self) -> Result<Distro> {
        if let Some(name) = &self.cfg.default_distro {
            return self.distro(name).await;
        }
        let ds = self.distros().await?;
        match ds.as_slice() {
            [] => bail!("no distro is installed: install one with `hearth distro install debian`"),
            [one] => Ok(one.clone()),
            _ => bail!(
                "no default distro is set and there are several ({}): name one with `-d NAME`, or set one with `hearth set-default NAME`",
                ds.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    pub async fn state(&self, name: &str) -> Result<State> {
        Ok(match self.cd.task_state(name, "").await? {
            None | Some((TaskState::Stopped { .. }, _)) => State::Stopped,
            Some((TaskState::Running, pid)) => State::Running { pid },
            Some(_) => State::Starting,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["debian", "deb-12", "a.b_c", "x"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "-x", "a/b", "a b", &"x".repeat(64), "dé"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn labels_round_trip() {
        let d = Distro {
            name: "deb".into(),
            os: "Debian GNU/Linux 12 (bookworm)".into(),
            init: Some("/sbin/init".into()),
            systemd: true,
            source: "debian bookworm".into(),
            image: "img".into(),
            snapshot_key: "key".into(),
            created: 17,
            disk: None,
        };
        let c = Container {
            id: "deb".into(),
            labels: d.labels(),
            image: "img".into(),
            snapshot_key: "key".into(),
            ..Default::default()
        };
        let back = Distro::from_container(&c).unwrap();
        assert_eq!(format!("{back:?}"), format!("{d:?}"));
        assert_eq!(back.stop_signal(), libc::SIGRTMIN() + 3);
        assert!(Distro::from_container(&Container::default()).is_none(), "a container without the label is no distro");
        // A disk-backed one keeps its image.
        let on_disk = Distro { disk: Some("/var/lib/hearth/disks/deb.img".into()), ..d };
        let c = Container { id: "deb".into(), labels: on_disk.labels(), ..Default::default() };
        assert_eq!(Distro::from_container(&c).unwrap().disk, on_disk.disk);
    }
}
