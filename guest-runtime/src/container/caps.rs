//! Capabilities a process asks for must be ones the agent has: capset(2)
//! refuses the others deep inside container creation with a bare EPERM. A
//! check up front names the capability instead.

use std::collections::HashSet;

use caps::{CapSet, Capability};
use oci_spec::runtime::Process;

use crate::error::{AgentError, Result};

fn names(process: &Process) -> HashSet<String> {
    let Some(c) = process.capabilities() else { return HashSet::new() };
    [c.bounding(), c.effective(), c.permitted(), c.inheritable(), c.ambient()]
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|cap| serde_json::to_value(cap).ok()?.as_str().map(String::from))
        .collect()
}

/// Refuses capabilities outside the agent's own bounding set.
pub fn check_available(process: &Process) -> Result<()> {
    let Ok(own) = caps::read(None, CapSet::Bounding) else { return Ok(()) };
    let mut missing: Vec<String> = names(process)
        .into_iter()
        .filter(|n| n.parse::<Capability>().map(|c| !own.contains(&c)).unwrap_or(false))
        .collect();
    missing.sort();
    if missing.is_empty() {
        return Ok(());
    }
    Err(AgentError::InvalidArgument(format!(
        "the process asks for {} which the agent itself does not have (not in its bounding set): \
         remove them from process.capabilities",
        missing.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_the_agent_has_pass() {
        let p: Process = serde_json::from_value(serde_json::json!({
            "args": ["x"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"]}
        }))
        .unwrap();
        let own = caps::read(None, CapSet::Bounding).unwrap();
        if own.contains(&Capability::CAP_KILL) {
            check_available(&p).unwrap();
        }
        assert_eq!(names(&p), HashSet::from(["CAP_KILL".to_string()]));
    }
}
