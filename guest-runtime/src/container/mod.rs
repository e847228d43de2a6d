//! Containers, run with libcontainer: the agent's registry of them and their
//! lifecycle (create, start, exec, signal, wait, delete), their bundles and
//! their cgroups.

pub mod bundle;
pub mod caps;
pub mod cgroup;
pub mod dns;
pub mod lifecycle;
pub mod nic;
pub mod oom;

pub use lifecycle::{Containers, RuntimeConfig};
