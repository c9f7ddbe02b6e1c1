//! `vcpu-runner`: runs the guest's vCPUs, its platform devices and the virtio-pci transport.
//!
//! Started by the per-VM supervisor with its bootstrap channel on fd 3; it will hold
//! the KVM VM and vCPU descriptors and the guest RAM memfd. So far the process takes its bootstrap, enters capability mode
//! (`child::start`, with this crate's `seccomp.policy`) and waits until the supervisor closes
//! the channel; the device model itself comes with a later change.
//!
//! Trusts: its supervisor, for the bootstrap. Touches: only the descriptors it was given.

pub mod devices;
pub mod layout;

/// This process's seccomp policy, on top of the sandbox's base policy.
pub const SECCOMP_POLICY: &str = include_str!("../seccomp.policy");

/// The role name this binary answers to.
pub const ROLE: &str = "vcpu-runner";

/// Runs the process: bootstrap, capability mode, then serve until the supervisor hangs up.
pub fn run() -> Result<(), child::StartError> {
    child::start_and_wait(child::ChildKind {
        role_name: ROLE,
        policy: SECCOMP_POLICY,
        threads: false,
    })
}
