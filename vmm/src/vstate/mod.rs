//! KVM state: the VM (memory slots, in-kernel irqchip and PIT), its vCPUs,
//! and the control that stops and pauses them.

pub mod run_control;
pub mod vcpu;
pub mod vm;
