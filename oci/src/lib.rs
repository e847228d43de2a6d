//! OCI runtime-spec work shared by both sides of hearth: loading and
//! validating `config.json` and process documents with errors that say what is
//! wrong, and (for the shim) translating a bundle's host paths into the paths
//! the utility VM sees.
//!
//! Parsing is oci-spec's; this crate adds the checks a runtime needs before it
//! commits to anything, so that a bad document is refused with a message
//! instead of failing half-way through container creation.

pub mod spec;
pub mod translate;

pub use spec::{parse_process, parse_resources, parse_spec, SpecError};

/// Annotation asking the agent to give the container the VM's resolver
/// configuration: with value `vm`, the VM's /etc/resolv.conf (the host's
/// resolvers, docs/networking.md) is copied into the container's root as
/// its /etc/resolv.conf when the container is created, as WSL generates
/// a distribution's. Distros, which share the VM's network, carry it.
pub const ANNOTATION_RESOLV_CONF: &str = "io.hearth.resolv-conf";
