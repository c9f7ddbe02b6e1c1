//! `vcpu-runner`: runs the guest's vCPUs, its platform devices and (later) the virtio-pci
//! transport.
//!
//! Started by the per-VM supervisor with its bootstrap channel on fd 3. It takes its
//! descriptors (`/dev/kvm`, the guest RAM memfd, the kernel, the initrd, the console socket,
//! its log; with a display also the framebuffer memfd and the dev-fb channel), enters
//! capability mode (`child::start`, with this crate's `seccomp.policy`), and only then reads
//! the supervisor's [`ToRunner::Boot`] and builds the machine: the KVM VM with in-kernel
//! irqchip and PIT, guest RAM, ACPI tables, the kernel loaded by the Linux boot protocol, the
//! platform devices, the bochs display (`display`) and one thread per vCPU. It answers
//! [`FromRunner::Running`] or [`FromRunner::Failed`], presses the power button when asked, and
//! reports the guest's end with [`FromRunner::Exited`] before it exits.
//!
//! Trusts: its supervisor, for the bootstrap and the machine config (still validated).
//! Everything the guest writes (ports, MMIO, RAM) and the kernel and initrd files are hostile.
//! Touches: only the descriptors it was given.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod devices;
pub mod display;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod virtio_pci;

use std::fs::File;
use std::sync::Arc;

use proto::bootstrap::FdRole;
use proto::channel::{Channel, ChannelError};
use proto::runner::{FromRunner, ToRunner};

/// This process's seccomp policy, on top of the sandbox's base policy.
pub const SECCOMP_POLICY: &str = include_str!("../seccomp.policy");

/// The role name this binary answers to.
pub const ROLE: &str = "vcpu-runner";

/// Why the runner stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] child::StartError),
    #[error("runner channel failed")]
    Channel(#[from] ChannelError),
    #[error("the machine could not be built: {0}")]
    Failed(String),
}

/// Runs the process: bootstrap, capability mode, then build and run the machine the
/// supervisor asks for. Returns when the supervisor hangs up (before or after boot).
pub fn run() -> Result<(), RunError> {
    let mut started = child::start(child::ChildKind {
        role_name: ROLE,
        policy: SECCOMP_POLICY,
        threads: true,
    })?;
    let channel = Arc::new(started.channel);
    let cfg = loop {
        match channel.recv::<ToRunner>() {
            Ok(received) => match received.msg {
                ToRunner::Boot(cfg) => break cfg,
                ToRunner::PowerButton => {
                    tracing::debug!("power button before boot ignored");
                }
                ToRunner::ReplaceDevice { index } | ToRunner::DeviceFailed { index } => {
                    tracing::debug!(index, "device message before boot ignored");
                }
                ToRunner::ReplaceDisplay => tracing::debug!("display message before boot ignored"),
            },
            Err(ChannelError::Closed) => {
                tracing::info!("supervisor closed the channel before boot; exiting");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
    };

    let fds = std::mem::take(&mut started.fds);
    let controls = match boot_machine(&cfg, fds, channel.clone()) {
        Ok(controls) => controls,
        Err(reason) => {
            tracing::error!(%reason, "machine not built");
            channel.send(&FromRunner::failed(&reason), &[])?;
            return Err(RunError::Failed(reason));
        }
    };
    channel.send(&FromRunner::Running, &[])?;
    tracing::info!(cpus = cfg.cpus, memory = cfg.memory_bytes, "guest running");

    loop {
        match channel.recv::<ToRunner>() {
            Ok(received) => match received.msg {
                ToRunner::PowerButton => {
                    tracing::info!("power button pressed");
                    controls.press();
                }
                ToRunner::Boot(_) => tracing::debug!("second Boot ignored"),
                ToRunner::ReplaceDevice { index } => {
                    let Some(fd) = received.fds.into_iter().next() else {
                        tracing::warn!(index, "ReplaceDevice without a channel ignored");
                        continue;
                    };
                    match controls.replace_device(index, fd) {
                        Ok(()) => tracing::info!(index, "restarted device reconnected"),
                        Err(e) => {
                            tracing::warn!(error = %error_chain(&e), "device not reconnected");
                        }
                    }
                }
                ToRunner::ReplaceDisplay => {
                    let Some(fd) = received.fds.into_iter().next() else {
                        tracing::warn!("ReplaceDisplay without a channel ignored");
                        continue;
                    };
                    match controls.replace_display(fd) {
                        Ok(()) => tracing::info!("restarted dev-fb's display channel connected"),
                        Err(e) => {
                            tracing::warn!(error = %error_chain(&e), "display not reconnected");
                        }
                    }
                }
                ToRunner::DeviceFailed { index } => {
                    if let Err(e) = controls.fail_device(index) {
                        tracing::warn!(error = %e, "DeviceFailed not applied");
                    }
                }
            },
            Err(ChannelError::Closed) => {
                tracing::info!("supervisor closed the channel; exiting");
                // The vCPU threads never return; ending the process ends the guest.
                std::process::exit(0);
            }
            Err(e) => {
                tracing::debug!(error = %e, "malformed message on the runner channel");
            }
        }
    }
}

fn boot_machine(
    cfg: &proto::runner::MachineConfig,
    fds: Vec<(FdRole, std::os::fd::OwnedFd)>,
    channel: Arc<Channel>,
) -> Result<machine::Controls, String> {
    cfg.validate().map_err(|e| e.to_string())?;
    let mut fds = fds;
    let mut fd = |role: FdRole| -> Option<std::os::fd::OwnedFd> {
        let pos = fds.iter().position(|(r, _)| *r == role)?;
        Some(fds.remove(pos).1)
    };
    let missing = |what: &str| format!("the supervisor passed no {what} descriptor");
    let display = match (fd(FdRole::Framebuffer), fd(FdRole::DisplayChannel)) {
        (Some(framebuffer), Some(channel)) => Some(machine::DisplayInputs {
            framebuffer: File::from(framebuffer),
            channel,
        }),
        (None, None) => None,
        _ => return Err(machine::BuildError::DisplayInputs.to_string()),
    };
    let inputs = machine::Inputs {
        kvm: fd(FdRole::Kvm).ok_or_else(|| missing("/dev/kvm"))?,
        memory: File::from(fd(FdRole::GuestMemory).ok_or_else(|| missing("guest memory"))?),
        kernel: File::from(fd(FdRole::Kernel).ok_or_else(|| missing("kernel"))?),
        initrd: fd(FdRole::Initrd).map(File::from),
        console: File::from(fd(FdRole::Console).ok_or_else(|| missing("console"))?),
        devices: std::iter::from_fn(|| fd(FdRole::DeviceChannel)).collect(),
        display,
    };
    let on_exit: machine::ExitHandler = Box::new(move |exit, detail| {
        if let Err(e) = channel.send(&FromRunner::exited(exit, detail), &[]) {
            tracing::warn!(error = %e, "could not report the guest's end");
        }
        std::process::exit(0);
    });
    let machine = machine::build(cfg, inputs, on_exit).map_err(|e| error_chain(&e))?;
    machine.start().map_err(|e| error_chain(&e))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{
        KVMIO, kvm_cpuid2, kvm_fpu, kvm_irq_level, kvm_lapic_state, kvm_msrs, kvm_pit_config,
        kvm_regs, kvm_sregs, kvm_userspace_memory_region,
    };
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    ioctl_io_nr!(KVM_GET_API_VERSION, KVMIO, 0x00);
    ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
    ioctl_io_nr!(KVM_GET_VCPU_MMAP_SIZE, KVMIO, 0x04);
    ioctl_iowr_nr!(KVM_GET_SUPPORTED_CPUID, KVMIO, 0x05, kvm_cpuid2);
    ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
    ioctl_iow_nr!(
        KVM_SET_USER_MEMORY_REGION,
        KVMIO,
        0x46,
        kvm_userspace_memory_region
    );
    ioctl_io_nr!(KVM_SET_TSS_ADDR, KVMIO, 0x47);
    ioctl_iow_nr!(KVM_SET_IDENTITY_MAP_ADDR, KVMIO, 0x48, u64);
    ioctl_io_nr!(KVM_CREATE_IRQCHIP, KVMIO, 0x60);
    ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_irq_level);
    ioctl_iow_nr!(KVM_CREATE_PIT2, KVMIO, 0x77, kvm_pit_config);
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
    ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
    ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
    ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_bindings::kvm_irqfd);
    ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_bindings::kvm_ioeventfd);
    ioctl_iow_nr!(
        KVM_SET_GSI_ROUTING,
        KVMIO,
        0x6a,
        kvm_bindings::kvm_irq_routing
    );

    #[test]
    fn seccomp_policy_names_exactly_the_kvm_ioctls() {
        let expected: Vec<(&str, u64)> = vec![
            ("KVM_GET_API_VERSION", KVM_GET_API_VERSION()),
            ("KVM_CREATE_VM", KVM_CREATE_VM()),
            ("KVM_GET_VCPU_MMAP_SIZE", KVM_GET_VCPU_MMAP_SIZE()),
            ("KVM_GET_SUPPORTED_CPUID", KVM_GET_SUPPORTED_CPUID()),
            ("KVM_CREATE_VCPU", KVM_CREATE_VCPU()),
            ("KVM_SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION()),
            ("KVM_SET_TSS_ADDR", KVM_SET_TSS_ADDR()),
            ("KVM_SET_IDENTITY_MAP_ADDR", KVM_SET_IDENTITY_MAP_ADDR()),
            ("KVM_CREATE_IRQCHIP", KVM_CREATE_IRQCHIP()),
            ("KVM_IRQ_LINE", KVM_IRQ_LINE()),
            ("KVM_CREATE_PIT2", KVM_CREATE_PIT2()),
            ("KVM_RUN", KVM_RUN()),
            ("KVM_GET_REGS", KVM_GET_REGS()),
            ("KVM_SET_REGS", KVM_SET_REGS()),
            ("KVM_GET_SREGS", KVM_GET_SREGS()),
            ("KVM_SET_SREGS", KVM_SET_SREGS()),
            ("KVM_SET_MSRS", KVM_SET_MSRS()),
            ("KVM_GET_LAPIC", KVM_GET_LAPIC()),
            ("KVM_SET_LAPIC", KVM_SET_LAPIC()),
            ("KVM_SET_CPUID2", KVM_SET_CPUID2()),
            ("KVM_SET_FPU", KVM_SET_FPU()),
            ("KVM_IRQFD", KVM_IRQFD()),
            ("KVM_IOEVENTFD", KVM_IOEVENTFD()),
            ("KVM_SET_GSI_ROUTING", KVM_SET_GSI_ROUTING()),
        ];
        let mut in_policy: Vec<(&str, u64)> = super::SECCOMP_POLICY
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("ioctl arg1 == 0x")?;
                let (num, comment) = rest.split_once('#')?;
                let name = comment.trim().split(':').next()?;
                Some((name, u64::from_str_radix(num.trim(), 16).ok()?))
            })
            .collect();
        in_policy.sort_unstable();
        let mut expected = expected;
        expected.sort_unstable();
        assert_eq!(in_policy, expected);
        sandbox::Policy::parse(super::SECCOMP_POLICY).unwrap();
    }
}
