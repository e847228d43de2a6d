//! The command line: WSL's verbs over hearth's distros.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

const ABOUT: &str = "Whole Linux distributions as long-lived containers in hearth's utility VM";

const LONG_ABOUT: &str = "\
Whole Linux distributions as long-lived containers in hearth's utility VM.

A distro is a root filesystem of its own with systemd as PID 1, run by
containerd with the hearth runtime inside one lightweight VM with a real
Linux kernel, booted on first use. What a distro writes is kept until it is
unregistered, across `terminate` and VM restarts. The user's home directory
is shared into every distro at /mnt/host.

Without a subcommand, hearth runs a login shell (or COMMAND) in the default
distro, or in the one -d names, starting it first if needed.";

const EXAMPLES: &str = "\
Examples:
  hearth distro install debian                 build Debian 12 with systemd and register it
  hearth distro install debian --name dev --include build-essential,git
  hearth                                       a login shell in the default distro
  hearth -d dev -- make -C /mnt/host/src       a command; its exit status is hearth's
  hearth list -v                               distros, their state and VM
  hearth status                                the VM: uptime, memory, kernel, containers
  hearth distro export dev dev.tar             its files, as a root filesystem tar
  hearth distro import dev2 dev.tar            ...and back, under another name
  hearth terminate dev                         stop it (its files stay)
  hearth shutdown                              stop every distro and the VM

Settings: /etc/hearth/cli.toml, then ~/.config/hearth/cli.toml (docs/distros.md).";

#[derive(Parser, Debug)]
#[command(name = "hearth", version, about = ABOUT, long_about = LONG_ABOUT, after_long_help = EXAMPLES)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,

    #[command(flatten)]
    pub run: RunArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// Refuses what clap lets through: running options (`-d`, `-u`,
    /// `--cd`, a command) given with a subcommand, which would ignore them.
    pub fn check(&self) -> Result<(), String> {
        let r = &self.run;
        let running = r.distro.is_some() || r.user.is_some() || r.cwd.is_some() || !r.command.is_empty();
        match &self.command {
            Some(_) if running => Err("-d, -u, --cd and `-- COMMAND` run something in a distro and do not go with a \
                                        subcommand: use `hearth -d NAME -- COMMAND`, or the subcommand alone"
                .into()),
            _ => Ok(()),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// containerd's socket (default: `containerd_address` in the config, else /run/containerd/containerd.sock)
    #[arg(long, global = true, env = "CONTAINERD_ADDRESS", value_name = "SOCKET")]
    pub address: Option<PathBuf>,

    /// The containerd namespace of hearth's distros (default: hearth)
    #[arg(long, short = 'n', global = true, env = "HEARTH_NAMESPACE")]
    pub namespace: Option<String>,

    /// Log level: error, warn, info, debug, trace (or a tracing filter)
    #[arg(long, global = true, env = "HEARTH_LOG", default_value = "warn")]
    pub log: String,
}

#[derive(Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// The distro to run in (default: the default distro)
    #[arg(short = 'd', long = "distribution", value_name = "NAME")]
    pub distro: Option<String>,

    /// Run as this user of the distro (default: root)
    #[arg(short = 'u', long)]
    pub user: Option<String>,

    /// Working directory in the distro (default: this directory's place under
    /// the host share, else the user's home)
    #[arg(long = "cd", value_name = "DIR")]
    pub cwd: Option<String>,

    /// The command to run; a login shell when absent
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// A login shell in a distro (the default one when NAME is absent)
    Shell {
        name: Option<String>,
        /// Run as this user of the distro (default: root)
        #[arg(short = 'u', long)]
        user: Option<String>,
    },
    /// Install, import, export and unregister distros
    #[command(subcommand)]
    Distro(DistroCommand),
    /// List the distros, with their state
    #[command(visible_alias = "ls")]
    List {
        /// Also their OS, origin, image, age and the VM they run in
        #[arg(short, long)]
        verbose: bool,
    },
    /// Stop a distro: its init shuts down cleanly (killed after stop_timeout_secs); its files stay
    Terminate { name: String },
    /// Stop every distro and power the utility VM off
    Shutdown,
    /// The utility VM: uptime, memory, kernel, the containers in it
    Status,
    /// Make NAME the distro `hearth` runs in when none is named (per user)
    SetDefault { name: String },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions { shell: clap_complete::Shell },
    /// Print hearth's manual page (roff): `hearth man | man -l -`
    Man,
}

#[derive(Subcommand, Debug)]
pub enum DistroCommand {
    /// Build a distro's root filesystem (mmdebstrap, with progress), make it an image in containerd and register it
    Install {
        /// The recipe: debian
        recipe: String,
        /// The Debian release
        #[arg(long, default_value = "bookworm")]
        release: String,
        /// The distro's name (default: the recipe's)
        #[arg(long)]
        name: Option<String>,
        /// More packages, comma-separated (docker.io, fuse2fs, build-essential...)
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
        /// Make it the default distro
        #[arg(long)]
        set_default: bool,
        /// Keep its files on an ext4 disk image of its own (in disk_images_dir), as WSL does
        /// (the default, unless distro_disk = false)
        #[arg(long, conflicts_with = "snapshot")]
        disk: bool,
        /// Keep its files on a containerd snapshot shared over virtio-fs instead
        #[arg(long)]
        snapshot: bool,
        /// The disk image's largest size in GiB (it is sparse: it takes what the files use);
        /// distro_disk_size_gib by default (256)
        #[arg(long, value_name = "GIB", conflicts_with = "snapshot")]
        disk_size: Option<u64>,
    },
    /// Build (or find in the cache) a recipe's root filesystem without registering it
    Build {
        recipe: String,
        #[arg(long, default_value = "bookworm")]
        release: String,
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
    },
    /// Register a root filesystem tar (plain or gzipped, as `export` writes) as distro NAME;
    /// with --vhd, an ext4 disk image, copied into disk_images_dir, which the distro runs on
    Import {
        name: String,
        file: PathBuf,
        /// FILE is an ext4 disk image: the distro runs on (a copy of) it
        #[arg(long, conflicts_with_all = ["disk", "snapshot", "disk_size"])]
        vhd: bool,
        /// Unpack the tar onto an ext4 disk image of the distro's own (in disk_images_dir):
        /// the default, unless distro_disk = false
        #[arg(long, conflicts_with = "snapshot")]
        disk: bool,
        /// Unpack it onto a containerd snapshot shared over virtio-fs instead
        #[arg(long)]
        snapshot: bool,
        /// The disk image's largest size in GiB (sparse); distro_disk_size_gib by default (256)
        #[arg(long, value_name = "GIB", conflicts_with = "snapshot")]
        disk_size: Option<u64>,
    },
    /// Write distro NAME's files to a root filesystem tar (gzipped if FILE ends in .gz);
    /// with --vhd, a copy of a disk-backed distro's ext4 image
    Export {
        name: String,
        file: PathBuf,
        /// Write the distro's ext4 disk image (a distro imported with --vhd)
        #[arg(long)]
        vhd: bool,
    },
    /// Remove distro NAME and its files
    #[command(visible_alias = "rm")]
    Unregister { name: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn wsl_style_invocations() {
        let c = Cli::parse_from(["hearth", "-d", "deb", "--", "uname", "-a"]);
        assert_eq!(c.run.distro.as_deref(), Some("deb"));
        assert_eq!(c.run.command, vec!["uname", "-a"]);
        assert!(c.command.is_none());
        let c = Cli::parse_from(["hearth", "list", "-v"]);
        assert!(matches!(c.command, Some(Command::List { verbose: true })));
        let c = Cli::parse_from(["hearth", "distro", "install", "debian", "--include", "docker.io,fuse2fs"]);
        match c.command {
            Some(Command::Distro(DistroCommand::Install { include, release, .. })) => {
                assert_eq!(include, vec!["docker.io", "fuse2fs"]);
                assert_eq!(release, "bookworm");
            }
            other => panic!("{other:?}"),
        }
        let c = Cli::parse_from(["hearth", "--address", "/s.sock", "-n", "ns", "list"]);
        assert_eq!(c.global.address.as_deref(), Some(std::path::Path::new("/s.sock")));
        assert!(c.check().is_ok());
        let c = Cli::parse_from(["hearth", "-d", "x", "list"]);
        assert!(c.check().unwrap_err().to_string().contains("-d"), "-d goes with a command, not a subcommand");
    }
}
