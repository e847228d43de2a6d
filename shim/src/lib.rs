//! containerd's shim v2 for hearth (`io.containerd.hearth.v2`): boots the
//! utility VM on first use and serves containerd's Task API by driving the
//! in-VM agent (crate hearth-agent-protocol).
//!
//! - [`shim`]: the binary's commands (start with grouping, delete, serve);
//! - [`task`]: the Task service: containers, processes, events, idle shutdown;
//! - [`lifecycle`]: the VM's life (down, running, stopping, closed) as one
//!   state machine;
//! - [`vm`]: booting hearth-vmm, VM exit, clean-up after dead shims;
//! - [`cgroup`]: each VM's cgroup, its accounting and limits;
//! - [`share`]: the virtio-fs shares' host side, which the guest cannot
//!   redirect (a host-only tree, a read-only export);
//! - [`source`]: bind sources resolved so that no guest-planted symlink
//!   aims them;
//! - [`metrics`]: the agent's cgroup statistics as containerd's metrics;
//! - [`io`]: containerd's FIFOs to and from the agent's stdio streams;
//! - [`disk`]: container roots on disk images attached to the VM;
//! - [`layers`]: roots from overlayfs snapshots as erofs images of their
//!   layers, attached to the VM, the writes kept in the guest;
//! - [`network`]: the VM's own NAT network; [`netns`]: a container's
//!   network from the namespace its caller made, mirrored into the VM;
//! - [`pod`]: a CRI pod's containers join its sandbox's namespaces in the VM;
//! - [`config`] reads `/etc/hearth/config.toml`;
//! - [`record`]: the running VM's record (`vm.json`) for `hearth status`.

pub mod cgroup;
pub mod config;
pub mod disk;
pub mod dns;
pub mod forward;
pub mod hooks;
pub mod io;
pub mod layers;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod network;
pub mod pod;
pub mod record;
pub mod share;
pub mod shim;
pub mod source;
pub mod task;
pub mod tool;
pub mod vm;
