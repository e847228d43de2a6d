//! The in-VM agent of hearth: PID 1 of the utility VM. It mounts the guest's
//! pseudo filesystems, reaps zombies and runs OCI containers through
//! libcontainer, serving the shim over ttrpc on vsock.
//!
//! Status: not built yet (docs/architecture.md). Today the utility VM boots
//! a busybox initramfs built by `cargo xtask setup`.
