//! PID 1 duties in the utility VM: the filesystems every process expects,
//! cgroup v2 with its controllers delegated, the hostname, the clock, the
//! network, and a clean power-off.
//!
//! Settings come from the kernel command line (`hearth.*=` parameters; the
//! kernel leaves those with a dot to /proc/cmdline instead of passing them to
//! init).

pub mod mounts;
pub mod network;

use std::time::Duration;

/// What the command line asks of PID 1.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BootParams {
    pub hostname: Option<String>,
    /// Seconds since the Unix epoch, to seed the clock.
    pub time: Option<i64>,
    /// `ADDR/PREFIX` for eth0.
    pub ip: Option<String>,
    pub gateway: Option<String>,
    /// Resolvers for /etc/resolv.conf, comma-separated.
    pub dns: Option<String>,
    /// A tracing filter (`info`, `debug`, ...).
    pub log: Option<String>,
}

impl BootParams {
    pub fn parse(cmdline: &str) -> Self {
        let mut p = BootParams::default();
        for word in cmdline.split_whitespace() {
            let Some((k, v)) = word.split_once('=') else { continue };
            match k {
                "hearth.hostname" => p.hostname = Some(v.to_string()),
                "hearth.time" => p.time = v.parse().ok(),
                "hearth.ip" => p.ip = Some(v.to_string()),
                "hearth.gw" => p.gateway = Some(v.to_string()),
                "hearth.dns" => p.dns = Some(v.to_string()),
                "hearth.log" => p.log = Some(v.to_string()),
                _ => {}
            }
        }
        p
    }

    pub fn from_kernel() -> Self {
        Self::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())
    }
}

/// The filesystems first: nothing else (not even reading the command line
/// from /proc) works without them.
pub fn mount_filesystems() -> anyhow::Result<()> {
    mounts::leave_initramfs()?;
    mounts::mount_all()
}

/// Brings the rest of the VM's userspace up. Failures here are logged, not
/// fatal: an agent that serves is worth more than a perfect one that died.
pub fn init(params: &BootParams) -> anyhow::Result<()> {
    let hostname = params.hostname.as_deref().unwrap_or("hearth");
    if let Err(e) = nix::unistd::sethostname(hostname) {
        tracing::warn!("setting the hostname: {e}");
    }
    if let Some(t) = params.time {
        if let Err(e) = crate::system::set_time(t.saturating_mul(1_000_000_000)) {
            tracing::warn!("seeding the clock: {e}");
        }
    }
    if let Err(e) = network::bring_up(params) {
        tracing::warn!("network: {e}");
    }
    Ok(())
}

/// Ends the VM: flush the disks, then reset (hearth-vmm has no ACPI; the
/// guest's reset is its clean exit).
pub fn power_off() -> ! {
    nix::unistd::sync();
    std::thread::sleep(Duration::from_millis(10));
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Unreachable unless reboot(2) failed; PID 1 must not exit.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_parameters_are_read() {
        let p = BootParams::parse(
            "console=ttyS0 quiet hearth.hostname=box hearth.time=1700000000 hearth.ip=10.0.0.2/24 hearth.gw=10.0.0.1 hearth.log=debug",
        );
        assert_eq!(p.hostname.as_deref(), Some("box"));
        assert_eq!(p.time, Some(1_700_000_000));
        assert_eq!(p.ip.as_deref(), Some("10.0.0.2/24"));
        assert_eq!(p.gateway.as_deref(), Some("10.0.0.1"));
        assert_eq!(p.log.as_deref(), Some("debug"));
        assert_eq!(BootParams::parse("quiet"), BootParams::default());
    }
}
