//! `hearth`: whole Linux distributions as long-lived containers in the
//! utility VM, through containerd and the hearth runtime, with WSL's verbs.
//!
//! - [`args`]: the command line (clap);
//! - [`commands`]: what each verb does;
//! - [`config`]: the CLI's settings (system and per-user TOML);
//! - [`containerd`]: containerd's API (content, images, snapshots,
//!   containers, tasks) over its socket;
//! - [`distro`]: distros: the Debian recipe, root filesystems, the runtime
//!   spec, install/import/export, start and terminate;
//! - [`run`]: a shell or command in a distro, with its stdio and terminal;
//! - [`vm`]: the utility VM's status and shutdown.
//!
//! Building and reading root filesystems (the Debian recipe, tars, the
//! cache) is crate hearth-rootfs's, which the xtask shares.

pub mod args;
pub mod commands;
pub mod config;
pub mod containerd;
pub mod distro;
pub mod run;
pub mod vm;
