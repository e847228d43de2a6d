//! `pause`: a pod sandbox's process, as Kubernetes' pause image runs it. It
//! holds the pod's namespaces, reaps the orphans a pod sharing its pid
//! namespace leaves to it (it is their PID 1), and exits 0 on SIGINT or
//! SIGTERM, which PID 1 would otherwise ignore.

extern "C" fn quit(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(0) }
}

extern "C" fn reap(_: libc::c_int) {
    // SAFETY: waitpid is async-signal-safe; WNOHANG never blocks.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

pub fn run() -> std::io::Result<()> {
    let set = |sig: libc::c_int, handler: extern "C" fn(libc::c_int)| {
        // SAFETY: a zeroed sigaction with a handler that only calls
        // async-signal-safe functions.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as usize;
            sa.sa_flags = libc::SA_RESTART;
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    set(libc::SIGINT, quit)?;
    set(libc::SIGTERM, quit)?;
    set(libc::SIGCHLD, reap)?;
    loop {
        // SAFETY: pause only waits for a signal.
        unsafe { libc::pause() };
    }
}
