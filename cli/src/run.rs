//! `hearth -d NAME [-- COMMAND...]`: a login shell or a command in a
//! distro (started first if it is not running), as containerd's exec: the
//! process's stdio through FIFOs on this host (a PTY when hearth is
//! attached to a terminal, resized with it), signals passed on, its exit
//! status returned.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::containerd::lease::unique;
use crate::containerd::task::Stdio;
use crate::distro::spec::{process, PATH_ENV};
use crate::distro::{Distro, Hearth};

/// How long output may trail the process's exit (a daemon it started can
/// hold the terminal open for ever).
const OUTPUT_GRACE: Duration = Duration::from_secs(3);

/// A login shell for `$1`: su's (PAM sets the session up, with logind
/// where there is one), else a plain login shell.
const LOGIN: &str = r#"if command -v su >/dev/null 2>&1; then exec su -l "$1"; fi; exec /bin/sh -l"#;

pub struct RunOptions {
    /// The command; a login shell when empty.
    pub command: Vec<String>,
    /// Run as this user of the distro (root when None).
    pub user: Option<String>,
    /// The working directory in the distro.
    pub cwd: Option<String>,
}

/// The process's arguments.
fn argv(opts: &RunOptions) -> Vec<String> {
    let user = opts.user.clone().unwrap_or_else(|| "root".into());
    if opts.command.is_empty() {
        return vec!["/bin/sh".into(), "-c".into(), LOGIN.into(), "hearth-login".into(), user];
    }
    match &opts.user {
        None => opts.command.clone(),
        Some(u) => {
            ["runuser", "-u", u, "--"].iter().map(|s| s.to_string()).chain(opts.command.iter().cloned()).collect()
        }
    }
}

/// Where the process starts: as asked; else, when this shell's directory
/// is inside the shared host directory, the same directory in the distro
/// (as WSL starts in the Windows directory); else root's home.
fn working_dir(h: &Hearth, opts: &RunOptions) -> String {
    if let Some(c) = &opts.cwd {
        return c.clone();
    }
    if let (Some(share), Ok(here)) = (&h.cfg.host_share, std::env::current_dir()) {
        if let Ok(rel) = here.strip_prefix(share) {
            return Path::new(&h.cfg.host_share_path).join(rel).display().to_string();
        }
    }
    if opts.user.is_none() { "/root" } else { "/" }.into()
}

/// The terminal's size (columns, rows), if stdout is one.
fn window_size() -> Option<(u16, u16)> {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ fills a winsize we own.
    let r = unsafe { libc::ioctl(std::io::stdout().as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0).then_some((ws.ws_col, ws.ws_row))
}

/// The local terminal in raw mode while it lives.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> Result<RawMode> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).context("reading the terminal's settings")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).context("setting the terminal raw")?;
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin().as_fd(), nix::sys::termios::SetArg::TCSANOW, &self.0);
    }
}

/// The process's FIFOs, in a directory of their own, removed on drop.
struct Fifos {
    dir: PathBuf,
    stdin: PathBuf,
    stdout: PathBuf,
    stderr: Option<PathBuf>,
}

impl Fifos {
    fn make(id: &str, terminal: bool) -> Result<Fifos> {
        let dir = PathBuf::from("/run/hearth/cli").join(id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mode = nix::sys::stat::Mode::from_bits_truncate(0o600);
        let fifo = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            nix::unistd::mkfifo(&p, mode).with_context(|| format!("making the FIFO {}", p.display()))?;
            Ok(p)
        };
        Ok(Fifos {
            stdin: fifo("stdin")?,
            stdout: fifo("stdout")?,
            stderr: (!terminal).then(|| fifo("stderr")).transpose()?,
            dir,
        })
    }

    fn stdio(&self, terminal: bool) -> Stdio {
        let s = |p: &Path| p.display().to_string();
        Stdio {
            stdin: s(&self.stdin),
            stdout: s(&self.stdout),
            stderr: self.stderr.as_deref().map(s).unwrap_or_default(),
            terminal,
        }
    }
}

impl Drop for Fifos {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One output FIFO, opened before the shim opens its end: read without
/// blocking, with a writer of our own held until the shim has its writer,
/// so that the end of the shim's output is our end of file.
struct Output {
    file: File,
    placeholder: Option<File>,
}

impl Output {
    fn open(path: &Path) -> Result<Output> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let placeholder = std::fs::OpenOptions::new().write(true).open(path)?;
        Ok(Output { file, placeholder: Some(placeholder) })
    }

    /// Copies to `to` until the writer closes, or `stop` is set and
    /// nothing more comes for a moment.
    fn copy(self, mut to: impl Write + Send + 'static, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 * 1024];
            let mut f = self.file;
            loop {
                let mut fds = [nix::poll::PollFd::new(f.as_fd(), nix::poll::PollFlags::POLLIN)];
                let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16)).unwrap_or(0);
                if ready == 0 {
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    continue;
                }
                match f.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).and_then(|_| to.flush()).is_err() {
                            return;
                        }
                    }
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {}
                    Err(_) => return,
                }
            }
        })
    }
}

/// Copies this process's stdin into the FIFO; at its end, closes the FIFO
/// (the process reads end of file), but not before `opened` fires (or is
/// dropped): the shim opens its end when the process starts, and a FIFO
/// closed by every side before that would drop what was written into it.
fn copy_stdin(path: &Path, opened: std::sync::mpsc::Receiver<()>) -> Result<std::thread::JoinHandle<()>> {
    copy_into_fifo(std::io::stdin(), path, opened)
}

fn copy_into_fifo(
    mut input: impl Read + Send + 'static,
    path: &Path,
    opened: std::sync::mpsc::Receiver<()>,
) -> Result<std::thread::JoinHandle<()>> {
    // Read-write: opening never waits for the shim, which opens it later.
    let mut fifo = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    Ok(std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match input.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if fifo.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = opened.recv();
        drop(fifo);
    }))
}

impl Hearth {
    /// Runs a process in distro `d` (starting it first); its exit status.
    pub async fn run_in(&self, d: &Distro, opts: &RunOptions) -> Result<i32> {
        self.start(d).await?;
        let terminal = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
        let mut env = vec![PATH_ENV.to_string(), format!("HOME={}", if opts.user.is_none() { "/root" } else { "/" })];
        if terminal {
            env.push(format!("TERM={}", std::env::var("TERM").unwrap_or_else(|_| "xterm".into())));
        }
        let spec = process(&argv(opts), terminal, &working_dir(self, opts), &env);
        let exec_id = format!("hearth-{}-{}", std::process::id(), unique());
        let fifos = Fifos::make(&exec_id, terminal)?;
        let stdout = Output::open(&fifos.stdout)?;
        let stderr = fifos.stderr.as_deref().map(Output::open).transpose()?;
        let (opened, stdin_may_close) = std::sync::mpsc::channel();
        let _stdin_copier = copy_stdin(&fifos.stdin, stdin_may_close)?;
        self.cd.exec(&d.name, &exec_id, serde_json::to_vec(&spec)?, &fifos.stdio(terminal)).await?;
        let raw = if terminal { Some(RawMode::enter()?) } else { None };
        let status = self.attach(d, &exec_id, stdout, stderr, terminal, opened).await;
        drop(raw);
        let _ = self.cd.delete_process(&d.name, &exec_id).await;
        drop(fifos);
        status
    }

    async fn attach(
        &self,
        d: &Distro,
        exec_id: &str,
        mut stdout: Output,
        stderr: Option<Output>,
        terminal: bool,
        opened: std::sync::mpsc::Sender<()>,
    ) -> Result<i32> {
        let id = d.name.as_str();
        let stop = Arc::new(AtomicBool::new(false));
        // The shim opens its ends during start: our placeholders can go after.
        let started = self.cd.start(id, exec_id).await;
        drop(opened);
        let mut stderr = stderr;
        stdout.placeholder.take();
        if let Some(e) = stderr.as_mut() {
            e.placeholder.take();
        }
        started?;
        let mut copies = vec![stdout.copy(std::io::stdout(), stop.clone())];
        if let Some(e) = stderr {
            copies.push(e.copy(std::io::stderr(), stop.clone()));
        }
        if terminal {
            if let Some((w, h)) = window_size() {
                let _ = self.cd.resize_pty(id, exec_id, w as u32, h as u32).await;
            }
        }
        let mut winch = signal(SignalKind::window_change())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let wait = self.cd.wait(id, exec_id);
        tokio::pin!(wait);
        let status = loop {
            tokio::select! {
                s = &mut wait => break s?,
                _ = winch.recv() => if let Some((w, h)) = window_size() {
                    let _ = self.cd.resize_pty(id, exec_id, w as u32, h as u32).await;
                },
                // Without a terminal, signals go to the process (with one,
                // ^C travels as a byte and the terminal makes the signal).
                _ = int.recv() => { let _ = self.cd.kill(id, exec_id, libc::SIGINT, false).await; }
                _ = term.recv() => { let _ = self.cd.kill(id, exec_id, libc::SIGTERM, false).await; }
                _ = hup.recv() => { let _ = self.cd.kill(id, exec_id, libc::SIGHUP, false).await; }
            }
        };
        // The output normally ends with the process; a daemon it left
        // behind may hold it open: give it a moment, then stop reading.
        let deadline = Instant::now() + OUTPUT_GRACE;
        while copies.iter().any(|c| !c.is_finished()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.store(true, Ordering::Release);
        for c in copies {
            let _ = tokio::task::spawn_blocking(move || c.join()).await;
        }
        Ok(status as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_that_ends_before_the_shim_opens_the_fifo_is_kept() {
        let dir = std::env::temp_dir().join(format!("hearth-run-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stdin");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (opened, may_close) = std::sync::mpsc::channel();
        let copier = copy_into_fifo(std::io::Cursor::new(b"all of it\n".to_vec()), &path, may_close).unwrap();
        // The input has ended by now; the shim opens its end only later.
        std::thread::sleep(Duration::from_millis(200));
        let mut shim_end = std::fs::File::open(&path).unwrap();
        drop(opened);
        let mut got = String::new();
        shim_end.read_to_string(&mut got).unwrap();
        assert_eq!(got, "all of it\n", "and then end of file");
        copier.join().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_login_shell_or_the_command_as_the_user() {
        let o = RunOptions { command: vec![], user: None, cwd: None };
        let a = argv(&o);
        assert_eq!((a[0].as_str(), a.last().unwrap().as_str()), ("/bin/sh", "root"));
        let o = RunOptions { command: vec!["id".into(), "-u".into()], user: None, cwd: None };
        assert_eq!(argv(&o), vec!["id", "-u"]);
        let o = RunOptions { command: vec!["id".into()], user: Some("alice".into()), cwd: None };
        assert_eq!(argv(&o), vec!["runuser", "-u", "alice", "--", "id"]);
    }
}
