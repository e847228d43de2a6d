//! Loading and validating OCI runtime documents.

use oci_spec::runtime::{LinuxResources, Process, Spec};

/// What is wrong with a document, worded for the person who wrote it.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error(
        "the OCI spec is not valid JSON for a runtime spec: {0} (check config.json against the runtime-spec schema)"
    )]
    Json(#[source] serde_json::Error),
    #[error("the OCI spec has no `process`: a container needs something to run")]
    NoProcess,
    #[error("the OCI spec's process.args is empty: name the program to run")]
    NoArgs,
    #[error("the OCI spec's process.cwd {0:?} is not absolute")]
    RelativeCwd(String),
    #[error("the OCI spec has no `linux` section: hearth runs Linux containers only")]
    NotLinux,
    #[error("the OCI spec's ociVersion {0:?} is not a 1.x runtime spec")]
    Version(String),
    #[error("mount destination {0:?} is not absolute")]
    RelativeMount(String),
}

/// Parses and checks a whole runtime spec (`config.json`).
pub fn parse_spec(json: &[u8]) -> Result<Spec, SpecError> {
    let spec: Spec = serde_json::from_slice(json).map_err(SpecError::Json)?;
    if !spec.version().starts_with("1.") {
        return Err(SpecError::Version(spec.version().clone()));
    }
    let process = spec.process().as_ref().ok_or(SpecError::NoProcess)?;
    check_process(process)?;
    if spec.linux().is_none() {
        return Err(SpecError::NotLinux);
    }
    for m in spec.mounts().iter().flatten() {
        if !m.destination().is_absolute() {
            return Err(SpecError::RelativeMount(m.destination().display().to_string()));
        }
    }
    Ok(spec)
}

/// Parses and checks a process document (the `process` object of a spec), as
/// an exec request carries it.
pub fn parse_process(json: &[u8]) -> Result<Process, SpecError> {
    let process: Process = serde_json::from_slice(json).map_err(SpecError::Json)?;
    check_process(&process)?;
    Ok(process)
}

/// Parses a `linux.resources` object, as an update request carries it.
pub fn parse_resources(json: &[u8]) -> Result<LinuxResources, SpecError> {
    serde_json::from_slice(json).map_err(SpecError::Json)
}

fn check_process(process: &Process) -> Result<(), SpecError> {
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(SpecError::NoArgs);
    }
    if !process.cwd().is_absolute() {
        return Err(SpecError::RelativeCwd(process.cwd().display().to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["/bin/sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "linux": {}
        })
    }

    #[test]
    fn a_minimal_spec_parses() {
        let spec = parse_spec(minimal().to_string().as_bytes()).unwrap();
        assert_eq!(spec.process().as_ref().unwrap().args().as_ref().unwrap()[0], "/bin/sh");
    }

    #[test]
    fn malformed_json_names_the_schema() {
        let err = parse_spec(b"{\"ociVersion\": ").unwrap_err();
        assert!(matches!(err, SpecError::Json(_)));
        assert!(err.to_string().contains("not valid JSON"), "{err}");
    }

    #[test]
    fn each_missing_piece_is_named() {
        let mut s = minimal();
        s.as_object_mut().unwrap().remove("process");
        assert!(matches!(parse_spec(s.to_string().as_bytes()), Err(SpecError::NoProcess)));

        let mut s = minimal();
        s["process"]["args"] = serde_json::json!([]);
        assert!(matches!(parse_spec(s.to_string().as_bytes()), Err(SpecError::NoArgs)));

        let mut s = minimal();
        s["process"]["cwd"] = "work".into();
        assert!(matches!(parse_spec(s.to_string().as_bytes()), Err(SpecError::RelativeCwd(_))));

        let mut s = minimal();
        s.as_object_mut().unwrap().remove("linux");
        assert!(matches!(parse_spec(s.to_string().as_bytes()), Err(SpecError::NotLinux)));

        let mut s = minimal();
        s["ociVersion"] = "0.9".into();
        assert!(matches!(parse_spec(s.to_string().as_bytes()), Err(SpecError::Version(_))));

        let mut s = minimal();
        s["mounts"] = serde_json::json!([{"destination": "proc", "type": "proc", "source": "proc"}]);
        assert!(matches!(parse_spec(s.to_string().as_bytes()), Err(SpecError::RelativeMount(_))));
    }

    #[test]
    fn processes_and_resources_parse_alone() {
        let p = parse_process(br#"{"args": ["ls"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#).unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &["ls"]);
        assert!(matches!(parse_process(br#"{"cwd": "/", "user": {"uid": 0, "gid": 0}}"#), Err(SpecError::NoArgs)));
        let r = parse_resources(br#"{"pids": {"limit": 10}}"#).unwrap();
        assert_eq!(r.pids().as_ref().unwrap().limit(), 10);
    }
}
