//! e2e suite `boot`: hearth-vmm boots the tuned kernel with the minimal
//! busybox initramfs, and the guest reports what it sees.

use std::process::Command;
use std::time::Duration;

use hearth_e2e::{run, Env, Finished};

/// Generous hang guard: under the software-emulated test host a boot takes
/// seconds; a hang must still end the test.
const HANG_GUARD: Duration = Duration::from_secs(300);

fn boot(env: &Env, kernel: &std::path::Path, cpus: u8, memory_mib: u64, cmdline: &str) -> Finished {
    run(
        Command::new(&env.vmm)
            .arg("--kernel")
            .arg(kernel)
            .arg("--initramfs")
            .arg(&env.boot_initramfs)
            .args(["--cpus", &cpus.to_string(), "--memory", &memory_mib.to_string()])
            .args(["--cmdline", cmdline]),
        HANG_GUARD,
    )
}

fn assert_guest_facts(env: &Env, f: &Finished, cpus: u8, memory_mib: u64) {
    assert!(!f.killed, "the VM hung:\n{}", f.describe());
    assert_eq!(f.status.code(), Some(0), "the VMM did not exit 0:\n{}", f.describe());
    assert_eq!(f.fact("UNAME"), env.kernel_release, "guest uname -r");
    let online = if cpus == 1 { "0".to_string() } else { format!("0-{}", cpus - 1) };
    assert_eq!(f.fact("CPUS-ONLINE"), online, "online CPUs");
    assert_eq!(f.fact("NPROC"), cpus.to_string(), "nproc");
    let mem_kib: u64 = f.fact("MEMTOTAL-KB").parse().expect("MemTotal is a number");
    // MemTotal is RAM minus what the kernel reserves for itself: below the
    // VM's size, but not by more than a quarter.
    assert!(mem_kib <= memory_mib * 1024, "MemTotal {mem_kib} KiB exceeds the VM's {memory_mib} MiB");
    assert!(mem_kib >= memory_mib * 1024 * 3 / 4, "MemTotal {mem_kib} KiB is far below the VM's {memory_mib} MiB");
    assert!(f.stdout.contains("HEARTH-DONE"), "the guest did not reach its end");
}

#[test]
fn vmlinux_boots_through_pvh_on_two_vcpus() {
    let env = Env::get();
    let f = boot(&env, &env.vmlinux, 2, 256, "");
    assert_guest_facts(&env, &f, 2, 256);
}

#[test]
fn bzimage_boots_through_the_linux_boot_protocol() {
    let env = Env::get();
    let f = boot(&env, &env.bzimage, 2, 256, "");
    assert_guest_facts(&env, &f, 2, 256);
}

#[test]
fn memory_and_vcpus_follow_the_options() {
    let env = Env::get();
    let f = boot(&env, &env.vmlinux, 1, 512, "");
    assert_guest_facts(&env, &f, 1, 512);
}

#[test]
fn guest_kernel_panic_is_reported_with_its_own_exit_status() {
    let env = Env::get();
    // No init anywhere: the kernel panics, and with panic=-1 reboots at once.
    let f = boot(&env, &env.vmlinux, 2, 256, "rdinit=/nonexistent init=/nonexistent");
    assert!(!f.killed, "a panicking guest must end the VMM:\n{}", f.describe());
    assert_eq!(f.status.code(), Some(3), "exit status 3 means a guest panic:\n{}", f.describe());
    assert!(f.stderr.contains("the guest kernel panicked: Kernel panic - not syncing"), "{}", f.describe());
}

#[test]
fn guest_kernel_panic_without_reboot_still_ends_the_vm() {
    let env = Env::get();
    // panic=0 makes the kernel spin after panicking; the VMM must not hang.
    let f = boot(&env, &env.vmlinux, 1, 256, "panic=0 rdinit=/nonexistent init=/nonexistent");
    assert!(!f.killed, "a guest spinning after a panic must end the VMM:\n{}", f.describe());
    assert_eq!(f.status.code(), Some(3), "{}", f.describe());
}

#[test]
fn missing_kernel_is_a_clear_error() {
    let env = Env::get();
    let f = run(Command::new(&env.vmm).args(["--kernel", "/nonexistent/vmlinux"]), HANG_GUARD);
    assert_eq!(f.status.code(), Some(1), "{}", f.describe());
    assert!(f.stderr.contains("/nonexistent/vmlinux does not exist"), "{}", f.describe());
}

#[test]
fn impossible_memory_size_is_a_clear_error() {
    let env = Env::get();
    let f = run(Command::new(&env.vmm).arg("--kernel").arg(&env.vmlinux).args(["--memory", "16"]), HANG_GUARD);
    assert_eq!(f.status.code(), Some(1), "{}", f.describe());
    assert!(f.stderr.contains("too little"), "{}", f.describe());
    let f = run(Command::new(&env.vmm).arg("--kernel").arg(&env.vmlinux).args(["--memory", "99999999"]), HANG_GUARD);
    assert_eq!(f.status.code(), Some(1), "{}", f.describe());
    assert!(f.stderr.contains("more than this host has"), "{}", f.describe());
}
