//! Bringing a distro in: built from a recipe (`distro install debian`) or
//! from a root filesystem tar (`distro import`). Either way the tree becomes
//! a one-layer image in containerd, unpacked, and a distro registered on it.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use hearth_rootfs::debian::distro_recipe;
use hearth_rootfs::tree::{self as rootfs, Layer, RootfsInfo};

use super::{check_name, Distro, Hearth};
use crate::containerd::lease::{unique, Lease};

/// `hearth distro install debian`'s choices.
pub struct DebianInstall<'a> {
    pub name: &'a str,
    pub release: &'a str,
    pub include: &'a [String],
}

impl Hearth {
    /// Imports `layer` as image `image` and registers distro `name` on it,
    /// everything under one lease so that nothing is collected half-way.
    async fn bring_in(
        &self,
        name: &str,
        image: &str,
        layer: &Layer,
        info: &RootfsInfo,
        source: &str,
    ) -> Result<Distro> {
        let lease = Lease::create(&self.cd, "install", Duration::from_secs(6 * 3600)).await?;
        let result = async {
            let cmd: Vec<&str> = info.init.as_deref().into_iter().collect();
            let labels = [(super::LABEL_OS.to_string(), info.os_name.clone())].into();
            let imported =
                self.cd.with_lease(&lease.id).import_layer(image, layer, &cmd, labels, &self.cfg.snapshotter).await?;
            self.register(name, &imported, info, source).await
        }
        .await;
        lease.delete(&self.cd).await?;
        result
    }

    /// Refuses a name in use before anything is built.
    async fn check_free_to_install(&self, name: &str) -> Result<()> {
        check_name(name)?;
        if self.cd.container(name).await?.is_some() {
            anyhow::bail!(
                "a distro named {name:?} is installed already: `hearth -d {name}` runs it; pick another with --name, or \
                 `hearth distro unregister {name}` first"
            );
        }
        Ok(())
    }

    /// The recipe's tree (built, or found in the cache) and the distro's
    /// `source` label (`debian RELEASE{layout} +INCLUDES`).
    fn debian_tree(&self, opts: &DebianInstall<'_>, layout: &str) -> Result<(rootfs::Built, String)> {
        let recipe = distro_recipe(opts.release, opts.include, &self.cfg.mirror);
        let built = tokio::task::block_in_place(|| rootfs::ensure_built(&recipe, &self.cfg.cache_dir))?;
        let mut source = format!("debian {}{layout}", opts.release);
        if !opts.include.is_empty() {
            source.push_str(&format!(" +{}", opts.include.join(",")));
        }
        Ok((built, source))
    }

    /// Builds (or finds in the cache) the Debian tree and installs it.
    pub async fn install_debian(&self, opts: &DebianInstall<'_>) -> Result<Distro> {
        self.check_free_to_install(opts.name).await?;
        let (built, source) = self.debian_tree(opts, "")?;
        let tag = format!("{}-{}", opts.release, &built.digest.trim_start_matches("sha256:")[..12]);
        let image = format!("hearth.local/distro/debian:{tag}");
        self.bring_in(opts.name, &image, &built.layer(), &built.info, &source).await
    }

    /// Builds (or finds in the cache) the Debian tree and installs it on a
    /// disk image of its own (see disk.rs).
    pub async fn install_debian_on_disk(&self, opts: &DebianInstall<'_>, size_gib: u64) -> Result<Distro> {
        self.check_free_to_install(opts.name).await?;
        let (built, source) = self.debian_tree(opts, " on a disk")?;
        self.register_tar_on_disk(opts.name, &built.tar, size_gib, source).await
    }

    /// Refuses an import under a name in use, or of something that is no file.
    async fn check_import(&self, name: &str, file: &Path) -> Result<()> {
        check_name(name)?;
        if self.cd.container(name).await?.is_some() {
            anyhow::bail!("a distro named {name:?} exists already: import under another name");
        }
        if !file.is_file() {
            anyhow::bail!(
                "{} is not a file: name a root filesystem tar (as `hearth distro export` makes)",
                file.display()
            );
        }
        Ok(())
    }

    /// Imports a root filesystem tar (plain or gzipped) as distro `name`, on
    /// a disk image of its own of at most `size_gib` GiB.
    pub async fn import_on_disk(&self, name: &str, file: &Path, size_gib: u64) -> Result<Distro> {
        self.check_import(name, file).await?;
        // Read through first: a file that is no root filesystem tar is
        // refused before anything is written.
        tokio::task::block_in_place(|| rootfs::inspect(file, &format!("reading {}", file.display())))?;
        self.register_tar_on_disk(name, file, size_gib, format!("import {}", file.display())).await
    }

    /// Imports a root filesystem tar (plain or gzipped) as distro `name`.
    pub async fn import(&self, name: &str, file: &Path) -> Result<Distro> {
        self.check_import(name, file).await?;
        let (layer, info) =
            tokio::task::block_in_place(|| rootfs::inspect(file, &format!("reading {}", file.display())))?;
        if info.init.is_none() {
            tracing::warn!(
                "{} has no /sbin/init: distro {name} will run a waiting shell as its init (no services)",
                file.display()
            );
        }
        let image = format!("hearth.local/import/{name}:{}", unique());
        self.bring_in(name, &image, &layer, &info, &format!("import {}", file.display())).await
    }
}
