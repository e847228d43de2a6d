//! The control socket (`--api-socket PATH`): what the host asks of a
//! running VM, as Firecracker's and Cloud Hypervisor's API sockets do.
//!
//! - [`protocol`]: the requests and replies, one JSON object per line.
//! - [`control`]: what each request does to the VM (attach and detach a
//!   disk, set the balloon's target, pause and resume the vCPUs, report
//!   the VM's state and per-disk counters), and every check on it.
//! - [`server`]: the VMM's thread that accepts connections and serves them.
//! - [`client`]: the typed client the shim, the CLI and tests use.
//!
//! The wire: a Unix stream socket; a client connects, sends one request
//! line (with the disk image as an SCM_RIGHTS descriptor for `attach-disk`:
//! the VMM never opens a host path once it runs, so a jailed VMM can attach
//! any image the caller may open), reads one reply line, and the
//! connection ends. One request per connection keeps the server a plain
//! loop that no client can hold up for longer than the read timeout.
//! Requests are validated like guest input: a bad one gets an error reply.

pub mod client;
pub mod control;
pub mod protocol;
pub mod server;

#[cfg(test)]
mod tests;

pub use client::Client;
pub use control::Control;
pub use protocol::{DiskInfo, Reply, Request, VmInfo};
