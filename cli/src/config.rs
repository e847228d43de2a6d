//! The CLI's settings: a system file (`/etc/hearth/cli.toml`, or the file
//! `$HEARTH_CLI_CONFIG` names) and a per-user file beside it
//! (`$XDG_CONFIG_HOME/hearth/cli.toml`, else `~/.config/hearth/cli.toml`);
//! what the user's file sets wins. Every key is optional (docs/distros.md
//! lists them); unknown keys are errors that name the file.
//!
//! The utility VM's own settings (memory, CPUs, kernel) are the shim's
//! (`/etc/hearth/config.toml`, docs/usage.md); `vm_config` names another
//! such file for the distros' VM.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub const SYSTEM_PATH: &str = "/etc/hearth/cli.toml";

/// One settings file, as written: every key optional.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// containerd's socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub containerd_address: Option<PathBuf>,
    /// The containerd namespace distros live in (one utility VM per namespace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The containerd runtime that runs distros.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// A hearth VM configuration for the distros' VM (handed to the shim as
    /// the runtime option ConfigPath); the shim's default when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_config: Option<PathBuf>,
    /// The distro `hearth` runs in when none is named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_distro: Option<String>,
    /// The host directory shared into every distro; "" shares none. The
    /// user's home by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_share: Option<PathBuf>,
    /// Where the host directory appears in distros.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_share_path: Option<String>,
    /// Where built distro root filesystems are cached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// Where each distro's console (its init's output) is written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_dir: Option<PathBuf>,
    /// The Debian mirror distros are built from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    /// How long `terminate` waits for a distro's init to stop cleanly before
    /// killing it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_timeout_secs: Option<u64>,
    /// containerd's snapshotter for distro root filesystems.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshotter: Option<String>,
    /// More environment for distros' init, as `KEY=value` (for example
    /// `SYSTEMD_LOG_LEVEL=debug` to see systemd's boot in the console log).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_env: Option<Vec<String>>,
    /// Whether `install` and `import` put a new distro on an ext4 disk image
    /// of its own (true, the default) or on a containerd snapshot shared
    /// over virtio-fs (false); `--disk` and `--snapshot` choose per command.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distro_disk: Option<bool>,
    /// The largest size in GiB of a new distro's disk image (sparse).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distro_disk_size_gib: Option<u64>,
}

/// The settings in force, defaults filled in.
#[derive(Debug, Clone)]
pub struct Config {
    pub containerd_address: PathBuf,
    pub namespace: String,
    pub runtime: String,
    pub vm_config: Option<PathBuf>,
    pub default_distro: Option<String>,
    pub host_share: Option<PathBuf>,
    pub host_share_path: String,
    pub cache_dir: PathBuf,
    pub log_dir: PathBuf,
    pub mirror: String,
    pub stop_timeout_secs: u64,
    pub snapshotter: String,
    pub init_env: Vec<String>,
    pub distro_disk: bool,
    pub distro_disk_size_gib: u64,
    /// The per-user file, which `set-default` writes.
    pub user_file: PathBuf,
}

impl Settings {
    pub fn from_file(path: &Path) -> Result<Settings> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{} is not a valid hearth CLI config: {e}", path.display()))
    }

    /// `self`, with what `over` sets replacing it.
    fn overlay(self, over: Settings) -> Settings {
        Settings {
            containerd_address: over.containerd_address.or(self.containerd_address),
            namespace: over.namespace.or(self.namespace),
            runtime: over.runtime.or(self.runtime),
            vm_config: over.vm_config.or(self.vm_config),
            default_distro: over.default_distro.or(self.default_distro),
            host_share: over.host_share.or(self.host_share),
            host_share_path: over.host_share_path.or(self.host_share_path),
            cache_dir: over.cache_dir.or(self.cache_dir),
            log_dir: over.log_dir.or(self.log_dir),
            mirror: over.mirror.or(self.mirror),
            stop_timeout_secs: over.stop_timeout_secs.or(self.stop_timeout_secs),
            snapshotter: over.snapshotter.or(self.snapshotter),
            init_env: over.init_env.or(self.init_env),
            distro_disk: over.distro_disk.or(self.distro_disk),
            distro_disk_size_gib: over.distro_disk_size_gib.or(self.distro_disk_size_gib),
        }
    }
}

/// The home of the user who ran hearth: under sudo, the invoking user's,
/// since the share and the per-user file are theirs.
pub fn user_home() -> Option<PathBuf> {
    if let Ok(name) = std::env::var("SUDO_USER") {
        if let Ok(Some(u)) = nix::unistd::User::from_name(&name) {
            return Some(u.dir);
        }
    }
    std::env::var_os("HOME").map(PathBuf::from)
}

fn user_file() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| user_home().map(|h| h.join(".config")))
        .unwrap_or_else(|| PathBuf::from("/root/.config"));
    base.join("hearth/cli.toml")
}

fn system_file() -> PathBuf {
    std::env::var_os("HEARTH_CLI_CONFIG").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(SYSTEM_PATH))
}

impl Config {
    /// The system file, then the user's, over the defaults.
    pub fn load() -> Result<Config> {
        let mut s = Settings::default();
        let system = system_file();
        if system.exists() || std::env::var_os("HEARTH_CLI_CONFIG").is_some() {
            s = s.overlay(Settings::from_file(&system)?);
        }
        let user = user_file();
        if user.exists() {
            s = s.overlay(Settings::from_file(&user)?);
        }
        Ok(Self::resolve(s, user))
    }

    fn resolve(s: Settings, user_file: PathBuf) -> Config {
        let host_share = match s.host_share {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p),
            None => user_home(),
        };
        Config {
            containerd_address: s.containerd_address.unwrap_or_else(|| "/run/containerd/containerd.sock".into()),
            namespace: s.namespace.unwrap_or_else(|| "hearth".into()),
            runtime: s.runtime.unwrap_or_else(|| "io.containerd.hearth.v2".into()),
            vm_config: s.vm_config,
            default_distro: s.default_distro,
            host_share,
            host_share_path: s.host_share_path.unwrap_or_else(|| "/mnt/host".into()),
            cache_dir: s.cache_dir.unwrap_or_else(|| "/var/cache/hearth".into()),
            log_dir: s.log_dir.unwrap_or_else(|| "/var/log/hearth".into()),
            mirror: s.mirror.unwrap_or_else(|| hearth_rootfs::debian::MIRROR.into()),
            stop_timeout_secs: s.stop_timeout_secs.unwrap_or(30),
            snapshotter: s.snapshotter.unwrap_or_else(|| "overlayfs".into()),
            init_env: s.init_env.unwrap_or_default(),
            distro_disk: s.distro_disk.unwrap_or(true),
            distro_disk_size_gib: s.distro_disk_size_gib.unwrap_or(crate::distro::disk::DEFAULT_SIZE_GIB),
            user_file,
        }
    }

    /// Writes `default_distro` into the per-user file, keeping its other keys.
    pub fn set_default(&self, name: &str) -> Result<()> {
        let mut s = if self.user_file.exists() { Settings::from_file(&self.user_file)? } else { Settings::default() };
        s.default_distro = Some(name.to_string());
        if let Some(dir) = self.user_file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&self.user_file, toml::to_string(&s)?)
            .with_context(|| format!("writing {}", self.user_file.display()))
    }

    /// The hearth VM configuration the distros' VM boots with: where its
    /// state (and its record, vm.json) lives.
    pub fn vm_settings(&self) -> Result<containerd_shim_hearth_v2::config::Config> {
        use containerd_shim_hearth_v2::config::Config as VmConfig;
        match &self.vm_config {
            Some(p) => VmConfig::from_file(p),
            None => VmConfig::load(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_users_file_wins_and_defaults_fill_in() {
        let system: Settings = toml::from_str("namespace = \"sys\"\ndefault_distro = \"a\"\n").unwrap();
        let user: Settings = toml::from_str("default_distro = \"b\"\nhost_share = \"\"\n").unwrap();
        let c = Config::resolve(system.overlay(user), "/u".into());
        assert_eq!(c.namespace, "sys");
        assert_eq!(c.default_distro.as_deref(), Some("b"));
        assert_eq!(c.host_share, None, "an empty host_share shares nothing");
        assert_eq!(c.host_share_path, "/mnt/host");
        assert_eq!(c.runtime, "io.containerd.hearth.v2");
    }

    #[test]
    fn unknown_keys_name_the_file() {
        let dir = std::env::temp_dir().join(format!("hearth-cli-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("cli.toml");
        std::fs::write(&f, "default = \"x\"\n").unwrap();
        let e = Settings::from_file(&f).unwrap_err().to_string();
        assert!(e.contains("cli.toml") && e.contains("default"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn set_default_keeps_other_keys() {
        let dir = std::env::temp_dir().join(format!("hearth-cli-setdef-{}", std::process::id()));
        let f = dir.join("hearth/cli.toml");
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, "namespace = \"mine\"\n").unwrap();
        let c = Config::resolve(Settings::default(), f.clone());
        c.set_default("deb").unwrap();
        let s = Settings::from_file(&f).unwrap();
        assert_eq!(s.namespace.as_deref(), Some("mine"));
        assert_eq!(s.default_distro.as_deref(), Some("deb"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
