//! Reaping children and remembering how the tracked ones ended.
//!
//! The agent is a subreaper (PID 1 in the VM, `PR_SET_CHILD_SUBREAPER`
//! natively), so every orphan in its containers ends up as its child, and
//! libcontainer starts each container process as a direct child of ours.
//! libcontainer also `waitpid`s its own short-lived intermediate process, so
//! reaping with `waitpid(-1)` while it does would steal that status and break
//! container creation. Creation therefore holds [`Reaper::hold`], which the
//! reaping loop takes too; processes that exit meanwhile stay zombies until the
//! hold is released, and nothing is lost.

use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + the signal's number, as a shell reports it.
    pub status: u32,
    pub at: SystemTime,
}

impl Exit {
    pub fn from_wait_status(ws: WaitStatus, at: SystemTime) -> Option<(Pid, Exit)> {
        match ws {
            WaitStatus::Exited(pid, code) => Some((pid, Exit { status: code as u32, at })),
            WaitStatus::Signaled(pid, sig, _) => Some((pid, Exit { status: 128 + sig as u32, at })),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Table {
    tracked: HashSet<i32>,
    exits: HashMap<i32, Exit>,
}

#[derive(Default)]
pub struct Reaper {
    hold: Mutex<()>,
    table: Mutex<Table>,
    exited: Condvar,
}

impl Reaper {
    /// Keeps the reaping loop away while libcontainer forks and waits.
    pub fn hold(&self) -> MutexGuard<'_, ()> {
        self.hold.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The hold, if nobody has it: for work that can wait a round.
    pub fn try_hold(&self) -> Option<MutexGuard<'_, ()>> {
        match self.hold.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Remembers `pid`'s exit when it comes. Call with the hold taken, before
    /// the process could have been reaped.
    pub fn track(&self, pid: i32) {
        self.lock().tracked.insert(pid);
    }

    /// Forgets a pid whose process is no longer of interest.
    pub fn forget(&self, pid: i32) {
        let mut t = self.lock();
        t.tracked.remove(&pid);
        t.exits.remove(&pid);
    }

    /// Reaps every child that has exited. Orphans that were not tracked are
    /// reaped and forgotten.
    pub fn reap_all(&self) {
        let _hold = self.hold();
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(ws) => {
                    if let Some((pid, exit)) = Exit::from_wait_status(ws, SystemTime::now()) {
                        let mut t = self.lock();
                        if t.tracked.remove(&pid.as_raw()) {
                            tracing::debug!(pid = pid.as_raw(), status = exit.status, "process exited");
                            t.exits.insert(pid.as_raw(), exit);
                            self.exited.notify_all();
                        }
                    }
                }
            }
        }
    }

    /// The exit of a tracked pid, if it has happened.
    pub fn exit_of(&self, pid: i32) -> Option<Exit> {
        self.lock().exits.get(&pid).copied()
    }

    /// Waits for a tracked pid's exit, at most `timeout` (None: forever).
    pub fn wait(&self, pid: i32, timeout: Option<Duration>) -> Option<Exit> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut t = self.lock();
        loop {
            if let Some(e) = t.exits.get(&pid) {
                return Some(*e);
            }
            if !t.tracked.contains(&pid) {
                return None;
            }
            let slice = Duration::from_millis(500);
            let wait = match deadline {
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return None;
                    }
                    slice.min(d - now)
                }
                None => slice,
            };
            t = self.exited.wait_timeout(t, wait).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn exit_codes_and_signals_read_as_a_shell_reports_them() {
        let t = SystemTime::now();
        let pid = Pid::from_raw(7);
        assert_eq!(Exit::from_wait_status(WaitStatus::Exited(pid, 3), t).unwrap().1.status, 3);
        let killed = WaitStatus::Signaled(pid, nix::sys::signal::Signal::SIGKILL, false);
        assert_eq!(Exit::from_wait_status(killed, t).unwrap().1.status, 137);
        assert!(Exit::from_wait_status(WaitStatus::StillAlive, t).is_none());
    }

    #[test]
    fn a_tracked_child_is_reaped_and_its_status_kept() {
        let reaper = Reaper::default();
        let child = {
            let _hold = reaper.hold();
            let c = Command::new("/bin/sh").args(["-c", "exit 5"]).spawn().unwrap();
            reaper.track(c.id() as i32);
            c
        };
        let pid = child.id() as i32;
        std::mem::forget(child); // reaped by the reaper, not by std
        let exit = loop {
            reaper.reap_all();
            if let Some(e) = reaper.wait(pid, Some(Duration::from_millis(50))) {
                break e;
            }
        };
        assert_eq!(exit.status, 5);
        reaper.forget(pid);
        assert!(reaper.exit_of(pid).is_none());
    }
}
