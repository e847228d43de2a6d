//! The utility VM's life as the shim sees it: one state behind one lock,
//! and the transitions between states as the only way to change it.
//!
//! ```text
//!   Down ──── boot ────▶ Running ──── the agent stops answering ────▶ Stopping(why)
//!    ▲                      │                                            │
//!    └──── hearth-vmm ended ┴──────────────── hearth-vmm ended ──────────┘
//!
//!   any state ──── close (idle, or containerd's shutdown) ────▶ Closed
//! ```
//!
//! What depends on the state: a create boots a VM only from `Down` and is
//! refused once `Closed` (a new shim will serve it); a VM that ends while
//! `Running` or `Stopping` had tasks that must be reported exited, with
//! the reason (`Stopping` carries why the shim stopped it); one that ends
//! after `Closed` was powered off on purpose. Every watcher thread asks
//! [`Lifecycle::is_current`] before acting on the VM it watches, so a VM
//! that ended or was replaced is left alone.
//!
//! Generic over the VM handle so that the transitions are tested without
//! booting one (the shim uses `Arc<Vm>`).

use std::sync::{Arc, Mutex, MutexGuard};

/// Where the VM is in its life.
pub enum State<V> {
    /// No VM runs: none was booted yet, or the last one ended. The next
    /// create boots one.
    Down,
    /// A VM runs and serves.
    Running(Arc<V>),
    /// The shim is stopping the VM because it stopped serving (its agent
    /// is dead): `why` is what its tasks' exits are reported with.
    Stopping { vm: Arc<V>, why: String },
    /// The shim has decided to exit: no VM boots again, and a VM that ends
    /// now was powered off on purpose.
    Closed,
}

/// What a VM's end means for its tasks.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended<V> {
    /// The VM ended by itself (a guest panic, a crash, a kill from
    /// outside, the OOM killer): its tasks exited, for the reason its exit
    /// gives. The VM, if the state still held it, is returned for clean-up.
    Unexpectedly(Option<Arc<V>>),
    /// The shim stopped it because it stopped serving: its tasks exited,
    /// for `why`.
    Stopped { vm: Arc<V>, why: String },
    /// Powered off on purpose (the shim is exiting): nothing to report.
    OnPurpose,
}

/// Why a VM cannot be had.
#[derive(Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// The shim is exiting: a new shim serves the next container.
    Closed,
    /// None runs (and the caller does not boot one).
    NotRunning,
}

pub struct Lifecycle<V> {
    state: Mutex<State<V>>,
}

impl<V> Default for Lifecycle<V> {
    fn default() -> Self {
        Lifecycle { state: Mutex::new(State::Down) }
    }
}

impl<V> Lifecycle<V> {
    fn lock(&self) -> MutexGuard<'_, State<V>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The VM that serves, if one does.
    pub fn running(&self) -> Result<Arc<V>, Unavailable> {
        match &*self.lock() {
            State::Running(vm) => Ok(vm.clone()),
            State::Closed => Err(Unavailable::Closed),
            State::Down | State::Stopping { .. } => Err(Unavailable::NotRunning),
        }
    }

    /// Whether `vm` is still the shim's VM and serving (not ended, not
    /// being stopped, not replaced).
    pub fn is_current(&self, vm: &Arc<V>) -> bool {
        matches!(&*self.lock(), State::Running(v) if Arc::ptr_eq(v, vm))
    }

    /// Whether the shim has decided to exit.
    pub fn is_closed(&self) -> bool {
        matches!(&*self.lock(), State::Closed)
    }

    /// The running VM, or one booted by `boot` if none runs. The lock is
    /// held while booting, so concurrent creates wait for the one VM
    /// rather than boot two. A VM still being stopped must end first.
    pub fn running_or_boot<E>(&self, boot: impl FnOnce() -> Result<Arc<V>, E>) -> Result<Arc<V>, BootError<E>> {
        let mut state = self.lock();
        match &*state {
            State::Running(vm) => Ok(vm.clone()),
            State::Closed => Err(BootError::Unavailable(Unavailable::Closed)),
            State::Stopping { .. } => Err(BootError::Unavailable(Unavailable::NotRunning)),
            State::Down => {
                let vm = boot().map_err(BootError::Boot)?;
                *state = State::Running(vm.clone());
                Ok(vm)
            }
        }
    }

    /// Running `vm` stopped serving: move to `Stopping` with `why`. Returns
    /// whether the caller is to stop it (false when `vm` is no longer the
    /// running VM: it ended, or the shim is closing, in the meantime).
    pub fn stop_serving(&self, vm: &Arc<V>, why: String) -> bool {
        let mut state = self.lock();
        if !matches!(&*state, State::Running(v) if Arc::ptr_eq(v, vm)) {
            return false;
        }
        *state = State::Stopping { vm: vm.clone(), why };
        true
    }

    /// The shim exits: no VM boots again. Returns the VM to power off, if
    /// one runs (or was being stopped).
    pub fn close(&self) -> Option<Arc<V>> {
        match std::mem::replace(&mut *self.lock(), State::Closed) {
            State::Running(vm) | State::Stopping { vm, .. } => Some(vm),
            State::Down | State::Closed => None,
        }
    }

    /// hearth-vmm ended: back to `Down` (unless closed), saying what that
    /// means for the VM's tasks.
    pub fn ended(&self) -> Ended<V> {
        let mut state = self.lock();
        match std::mem::replace(&mut *state, State::Down) {
            State::Running(vm) => Ended::Unexpectedly(Some(vm)),
            State::Stopping { vm, why } => Ended::Stopped { vm, why },
            State::Down => Ended::Unexpectedly(None),
            State::Closed => {
                *state = State::Closed;
                Ended::OnPurpose
            }
        }
    }
}

/// Why [`Lifecycle::running_or_boot`] gave no VM.
#[derive(Debug, PartialEq, Eq)]
pub enum BootError<E> {
    Unavailable(Unavailable),
    Boot(E),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(n: u32) -> impl FnOnce() -> Result<Arc<u32>, String> {
        move || Ok(Arc::new(n))
    }

    #[test]
    fn a_vm_is_booted_once_and_shared() {
        let l = Lifecycle::default();
        assert_eq!(l.running(), Err(Unavailable::NotRunning));
        let a = l.running_or_boot(boot(1)).unwrap();
        let b = l.running_or_boot(|| -> Result<Arc<u32>, String> { panic!("booted twice") }).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(l.is_current(&a));
    }

    #[test]
    fn a_failed_boot_leaves_it_down() {
        let l = Lifecycle::<u32>::default();
        assert_eq!(l.running_or_boot(|| Err("no kernel")), Err(BootError::Boot("no kernel")));
        assert_eq!(l.running(), Err(Unavailable::NotRunning));
        assert!(l.running_or_boot(boot(2)).is_ok(), "the next create boots");
    }

    #[test]
    fn a_vm_that_ends_by_itself_reports_its_tasks_and_the_next_create_boots_anew() {
        let l = Lifecycle::default();
        let a = l.running_or_boot(boot(1)).unwrap();
        assert_eq!(l.ended(), Ended::Unexpectedly(Some(a.clone())));
        assert!(!l.is_current(&a), "watchers of the old VM stop");
        let b = l.running_or_boot(boot(2)).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn a_dead_agent_stops_its_vm_once_and_the_reason_reaches_the_end() {
        let l = Lifecycle::default();
        let a = l.running_or_boot(boot(1)).unwrap();
        assert!(l.stop_serving(&a, "no health answer".into()));
        assert!(!l.stop_serving(&a, "again".into()), "stopped once");
        assert!(!l.is_current(&a));
        assert_eq!(l.running(), Err(Unavailable::NotRunning));
        assert!(
            matches!(l.running_or_boot(boot(2)), Err(BootError::Unavailable(Unavailable::NotRunning))),
            "no second VM while the first is being stopped"
        );
        assert_eq!(l.ended(), Ended::Stopped { vm: a, why: "no health answer".into() });
        assert!(l.running_or_boot(boot(2)).is_ok());
    }

    #[test]
    fn a_stale_watcher_stops_nothing() {
        let l = Lifecycle::default();
        let a = l.running_or_boot(boot(1)).unwrap();
        l.ended();
        let b = l.running_or_boot(boot(2)).unwrap();
        assert!(!l.stop_serving(&a, "late".into()));
        assert!(l.is_current(&b));
    }

    #[test]
    fn once_closed_nothing_boots_and_the_end_is_on_purpose() {
        let l = Lifecycle::default();
        let a = l.running_or_boot(boot(1)).unwrap();
        assert_eq!(l.close(), Some(a.clone()));
        assert!(l.is_closed());
        assert_eq!(l.running(), Err(Unavailable::Closed));
        assert!(matches!(l.running_or_boot(boot(2)), Err(BootError::Unavailable(Unavailable::Closed))));
        assert!(!l.stop_serving(&a, "late".into()));
        assert_eq!(l.ended(), Ended::OnPurpose);
        assert!(l.is_closed(), "still closed after the end");
        assert_eq!(Lifecycle::<u32>::default().close(), None, "closing with no VM");
    }
}
