//! `cargo xtask install`: puts hearth where containerd finds it, at the paths
//! the shim's configuration defaults to (docs/usage.md):
//! `/usr/local/bin/{hearth-vmm,containerd-shim-hearth-v2}`,
//! `/usr/local/share/hearth/{vmlinux,agent.cpio}`, and a first
//! `/etc/hearth/config.toml` (an existing one is left alone); and the
//! `hearth` CLI in `/usr/local/bin` with its bash completion and manual page.

use std::path::Path;

use anyhow::{Context, Result};

use crate::artefacts::Artefacts;

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to.parent().unwrap())?;
    // Through a temporary name: a running binary cannot be overwritten.
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::rename(&tmp, to)?;
    println!("installed {}", to.display());
    Ok(())
}

pub fn run(a: &Artefacts) -> Result<()> {
    copy(&a.vmm, Path::new("/usr/local/bin/hearth-vmm"))?;
    copy(&a.shim, Path::new("/usr/local/bin/containerd-shim-hearth-v2"))?;
    copy(&a.vmlinux, Path::new("/usr/local/share/hearth/vmlinux"))?;
    copy(&a.agent_initramfs, Path::new("/usr/local/share/hearth/agent.cpio"))?;
    let config = Path::new("/etc/hearth/config.toml");
    if !config.exists() {
        std::fs::create_dir_all(config.parent().unwrap())?;
        std::fs::write(
            config,
            format!(
                "# hearth's shim configuration; every key and its default: docs/usage.md\n\
                 virtiofsd = \"{}\"\nmemory_mib = 1024\nvcpus = 2\nidle_timeout_secs = 30\n",
                a.virtiofsd.display()
            ),
        )?;
        println!("wrote {}", config.display());
    }
    copy(&a.cli, Path::new("/usr/local/bin/hearth"))?;
    // What the CLI prints of itself: its completion and manual page.
    for (args, to) in [
        (&["completions", "bash"][..], "/usr/local/share/bash-completion/completions/hearth"),
        (&["man"][..], "/usr/local/share/man/man1/hearth.1"),
    ] {
        let out = std::process::Command::new(&a.cli).args(args).output().context("running hearth")?;
        anyhow::ensure!(out.status.success(), "hearth {args:?} failed");
        std::fs::create_dir_all(Path::new(to).parent().unwrap())?;
        std::fs::write(to, out.stdout)?;
        println!("installed {to}");
    }
    println!("containerd finds the runtime io.containerd.hearth.v2 on its PATH; try:");
    println!("  ctr images import <an OCI archive>; ctr run --rm --runtime io.containerd.hearth.v2 IMAGE ID uname -r");
    println!("and for whole distributions (docs/distros.md):");
    println!("  hearth distro install debian; hearth -d debian");
    Ok(())
}
