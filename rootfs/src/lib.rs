//! Root filesystems for hearth's distros and test images, with no tie to
//! containerd (the xtask builds them before containerd's API bindings can be
//! compiled):
//!
//! - [`debian`]: Debian trees made by mmdebstrap from a mirror, and the
//!   `debian` distro's recipe;
//! - [`tree`]: reading a root filesystem tar (its digests, OS, init), and
//!   the cache of trees built from a recipe;
//! - [`cache`]: cache keys and build locks;
//! - [`progress`]: progress for long steps, on a terminal or in a log.

pub mod cache;
pub mod debian;
pub mod progress;
pub mod tree;
