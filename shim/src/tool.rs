//! Running host tools (`ip`, `nft`, `e2fsck`) from the shim. The shim reaps
//! every child that exits (containerd-shim's reaper, which is how it learns
//! that hearth-vmm ended), so `Command::output` can lose a tool's status to
//! it and fail with ECHILD, now and then. Here the exit is taken from
//! whichever sees it first: our own wait, or the reaper's notice.

use std::io::{self, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use containerd_shim::monitor::{monitor_subscribe, ExitEvent, Subject, Topic};

/// Runs `cmd` to its end, as `Command::output` does (stdin from /dev/null).
pub fn output(cmd: &mut Command) -> io::Result<Output> {
    // Before the spawn, so that an exit reaped at once is not missed.
    let sub = monitor_subscribe(Topic::Pid).ok();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id() as i32;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let reaped = |sub: &Option<containerd_shim::monitor::Subscription>| -> Option<i32> {
        let s = sub.as_ref()?;
        while let Ok(ExitEvent { subject, exit_code }) = s.rx.try_recv() {
            if matches!(subject, Subject::Pid(p) if p == pid) {
                return Some(exit_code);
            }
        }
        None
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            // The reaper took it: its notice carries the exit code.
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                let Some(s) = &sub else { return Err(e) };
                let code = loop {
                    if let Some(c) = reaped(&sub) {
                        break c;
                    }
                    match s.rx.recv_timeout(Duration::from_secs(30)) {
                        Ok(ExitEvent { subject: Subject::Pid(p), exit_code }) if p == pid => break exit_code,
                        Ok(_) => {}
                        Err(_) => return Err(io::Error::other(format!("{cmd:?} was reaped and its exit not seen"))),
                    }
                };
                break ExitStatus::from_raw((code & 0xff) << 8);
            }
            Err(e) => return Err(e),
        }
        if let Some(code) = reaped(&sub) {
            break ExitStatus::from_raw((code & 0xff) << 8);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output { status, stdout: out_t.join().unwrap_or_default(), stderr: err_t.join().unwrap_or_default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_output_come_back() {
        let o = output(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"])).unwrap();
        assert_eq!(o.status.code(), Some(3));
        assert_eq!(o.stdout, b"out\n");
        assert_eq!(o.stderr, b"err\n");
    }
}
