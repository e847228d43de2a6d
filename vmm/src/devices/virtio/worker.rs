//! The thread an active device runs on: an epoll loop over the descriptors
//! the device registers (queue eventfds, back-end sockets and files), plus a
//! stop eventfd through which the transport ends it on reset or shutdown.

use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const STOP_TOKEN: u64 = u64::MAX;

/// Registration of descriptors with the worker's epoll.
pub struct Poller {
    epoll: Epoll,
}

impl Poller {
    /// A poller of its own, outside a worker (tests and fuzz targets that
    /// drive a device's handlers directly).
    pub fn new() -> std::io::Result<Poller> {
        Ok(Poller { epoll: Epoll::new()? })
    }

    pub fn add(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    pub fn modify(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    pub fn remove(&self, fd: RawFd) -> std::io::Result<()> {
        self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    /// Waits up to `timeout_ms` for ready descriptors and hands each to
    /// `worker`, as the device thread does: for fuzz targets and tests that
    /// run a worker's real event handling on their own thread. Returns the
    /// number of events handled.
    pub fn dispatch<W: DeviceWorker>(&self, worker: &mut W, timeout_ms: i32) -> std::io::Result<usize> {
        let mut events = [EpollEvent::default(); 32];
        let n = self.epoll.wait(timeout_ms, &mut events)?;
        for ev in &events[..n] {
            worker.handle(ev.data(), ev.event_set(), self);
        }
        Ok(n)
    }
}

/// What a device does on its thread.
pub trait DeviceWorker: Send + 'static {
    /// Registers the descriptors to watch, each with a token (not u64::MAX).
    fn init(&mut self, poller: &Poller) -> std::io::Result<()>;
    /// One of them is ready.
    fn handle(&mut self, token: u64, events: EventSet, poller: &Poller);
}

pub struct WorkerHandle {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Stops the worker and waits for its thread.
    pub fn stop(mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn spawn(name: &str, mut worker: impl DeviceWorker) -> Result<WorkerHandle, String> {
    let err = |what: &str, e: std::io::Error| format!("{name}: {what}: {e}");
    let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| err("eventfd", e))?;
    let poller = Poller::new().map_err(|e| err("epoll", e))?;
    poller.add(stop.as_raw_fd(), STOP_TOKEN, EventSet::IN).map_err(|e| err("epoll_ctl", e))?;
    worker.init(&poller).map_err(|e| err("registering descriptors", e))?;
    let thread_name = name.to_string();
    let kind = crate::seccomp::ThreadKind::of_worker(name);
    let body = Box::new(move || {
        // Before the first guest request: from here on, this thread
        // makes only its kind's system calls (seccomp/rules.rs).
        if let Some(kind) = kind {
            crate::seccomp::apply_or_exit(kind);
        }
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match poller.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("{thread_name}: epoll_wait: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                if ev.data() == STOP_TOKEN {
                    return;
                }
                worker.handle(ev.data(), ev.event_set(), &poller);
            }
        }
    });
    // Through the spawner when filters are on, so that the worker is not
    // held to the filter of the vCPU thread that activates the device.
    let thread = crate::seccomp::spawn_thread(name.to_string(), body).map_err(|e| err("spawning the thread", e))?;
    Ok(WorkerHandle { stop, thread: Some(thread) })
}
