//! OOM events: a watcher compares each container's OOM-kill counter with
//! what it saw last and queues an event per container whose counter grew;
//! `GetOomEvent` callers block on the queue.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

#[derive(Default)]
pub struct OomEvents {
    queue: Mutex<VecDeque<String>>,
    ready: Condvar,
}

impl OomEvents {
    pub fn push(&self, container_id: String) {
        tracing::warn!(container = %container_id, "OOM kill in the container's cgroup");
        self.queue.lock().unwrap().push_back(container_id);
        self.ready.notify_all();
    }

    /// The next event, waiting at most `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<String> {
        let mut q = self.queue.lock().unwrap();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(id) = q.pop_front() {
                return Some(id);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return None;
            }
            q = self.ready.wait_timeout(q, deadline - now).unwrap().0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_out_in_order_and_waiting_ends() {
        let e = OomEvents::default();
        e.push("a".into());
        e.push("b".into());
        assert_eq!(e.next(Duration::ZERO).as_deref(), Some("a"));
        assert_eq!(e.next(Duration::ZERO).as_deref(), Some("b"));
        assert_eq!(e.next(Duration::from_millis(10)), None);
    }
}
