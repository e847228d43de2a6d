//! OCI runtime-spec work shared by both sides of hearth: loading and
//! validating `config.json`, translating host paths of a bundle into the
//! paths the utility VM sees, mounts and devices.
//!
//! Status: not built yet. This crate exists so the workspace has the shape the
//! design describes (docs/architecture.md); its work is tracked by the shim
//! and agent issues.
