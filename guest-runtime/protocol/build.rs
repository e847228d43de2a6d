//! Compiles proto/agent.proto with ttrpc-codegen (pure Rust, no protoc).
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("gen");
    std::fs::create_dir_all(&out).unwrap();
    println!("cargo:rerun-if-changed=proto/agent.proto");
    ttrpc_codegen::Codegen::new()
        .out_dir(&out)
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .run()
        .expect("compiling proto/agent.proto");
    // The generated files start with inner attributes (`#![allow(..)]`),
    // which `include!` cannot take: drop them (lib.rs sets its own allows).
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out.join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let kept: String =
            text.lines().filter(|l| !l.starts_with("#![") && !l.starts_with("//!")).map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, kept).unwrap();
    }
}
