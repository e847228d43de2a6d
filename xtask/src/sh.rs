//! Running commands, with errors that say which command failed.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Runs `cmd`, inheriting stdio; fails with the command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Runs `cmd`, each line of its stdout and stderr (together, in order) to
/// `console`; fails with the command line if it fails.
pub fn run_lines(mut cmd: Command, console: &(dyn Fn(&str) + Sync)) -> Result<()> {
    let (reader, writer) = std::io::pipe().context("making a pipe")?;
    cmd.stdout(writer.try_clone()?).stderr(writer).stdin(Stdio::null());
    let mut child = cmd.spawn().with_context(|| format!("cannot start {cmd:?}"))?;
    let shown = format!("{cmd:?}");
    // The command holds the pipe's write ends: without them, the read ends
    // when the child (and what it left running) closes its own.
    drop(cmd);
    for line in std::io::BufRead::split(std::io::BufReader::new(reader), b'\n') {
        console(String::from_utf8_lossy(&line?).trim_end_matches('\r'));
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` and returns its trimmed stdout.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stderr(Stdio::inherit()).output().with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn cmd(program: impl AsRef<std::ffi::OsStr>) -> Command {
    Command::new(program)
}

pub use hearth_rootfs::cache::key;

/// Writes `data` to `path` atomically (temp file + rename), so an interrupted
/// setup never leaves a half-written artefact behind that looks complete.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
