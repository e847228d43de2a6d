//! Stopping and pausing the vCPUs from other threads: the main thread stops
//! them when the VM ends; the control socket pauses and resumes them.
//!
//! A vCPU thread checks in at the top of its run loop. To reach it while it
//! is inside KVM_RUN, the controller sends SIGRTMIN (a no-op handler makes
//! KVM_RUN return EINTR); a signal landing just before KVM_RUN is entered
//! is lost, so kicks are repeated until every vCPU is seen to have parked
//! (or ended).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Pause {
    requested: bool,
    /// vCPUs waiting in `checkpoint`.
    parked: usize,
}

#[derive(Default)]
pub struct RunControl {
    stop: AtomicBool,
    /// Mirrors `Pause::requested` so the vCPU's check costs no lock.
    pause_requested: AtomicBool,
    pause: Mutex<Pause>,
    changed: Condvar,
    threads: Mutex<Vec<libc::pthread_t>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("the VM is shutting down")]
    Stopped,
    #[error("{parked} of {total} vCPUs paused within {0:?}; the VM keeps running", .timeout)]
    Timeout { parked: usize, total: usize, timeout: Duration },
}

impl RunControl {
    /// The vCPU threads to kick (their pthread ids, once spawned).
    pub fn set_threads(&self, threads: Vec<libc::pthread_t>) {
        *self.threads.lock().unwrap() = threads;
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// vCPU side, between two KVM_RUNs: waits here while a pause is asked for.
    pub fn checkpoint(&self) {
        if !self.pause_requested.load(Ordering::Acquire) {
            return;
        }
        let mut p = self.pause.lock().unwrap();
        p.parked += 1;
        self.changed.notify_all();
        while p.requested && !self.stopped() {
            p = self.changed.wait(p).unwrap();
        }
        p.parked -= 1;
        self.changed.notify_all();
    }

    /// Pauses every vCPU: returns once all are parked, or fails after
    /// `timeout` (the pause is then withdrawn).
    pub fn pause(&self, timeout: Duration) -> Result<(), Error> {
        let total = self.threads.lock().unwrap().len();
        let deadline = Instant::now() + timeout;
        let mut p = self.pause.lock().unwrap();
        p.requested = true;
        self.pause_requested.store(true, Ordering::Release);
        loop {
            if self.stopped() {
                return Err(Error::Stopped);
            }
            if p.parked >= total {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let parked = p.parked;
                p.requested = false;
                self.pause_requested.store(false, Ordering::Release);
                self.changed.notify_all();
                return Err(Error::Timeout { parked, total, timeout });
            }
            self.kick();
            p = self.changed.wait_timeout(p, Duration::from_millis(2)).unwrap().0;
        }
    }

    /// Lets paused vCPUs run again (nothing happens if none is paused).
    pub fn resume(&self) {
        let mut p = self.pause.lock().unwrap();
        p.requested = false;
        self.pause_requested.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        let total = self.threads.lock().unwrap().len();
        let p = self.pause.lock().unwrap();
        p.requested && p.parked >= total
    }

    /// Asks every vCPU to end (the caller kicks and joins them), waking
    /// paused ones.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _p = self.pause.lock().unwrap();
        self.changed.notify_all();
    }

    fn kick(&self) {
        if self.stopped() {
            return; // the threads may be gone: their ids are no longer valid
        }
        for &t in self.threads.lock().unwrap().iter() {
            // SAFETY: vCPU threads run until the VM stops, checked above;
            // pthread_kill with a live thread's id and a handled signal.
            unsafe { libc::pthread_kill(t, vmm_sys_util::signal::SIGRTMIN()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// Threads standing in for vCPUs: they count loop iterations and check in.
    fn spin(control: &Arc<RunControl>, n: usize) -> (Vec<std::thread::JoinHandle<()>>, Arc<AtomicU64>) {
        let count = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..n)
            .map(|_| {
                let (c, count) = (control.clone(), count.clone());
                std::thread::spawn(move || {
                    while !c.stopped() {
                        c.checkpoint();
                        count.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_micros(100));
                    }
                })
            })
            .collect();
        (threads, count)
    }

    #[test]
    fn pause_parks_every_vcpu_and_resume_lets_them_go() {
        extern "C" fn nop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        let _ = vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN(), nop);
        let control = Arc::new(RunControl::default());
        let (threads, count) = spin(&control, 3);
        control.set_threads(threads.iter().map(std::os::unix::thread::JoinHandleExt::as_pthread_t).collect());
        control.pause(Duration::from_secs(10)).unwrap();
        assert!(control.is_paused());
        let before = count.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(count.load(Ordering::Relaxed), before, "a paused vCPU ran");
        control.resume();
        assert!(!control.is_paused());
        let deadline = Instant::now() + Duration::from_secs(10);
        while count.load(Ordering::Relaxed) == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(count.load(Ordering::Relaxed) > before, "resumed vCPUs did not run");
        // Paused again, then stopped: stop wakes them to end.
        control.pause(Duration::from_secs(10)).unwrap();
        control.stop();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(control.pause(Duration::from_secs(1)), Err(Error::Stopped));
    }

    #[test]
    fn a_vcpu_that_never_checks_in_times_the_pause_out() {
        let control = Arc::new(RunControl::default());
        // One registered thread that never calls checkpoint (its id is this
        // test thread's, kicked with SIGRTMIN, which is handled).
        extern "C" fn nop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        let _ = vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN(), nop);
        // SAFETY: pthread_self has no preconditions.
        control.set_threads(vec![unsafe { libc::pthread_self() }]);
        let err = control.pause(Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, Error::Timeout { parked: 0, total: 1, .. }), "{err}");
        assert!(!control.is_paused());
        assert!(!control.pause_requested.load(Ordering::Acquire), "a failed pause is withdrawn");
    }
}
