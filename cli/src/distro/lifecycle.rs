//! A distro's life: registered from an unpacked image, started (its init
//! as a task of the hearth runtime, which boots the utility VM on first
//! use), terminated (its init stopped cleanly, then killed if it lingers),
//! unregistered (container, root filesystem and, when no other distro uses
//! it, image removed).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::Container;

use super::spec::DistroSpec;
use super::{check_name, Distro, Hearth, State};
use crate::containerd::image::Imported;
use crate::containerd::lease::Lease;
use crate::containerd::task::Stdio;
use crate::containerd::SPEC_TYPE_URL;
use hearth_rootfs::tree::RootfsInfo;

/// containerd's generic runtime options (`runtimeoptions.v1.Options`) naming
/// a configuration file, as `ctr run --runtime-config-path` sends them: the
/// shim boots the VM from that file (and gives it a VM of its own).
fn runtime_options(config_path: &std::path::Path) -> prost_types::Any {
    // message Options { string type_url = 1; string config_path = 2; }
    let path = config_path.as_os_str().as_encoded_bytes();
    let mut value = vec![0x12];
    let mut n = path.len();
    while n >= 0x80 {
        value.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    value.push(n as u8);
    value.extend_from_slice(path);
    prost_types::Any { type_url: "runtimeoptions.v1.Options".into(), value }
}

impl Hearth {
    pub(super) fn spec_for(&self, d: &Distro) -> Result<prost_types::Any> {
        let share = self.cfg.host_share.as_deref().filter(|p| p.is_dir());
        let spec = DistroSpec {
            name: &d.name,
            init: d.init.as_deref(),
            host_share: share.map(|p| (p, self.cfg.host_share_path.as_str())),
            init_env: &self.cfg.init_env,
        };
        let mut json = spec.to_json();
        if let Some(disk) = &d.disk {
            // The shim attaches this image and the agent mounts it as the root.
            json["annotations"][containerd_shim_hearth_v2::disk::ANNOTATION] = disk.display().to_string().into();
        } else {
            // A distro on a snapshot keeps its files in that snapshot: never
            // on an image of its layers with its writes in the VM's memory.
            json["annotations"][containerd_shim_hearth_v2::layers::ANNOTATION] = "virtio-fs".into();
        }
        Ok(prost_types::Any { type_url: SPEC_TYPE_URL.into(), value: serde_json::to_vec(&json)? })
    }

    pub(super) fn runtime(&self) -> Runtime {
        Runtime { name: self.cfg.runtime.clone(), options: self.cfg.vm_config.as_deref().map(runtime_options) }
    }

    /// Makes distro `name` of an unpacked image: a writable snapshot of its
    /// own on top of the image, and the container that is its record.
    pub async fn register(&self, name: &str, image: &Imported, info: &RootfsInfo, source: &str) -> Result<Distro> {
        check_name(name)?;
        if self.cd.container(name).await?.is_some() {
            bail!("a distro (or container) named {name:?} exists already: pick another name, or `hearth distro unregister {name}`");
        }
        let d = Distro {
            name: name.into(),
            os: info.os_name.clone(),
            init: info.init.clone(),
            systemd: info.systemd,
            source: source.into(),
            image: image.name.clone(),
            snapshot_key: format!("hearth-distro-{name}"),
            created: SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs(),
            disk: None,
        };
        let lease = Lease::create(&self.cd, "register", Duration::from_secs(3600)).await?;
        let leased = self.cd.with_lease(&lease.id);
        let result = async {
            leased.prepare_snapshot(&self.cfg.snapshotter, &d.snapshot_key, &image.chain_id, HashMap::new()).await?;
            let c = Container {
                id: name.into(),
                labels: d.labels(),
                image: image.name.clone(),
                runtime: Some(self.runtime()),
                spec: Some(self.spec_for(&d)?),
                snapshotter: self.cfg.snapshotter.clone(),
                snapshot_key: d.snapshot_key.clone(),
                ..Default::default()
            };
            leased.create_container(c).await
        }
        .await;
        if result.is_err() {
            let _ = self.cd.remove_snapshot(&self.cfg.snapshotter, &d.snapshot_key).await;
        }
        lease.delete(&self.cd).await?;
        result?;
        Ok(d)
    }

    /// Makes the container again with the runtime in force (`vm_config`
    /// changed since it was made): containerd cannot update a container's
    /// runtime. A lease holds its root filesystem meanwhile.
    async fn recreate(&self, mut c: Container) -> Result<()> {
        let lease = Lease::create(&self.cd, "recreate", Duration::from_secs(600)).await?;
        let result = async {
            if !c.snapshot_key.is_empty() {
                lease.hold_snapshot(&self.cd, &c.snapshotter, &c.snapshot_key).await?;
            }
            self.cd.delete_container(&c.id).await?;
            c.runtime = Some(self.runtime());
            self.cd.create_container(c).await
        }
        .await;
        lease.delete(&self.cd).await?;
        result.map(|_| ())
    }

    /// Where a distro's console (its init's output) goes.
    pub fn console_log(&self, name: &str) -> std::path::PathBuf {
        self.cfg.log_dir.join(format!("{name}.log"))
    }

    /// Starts the distro's init unless it runs; true if it was started now.
    pub async fn start(&self, d: &Distro) -> Result<bool> {
        match self.state(&d.name).await? {
            State::Running { .. } => return Ok(false),
            // A task left behind (its init ended, or a start was cut short).
            State::Stopped | State::Starting => {
                let _ = self.cd.kill(&d.name, "", libc::SIGKILL, true).await;
                self.cd.delete_task(&d.name).await?;
            }
        }
        // The spec follows the settings in force (the host share may have
        // changed since the distro was registered).
        let mut c = self.cd.container(&d.name).await?.context("the distro's container vanished")?;
        c.spec = Some(self.spec_for(d)?);
        if c.runtime.as_ref() == Some(&self.runtime()) {
            self.cd.update_container(c, &["spec"]).await?;
        } else {
            self.recreate(c).await?;
        }
        // A disk-backed distro's root comes with the spec (its annotation).
        let rootfs = match d.disk {
            Some(_) => Vec::new(),
            None => self.cd.snapshot_mounts(&self.cfg.snapshotter, &d.snapshot_key).await?,
        };
        std::fs::create_dir_all(&self.cfg.log_dir)
            .with_context(|| format!("creating the log directory {}", self.cfg.log_dir.display()))?;
        let log = format!("file://{}", self.console_log(&d.name).display());
        // The init's terminal (its /dev/console) goes to the log.
        let stdio = Stdio { stdout: log, terminal: true, ..Default::default() };
        let vm_up = crate::vm::find_record(&self.cfg).ok().flatten().is_some();
        let what = if vm_up {
            format!("starting {}", d.name)
        } else {
            format!("starting {} (booting the utility VM first)", d.name)
        };
        let progress = hearth_rootfs::progress::Progress::new(&what);
        let started = async {
            self.cd.create_task(&d.name, rootfs, &stdio).await?;
            self.cd.start(&d.name, "").await
        }
        .await;
        match started {
            Ok(pid) => {
                progress.finish(&format!("init running (pid {pid} in the VM)"));
                Ok(true)
            }
            Err(e) => {
                progress.finish("failed");
                let _ = self.cd.delete_task(&d.name).await;
                Err(e).with_context(|| {
                    format!("starting distro {} (its console log: {})", d.name, self.console_log(&d.name).display())
                })
            }
        }
    }

    /// Stops the distro's init: its clean-shutdown signal, then SIGKILL to
    /// everything in it after the stop timeout. True if it was running.
    pub async fn terminate(&self, d: &Distro) -> Result<bool> {
        let was_running = match self.state(&d.name).await? {
            State::Running { .. } => {
                self.cd.kill(&d.name, "", d.stop_signal(), false).await?;
                let grace = Duration::from_secs(self.cfg.stop_timeout_secs);
                if tokio::time::timeout(grace, self.cd.wait(&d.name, "")).await.is_err() {
                    tracing::warn!(distro = %d.name, "its init did not stop within {grace:?}: killing it");
                    self.cd.kill(&d.name, "", libc::SIGKILL, true).await?;
                    self.cd.wait(&d.name, "").await?;
                }
                true
            }
            State::Starting => {
                self.cd.kill(&d.name, "", libc::SIGKILL, true).await?;
                false
            }
            State::Stopped => false,
        };
        self.cd.delete_task(&d.name).await?;
        Ok(was_running)
    }

    /// Removes the distro and its files; its image too when no other distro
    /// uses it.
    pub async fn unregister(&self, d: &Distro) -> Result<()> {
        self.terminate(d).await?;
        self.cd.delete_container(&d.name).await?;
        if let Some(disk) = &d.disk {
            std::fs::remove_file(disk).with_context(|| format!("removing the disk image {}", disk.display()))?;
            let _ = std::fs::remove_file(self.console_log(&d.name));
            return Ok(());
        }
        self.cd.remove_snapshot(&self.cfg.snapshotter, &d.snapshot_key).await?;
        let others = self.distros().await?;
        if !others.iter().any(|o| o.image == d.image) {
            self.cd.delete_image(&d.image).await?;
        }
        let _ = std::fs::remove_file(self.console_log(&d.name));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_options_carry_the_config_path_as_the_shim_reads_it() {
        for path in ["/etc/hearth/distros.toml", &format!("/{}", "d/".repeat(80))] {
            let any = runtime_options(std::path::Path::new(path));
            let got = containerd_shim_hearth_v2::config::config_path_from_options(&any.type_url, &any.value);
            assert_eq!(got.as_deref(), Some(std::path::Path::new(path)));
        }
    }
}
