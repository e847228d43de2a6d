//! `containerd-shim-hearth-v2`: started by containerd for the runtime
//! `io.containerd.hearth.v2`.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};

const RUNTIME: &str = "io.containerd.hearth.v2";

fn main() {
    // A panic anywhere in the shim goes to containerd's log (the shim's
    // stderr is /dev/null), not nowhere.
    std::panic::set_hook(Box::new(|info| {
        log::error!("containerd-shim-hearth-v2 panicked: {info}\n{}", std::backtrace::Backtrace::force_capture());
    }));
    if !std::env::args().skip(1).any(|a| a == "start") {
        containerd_shim::run::<containerd_shim_hearth_v2::shim::HearthShim>(RUNTIME, None);
        return;
    }
    // `start` answers with the shim's address on stdout. The containerd-shim
    // crate answers in the JSON form containerd 1.7+ reads; containerd 1.6
    // (Debian 12's) takes stdout as the address itself. Capture the answer
    // and print the bare address, which every version accepts.
    // Close-on-exec: the shim that `start` spawns must not inherit either
    // end, or containerd would wait for its stdout to close for ever.
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    let saved = nix::fcntl::fcntl(1, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3)).expect("dup stdout");
    nix::unistd::dup2(w.as_raw_fd(), 1).expect("dup2");
    drop(w);
    containerd_shim::run::<containerd_shim_hearth_v2::shim::HearthShim>(RUNTIME, None);
    use std::io::Write;
    let _ = std::io::stdout().flush();
    nix::unistd::dup2(saved, 1).expect("restore stdout");
    // SAFETY: `saved` is a descriptor we own; 1 now refers to the same file.
    drop(unsafe { std::fs::File::from_raw_fd(saved) });
    let mut answer = String::new();
    let _ = std::fs::File::from(r).read_to_string(&mut answer);
    let address = serde_json::from_str::<serde_json::Value>(answer.trim())
        .ok()
        .and_then(|v| v["address"].as_str().map(String::from))
        .unwrap_or_else(|| answer.trim().to_string());
    print!("{address}");
}
