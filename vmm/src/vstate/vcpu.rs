//! A vCPU: its start-up configuration and the run loop that turns KVM exits
//! into bus accesses or VM events. Each vCPU runs on its own thread.

use std::sync::Arc;

use kvm_bindings::{CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::arch::regs::{self, EntryPoint};
use crate::arch::{cpuid, msr};
use crate::devices::bus::Bus;
use crate::devices::{EventSender, VmEvent};
use crate::vstate::run_control::RunControl;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM could not {what} of vCPU {id}: {source}")]
    Kvm { id: u8, what: &'static str, source: kvm_ioctls::Error },
    #[error("KVM accepted only {set} of {total} MSRs of vCPU {id}")]
    Msrs { id: u8, set: usize, total: usize },
    #[error("setting up vCPU {id}: {source}")]
    Regs { id: u8, source: regs::Error },
}

pub struct Vcpu {
    pub id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: EventSender,
}

impl Vcpu {
    pub fn new(vm: &VmFd, id: u8, pio: Arc<Bus>, mmio: Arc<Bus>, events: EventSender) -> Result<Vcpu, Error> {
        let fd = vm.create_vcpu(id as u64).map_err(|source| Error::Kvm { id, what: "create", source })?;
        Ok(Vcpu { id, fd, pio, mmio, events })
    }

    /// CPUID, MSRs, FPU and LINT pins for every vCPU; registers and the boot
    /// structures only for the boot vCPU (the others wait for INIT/SIPI).
    pub fn configure(
        &self,
        supported_cpuid: &CpuId,
        tsc_deadline: bool,
        count: u8,
        mem: &GuestMemoryMmap,
        entry: Option<EntryPoint>,
    ) -> Result<(), Error> {
        let id = self.id;
        let kvm = |what| move |source| Error::Kvm { id, what, source };
        let mut cpuid = supported_cpuid.clone();
        cpuid::patch_for_vcpu(&mut cpuid, id, count, tsc_deadline);
        self.fd.set_cpuid2(&cpuid).map_err(kvm("set the CPUID"))?;
        let msrs = msr::boot_msrs();
        let set = self.fd.set_msrs(&msrs).map_err(kvm("set the MSRs"))?;
        if set != msrs.as_slice().len() {
            return Err(Error::Msrs { id, set, total: msrs.as_slice().len() });
        }
        regs::setup_fpu(&self.fd).map_err(|source| Error::Regs { id, source })?;
        regs::setup_lint(&self.fd).map_err(|source| Error::Regs { id, source })?;
        if let Some(entry) = entry {
            regs::setup_boot_vcpu(&self.fd, mem, entry).map_err(|source| Error::Regs { id, source })?;
        }
        Ok(())
    }

    /// The registers that say where a crashed guest was, for the log.
    fn describe_state(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} idt={:#x}/{:#x}",
                r.rip, r.rsp, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector, s.idt.base, s.idt.limit
            ),
            (Err(e), _) | (_, Err(e)) => format!("registers unavailable: {e}"),
        }
    }

    /// Runs the guest until it ends the VM, a fatal error occurs, or
    /// `control` is stopped (the caller then interrupts KVM_RUN with a
    /// signal); waits between two runs while `control` is paused.
    pub fn run(mut self, control: Arc<RunControl>) {
        while !control.stopped() {
            control.checkpoint();
            if control.stopped() {
                return;
            }
            let event = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(port as u64, data) {
                        data.fill(0xff); // nothing on the port: an open bus reads all ones
                    }
                    continue;
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !self.pio.write(port as u64, data) {
                        tracing::trace!(port, "write to an unclaimed I/O port");
                    }
                    continue;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        tracing::debug!(addr, "read from unclaimed MMIO");
                        data.fill(0);
                    }
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !self.mmio.write(addr, data) {
                        tracing::debug!(addr, "write to unclaimed MMIO");
                    }
                    continue;
                }
                Ok(VcpuExit::Hlt) => VmEvent::Reset,
                Ok(VcpuExit::Shutdown) => {
                    tracing::error!(vcpu = self.id, state = %self.describe_state(), "triple fault");
                    VmEvent::TripleFault
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => VmEvent::Reset,
                    KVM_SYSTEM_EVENT_CRASH => VmEvent::Panic("the guest reported a crash to KVM".into()),
                    other => VmEvent::Fatal(format!("vCPU {}: unknown KVM system event {other}", self.id)),
                },
                Ok(VcpuExit::FailEntry(reason, cpu)) => VmEvent::Fatal(format!(
                    "vCPU {}: KVM failed to enter the guest (hardware entry failure reason {reason:#x} on host CPU {cpu})",
                    self.id
                )),
                Ok(VcpuExit::InternalError) => {
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the
                    // `internal` member of the union is the one KVM filled in.
                    let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    VmEvent::Fatal(format!(
                        "vCPU {}: KVM internal error (suberror {suberror}{}): the host's KVM could not run this guest",
                        self.id,
                        if suberror == 1 { ", instruction emulation failure" } else { "" }
                    ))
                }
                Ok(other) => VmEvent::Fatal(format!("vCPU {}: unexpected KVM exit {other:?}", self.id)),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => VmEvent::Fatal(format!("vCPU {}: KVM_RUN failed: {e}", self.id)),
            };
            let _ = self.events.send(event);
            return;
        }
    }
}
