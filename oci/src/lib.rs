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
