//! Where things are: the workspace, the artefact cache, the build outputs.

use std::path::PathBuf;

/// The workspace root (xtask lives one level below it).
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits inside the workspace").to_path_buf()
}

/// Heavy artefacts (kernels, images, test-host assets), keyed by a hash of
/// their inputs: `$HEARTH_CACHE`, else `~/.cache/hearth`.
pub fn cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("HEARTH_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/hearth")
}

/// The release binaries of the workspace.
pub fn release_bin(name: &str) -> PathBuf {
    target_dir().join("release").join(name)
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace().join("target"))
}
