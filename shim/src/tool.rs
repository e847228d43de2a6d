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
    output_with(cmd, None, None)
}

/// Runs `cmd` with `input` on its stdin (none: /dev/null), killed if it has
/// not ended within `limit` (then an error of kind TimedOut).
pub fn output_with(cmd: &mut Command, input: Option<&[u8]>, limit: Option<Duration>) -> io::Result<Output> {
    // Before the spawn, so that an exit reaped at once is not missed.
    let sub = monitor_subscribe(Topic::Pid).ok();
    let stdin = if input.is_some() { Stdio::piped() } else { Stdio::null() };
    let mut child = cmd.stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id() as i32;
    if let (Some(mut w), Some(input)) = (child.stdin.take(), input) {
        let input = input.to_vec();
        // A thread, so that a program that does not read cannot block us;
        // it ends with the program (EPIPE).
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = w.write_all(&input);
        });
    }
    let deadline = limit.map(|l| std::time::Instant::now() + l);
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
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.try_wait();
            return Err(io::Error::new(io::ErrorKind::TimedOut, format!("{cmd:?} did not end in {limit:?}")));
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

    #[test]
    fn input_reaches_stdin_and_a_late_program_is_killed() {
        let o = output_with(&mut Command::new("cat"), Some(b"state"), None).unwrap();
        assert_eq!(o.stdout, b"state");
        let e = output_with(Command::new("sleep").arg("10"), None, Some(Duration::from_millis(200))).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
