//! containerd's shim v2 for hearth (`io.containerd.hearth.v2`): boots the
//! utility VM on first use and serves containerd's Task API by driving the
//! in-VM agent.
//!
//! Status: not built yet (docs/architecture.md).
