//! What each verb does; the exit status hearth ends with.

use anyhow::{bail, Result};
use clap::CommandFactory;

use crate::args::{Cli, Command, DistroCommand, RunArgs};
use crate::config::Config;
use crate::distro::install::DebianInstall;
use crate::distro::{Hearth, State};
use crate::run::RunOptions;
use hearth_rootfs::debian::distro_recipe;
use hearth_rootfs::tree as rootfs;

/// Runs the command line; the status to exit with.
pub async fn dispatch(cli: Cli) -> Result<i32> {
    let mut cfg = Config::load()?;
    if let Some(a) = cli.global.address {
        cfg.containerd_address = a;
    }
    if let Some(n) = cli.global.namespace {
        cfg.namespace = n;
    }
    // Commands that need no containerd.
    match &cli.command {
        Some(Command::Completions { shell }) => {
            clap_complete::generate(*shell, &mut Cli::command(), "hearth", &mut std::io::stdout());
            return Ok(0);
        }
        Some(Command::Man) => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            return Ok(0);
        }
        Some(Command::Distro(DistroCommand::Build { recipe, release, include })) => {
            check_recipe(recipe)?;
            let r = distro_recipe(release, include, &cfg.mirror);
            let built = tokio::task::block_in_place(|| rootfs::ensure_built(&r, &cfg.cache_dir))?;
            println!("{} ({} MiB): {}", built.info.os_name, built.size >> 20, built.tar.display());
            return Ok(0);
        }
        _ => {}
    }
    let h = Hearth::connect(cfg).await?;
    match cli.command {
        None => run(&h, cli.run).await,
        Some(Command::Shell { name, user }) => run(&h, RunArgs { distro: name, user, ..Default::default() }).await,
        Some(Command::Distro(d)) => distro(&h, d).await,
        Some(Command::List { verbose }) => list(&h, verbose).await,
        Some(Command::Terminate { name }) => {
            let d = h.distro(&name).await?;
            if h.terminate(&d).await? {
                println!("{name}: terminated");
            } else {
                println!("{name}: was not running");
            }
            Ok(0)
        }
        Some(Command::Shutdown) => {
            let stopped = h.shutdown().await?;
            if !stopped.is_empty() {
                println!("stopped: {}", stopped.join(", "));
            }
            println!("the utility VM is off");
            Ok(0)
        }
        Some(Command::Status) => {
            match tokio::task::block_in_place(|| crate::vm::status(&h.cfg))? {
                Some(s) => print!("{}", s.render()),
                None => println!("utility VM: not running (it boots when a distro starts)"),
            }
            let running: Vec<String> = {
                let mut v = Vec::new();
                for d in h.distros().await? {
                    if let State::Running { .. } = h.state(&d.name).await? {
                        v.push(d.name);
                    }
                }
                v
            };
            println!("distros running: {}", if running.is_empty() { "none".into() } else { running.join(", ") });
            Ok(0)
        }
        Some(Command::SetDefault { name }) => {
            h.distro(&name).await?;
            h.cfg.set_default(&name)?;
            println!("{name} is now the default distro (in {})", h.cfg.user_file.display());
            Ok(0)
        }
        Some(Command::Completions { .. } | Command::Man) => unreachable!("handled above"),
    }
}

fn check_recipe(recipe: &str) -> Result<()> {
    if recipe != "debian" {
        bail!("no recipe {recipe:?}: hearth builds `debian` (any release: --release bookworm|trixie); other distributions come in with `hearth distro import NAME ROOTFS.tar`");
    }
    Ok(())
}

async fn run(h: &Hearth, args: RunArgs) -> Result<i32> {
    let d = match &args.distro {
        Some(name) => h.distro(name).await?,
        None => h.default_distro().await?,
    };
    let opts = RunOptions { command: args.command, user: args.user, cwd: args.cwd };
    h.run_in(&d, &opts).await
}

async fn distro(h: &Hearth, cmd: DistroCommand) -> Result<i32> {
    match cmd {
        DistroCommand::Install { recipe, release, name, include, set_default, disk, snapshot, disk_size } => {
            check_recipe(&recipe)?;
            let name = name.unwrap_or_else(|| recipe.clone());
            let opts = DebianInstall { name: &name, release: &release, include: &include };
            let size = disk_size.unwrap_or(h.cfg.distro_disk_size_gib);
            let d = if on_disk(h, disk, snapshot) {
                h.install_debian_on_disk(&opts, size).await?
            } else {
                h.install_debian(&opts).await?
            };
            if set_default || h.cfg.default_distro.is_none() && h.distros().await?.len() == 1 {
                h.cfg.set_default(&d.name)?;
            }
            println!("{} installed ({}): `hearth -d {}` opens a shell in it", d.name, d.os, d.name);
        }
        DistroCommand::Build { .. } => unreachable!("handled without containerd"),
        DistroCommand::Import { name, file, vhd, disk, snapshot, disk_size } => {
            let d = if vhd {
                h.import_vhd(&name, &file).await?
            } else if on_disk(h, disk, snapshot) {
                h.import_on_disk(&name, &file, disk_size.unwrap_or(h.cfg.distro_disk_size_gib)).await?
            } else {
                h.import(&name, &file).await?
            };
            println!("{} imported ({})", d.name, if d.os.is_empty() { "unknown OS" } else { &d.os });
        }
        DistroCommand::Export { name, file, vhd } => {
            let d = h.distro(&name).await?;
            let size = if vhd { h.export_vhd(&d, &file).await? } else { h.export(&d, &file).await? };
            println!("{name} exported to {} ({} MiB)", file.display(), size >> 20);
        }
        DistroCommand::Unregister { name } => {
            let d = h.distro(&name).await?;
            h.unregister(&d).await?;
            println!("{name} unregistered: its files are gone");
        }
    }
    Ok(0)
}

async fn list(h: &Hearth, verbose: bool) -> Result<i32> {
    let distros = h.distros().await?;
    if distros.is_empty() {
        println!("no distros: install one with `hearth distro install debian`");
        return Ok(0);
    }
    let default = h.cfg.default_distro.clone();
    let vm = if verbose { crate::vm::find_record(&h.cfg)? } else { None };
    if verbose {
        println!("  {:<16} {:<9} {:<34} {:<26} {:<8} VM", "NAME", "STATE", "OS", "SOURCE", "AGE");
    } else {
        println!("  {:<16} {:<9} OS", "NAME", "STATE");
    }
    for d in distros {
        let state = h.state(&d.name).await?;
        let mark = if default.as_deref() == Some(d.name.as_str()) { "*" } else { " " };
        let os = if d.os.is_empty() { "-".to_string() } else { d.os.clone() };
        if verbose {
            let vm = match (&state, &vm) {
                (State::Running { .. }, Some(r)) => {
                    format!("hearth-vmm pid {}, boot {}", r.vmm_pid, &r.boot_id[..8.min(r.boot_id.len())])
                }
                _ => "-".into(),
            };
            println!(
                "{mark} {:<16} {:<9} {:<34} {:<26} {:<8} {vm}",
                d.name,
                state.to_string(),
                os,
                d.source,
                crate::vm::ago(d.created)
            );
        } else {
            println!("{mark} {:<16} {:<9} {os}", d.name, state.to_string());
        }
    }
    Ok(0)
}

/// Whether a new distro goes on a disk image of its own: the command's
/// `--disk` or `--snapshot`, else the `distro_disk` setting.
fn on_disk(h: &Hearth, disk: bool, snapshot: bool) -> bool {
    disk || !snapshot && h.cfg.distro_disk
}
