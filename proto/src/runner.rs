//! The runner channel: the per-VM supervisor ↔ `vcpu-runner`.
//!
//! It is the runner's bootstrap channel (fd 3), kept open after the
//! [`BootstrapReply::Ready`](crate::bootstrap::BootstrapReply::Ready). The supervisor then
//! sends one [`ToRunner::Boot`] with the machine to build; the runner answers
//! [`FromRunner::Running`] once every vCPU thread has entered the guest, or
//! [`FromRunner::Failed`] if the machine could not be built (a kernel that is not a bzImage,
//! an initrd that does not fit, KVM refusing the memory). While the guest runs the supervisor
//! may send [`ToRunner::PowerButton`]; the runner reports the end of the guest with exactly one
//! [`FromRunner::Exited`] and then exits itself. A reset or reboot is a new runner process
//! with a fresh guest RAM memfd: nothing of the old guest survives into the new one.
//!
//! The runner is sandboxed and runs guest-controlled code paths, so the supervisor treats
//! what it sends as hostile: [`FromRunner::validate`] bounds every string.

use serde::{Deserialize, Serialize};

use crate::bounds::{clip, is_printable_ascii};
use crate::display::MAX_DIMENSION;

/// Most vCPUs of one guest (the MADT and the APIC ids we hand out stay below 255).
pub const MAX_CPUS: u32 = 64;
/// Least guest RAM, in bytes (the kernel, the boot structures and an initrd must fit).
pub const MIN_MEMORY_BYTES: u64 = 32 << 20;
/// Most guest RAM, in bytes (1 TiB).
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;
/// Longest kernel command line, in bytes (Linux's x86 `COMMAND_LINE_SIZE`).
pub const MAX_CMDLINE_BYTES: usize = 2048;
/// Longest free-text reason in a runner message, in bytes.
pub const MAX_REASON_BYTES: usize = 512;

/// The machine the runner builds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// vCPUs, 1..=[`MAX_CPUS`].
    pub cpus: u32,
    /// Guest RAM in bytes, a multiple of 2 MiB within [`MIN_MEMORY_BYTES`]..=[`MAX_MEMORY_BYTES`];
    /// the size of the [`GuestMemory`](crate::bootstrap::FdRole::GuestMemory) memfd.
    pub memory_bytes: u64,
    /// The kernel command line (printable ASCII, at most [`MAX_CMDLINE_BYTES`]).
    pub cmdline: String,
    /// The RTC keeps UTC (`utctime="yes"`, vm-bhyve's default) rather than local time.
    pub utctime: bool,
    /// Seconds east of UTC of the host's local time, used when `utctime` is false.
    pub local_offset_secs: i32,
    /// The guest's uuid (SMBIOS, and device serials later).
    pub uuid: [u8; 16],
    /// The resolutions of the bochs display (`graphics_res`), when the guest has one; `None`:
    /// the runner's defaults. Ignored when the runner is given no framebuffer.
    pub display: Option<DisplayModes>,
}

/// What the bochs display offers the guest: the preferred mode (its EDID's first detailed
/// timing, which Linux's `bochs` driver and OVMF pick) and the largest mode it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisplayModes {
    pub width: u32,
    pub height: u32,
    pub max_width: u32,
    pub max_height: u32,
}

/// Supervisor → runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToRunner {
    /// Build the machine and run it. Sent once, first.
    Boot(MachineConfig),
    /// Press the ACPI power button (`vm stop`): the guest decides what to do with it.
    PowerButton,
    /// Device `index` (its position among the runner's `DeviceChannel`s, which is its PCI
    /// order) was restarted after its process died: the attached fd is the runner's end of the
    /// new process's channel. The runner handshakes, waits for its `Info` and sends it the
    /// device's last `Activate` again (same rings, same eventfds).
    ReplaceDevice { index: u16 },
    /// Device `index` died too often and will not be restarted: the runner marks it failed
    /// (`DEVICE_NEEDS_RESET` and a configuration interrupt), so the driver sees it broken
    /// rather than waiting for ever.
    DeviceFailed { index: u16 },
    /// dev-fb was restarted after its process died: the attached fd is the runner's end of
    /// the new display channel. The runner sends mode changes there from now on, the current
    /// mode first. (dev-fb's input devices come back through [`ToRunner::ReplaceDevice`].)
    ReplaceDisplay,
}

impl ToRunner {
    /// How many fds must come with the message.
    pub fn fd_count(&self) -> usize {
        usize::from(matches!(
            self,
            ToRunner::ReplaceDevice { .. } | ToRunner::ReplaceDisplay
        ))
    }
}

/// Why a guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestExit {
    /// The guest entered ACPI S5 (it powered itself off).
    Poweroff,
    /// The guest asked for a reset (ACPI reset register, i8042 pulse, port 0xCF9).
    Reboot,
    /// A vCPU triple-faulted (KVM's shutdown exit).
    TripleFault {
        /// The vCPU that faulted.
        vcpu: u32,
    },
    /// KVM could not run a vCPU any more (an internal error or an emulation failure).
    Crashed {
        /// The vCPU that stopped.
        vcpu: u32,
    },
}

/// Runner → supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromRunner {
    /// Every vCPU thread is running the guest.
    Running,
    /// The machine could not be built; nothing ran. The runner exits after sending it.
    Failed {
        /// What went wrong, for the user (printable ASCII, at most [`MAX_REASON_BYTES`]).
        reason: String,
    },
    /// The guest ended; the runner exits after sending it.
    Exited {
        exit: GuestExit,
        /// Detail for the log (printable ASCII, at most [`MAX_REASON_BYTES`]).
        detail: String,
    },
}

/// A runner message or machine config outside its documented bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunnerMessageError {
    #[error("cpus must be 1..={MAX_CPUS}, got {0}")]
    Cpus(u32),
    #[error(
        "memory must be a multiple of 2 MiB in {MIN_MEMORY_BYTES}..={MAX_MEMORY_BYTES} bytes, got {0}"
    )]
    Memory(u64),
    #[error("kernel command line must be printable ASCII of at most {MAX_CMDLINE_BYTES} bytes")]
    Cmdline,
    #[error("local time offset {0} s is not within a day")]
    LocalOffset(i32),
    #[error(
        "display mode {width}x{height} is not 1 to {max_width}x{max_height}, or the maximum is over {MAX_DIMENSION}"
    )]
    Display {
        width: u32,
        height: u32,
        max_width: u32,
        max_height: u32,
    },
    #[error("reason text must be printable ASCII of at most {MAX_REASON_BYTES} bytes")]
    Reason,
}

impl MachineConfig {
    /// Checks every field against its documented bounds.
    pub fn validate(&self) -> Result<(), RunnerMessageError> {
        if !(1..=MAX_CPUS).contains(&self.cpus) {
            return Err(RunnerMessageError::Cpus(self.cpus));
        }
        if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&self.memory_bytes)
            || !self.memory_bytes.is_multiple_of(2 << 20)
        {
            return Err(RunnerMessageError::Memory(self.memory_bytes));
        }
        if self.cmdline.len() > MAX_CMDLINE_BYTES || !is_printable_ascii(&self.cmdline) {
            return Err(RunnerMessageError::Cmdline);
        }
        if self.local_offset_secs.unsigned_abs() > 86_400 {
            return Err(RunnerMessageError::LocalOffset(self.local_offset_secs));
        }
        if let Some(d) = self.display {
            let fits = |v: u32, max: u32| (1..=max).contains(&v);
            if !fits(d.max_width, MAX_DIMENSION)
                || !fits(d.max_height, MAX_DIMENSION)
                || !fits(d.width, d.max_width)
                || !fits(d.height, d.max_height)
            {
                return Err(RunnerMessageError::Display {
                    width: d.width,
                    height: d.height,
                    max_width: d.max_width,
                    max_height: d.max_height,
                });
            }
        }
        Ok(())
    }
}

impl FromRunner {
    /// A [`FromRunner::Failed`] with `reason` made to fit (clipped, control characters
    /// replaced by spaces).
    pub fn failed(reason: &str) -> Self {
        FromRunner::Failed {
            reason: printable(reason),
        }
    }

    /// A [`FromRunner::Exited`] with `detail` made to fit.
    pub fn exited(exit: GuestExit, detail: &str) -> Self {
        FromRunner::Exited {
            exit,
            detail: printable(detail),
        }
    }

    /// Checks the message's bounds; the supervisor calls this on everything it receives.
    pub fn validate(&self) -> Result<(), RunnerMessageError> {
        let text = match self {
            FromRunner::Running => return Ok(()),
            FromRunner::Failed { reason } => reason,
            FromRunner::Exited { detail, .. } => detail,
        };
        if text.len() > MAX_REASON_BYTES || !is_printable_ascii(text) {
            return Err(RunnerMessageError::Reason);
        }
        Ok(())
    }
}

fn printable(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { ' ' })
        .collect();
    clip(&cleaned, MAX_REASON_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MachineConfig {
        MachineConfig {
            cpus: 2,
            memory_bytes: 512 << 20,
            cmdline: "console=ttyS0 quiet".into(),
            utctime: true,
            local_offset_secs: 0,
            uuid: [7; 16],
            display: Some(DisplayModes {
                width: 1600,
                height: 900,
                max_width: 1600,
                max_height: 900,
            }),
        }
    }

    #[test]
    fn a_sensible_machine_is_valid() {
        assert_eq!(config().validate(), Ok(()));
    }

    #[test]
    fn out_of_bounds_machines_are_refused() {
        let mut c = config();
        c.cpus = 0;
        assert_eq!(c.validate(), Err(RunnerMessageError::Cpus(0)));
        c.cpus = MAX_CPUS + 1;
        assert!(c.validate().is_err());
        let mut c = config();
        c.memory_bytes = (512 << 20) + 4096;
        assert!(matches!(c.validate(), Err(RunnerMessageError::Memory(_))));
        c.memory_bytes = MAX_MEMORY_BYTES + (2 << 20);
        assert!(c.validate().is_err());
        let mut c = config();
        c.cmdline = "a\nb".into();
        assert_eq!(c.validate(), Err(RunnerMessageError::Cmdline));
        c.cmdline = "x".repeat(MAX_CMDLINE_BYTES + 1);
        assert_eq!(c.validate(), Err(RunnerMessageError::Cmdline));
        let mut c = config();
        c.local_offset_secs = -90_000;
        assert!(c.validate().is_err());
        for (width, height, max_width, max_height) in [
            (0, 900, 1600, 900),
            (1600, 901, 1600, 900),
            (1600, 900, MAX_DIMENSION + 1, 900),
        ] {
            let mut c = config();
            c.display = Some(DisplayModes {
                width,
                height,
                max_width,
                max_height,
            });
            assert!(
                matches!(c.validate(), Err(RunnerMessageError::Display { .. })),
                "{width}x{height} of {max_width}x{max_height}"
            );
        }
    }

    #[test]
    fn runner_text_is_made_to_fit_and_checked() {
        let long = "é\u{1b}[2J".repeat(400);
        let m = FromRunner::failed(&long);
        assert_eq!(m.validate(), Ok(()));
        let bad = FromRunner::Exited {
            exit: GuestExit::Poweroff,
            detail: "\u{7}".into(),
        };
        assert_eq!(bad.validate(), Err(RunnerMessageError::Reason));
        assert_eq!(FromRunner::Running.validate(), Ok(()));
    }

    #[test]
    fn messages_round_trip_through_a_channel() {
        use crate::Channel;
        let (a, b) = Channel::pair().unwrap();
        a.send(&ToRunner::Boot(config()), &[]).unwrap();
        let got: ToRunner = b.recv().unwrap().msg;
        assert_eq!(got, ToRunner::Boot(config()));
        b.send(
            &FromRunner::exited(GuestExit::TripleFault { vcpu: 1 }, "rip=0"),
            &[],
        )
        .unwrap();
        let got: FromRunner = a.recv().unwrap().msg;
        assert!(matches!(
            got,
            FromRunner::Exited {
                exit: GuestExit::TripleFault { vcpu: 1 },
                ..
            }
        ));
    }

    #[test]
    fn replacements_carry_exactly_one_descriptor() {
        assert_eq!(ToRunner::ReplaceDisplay.fd_count(), 1);
        assert_eq!(ToRunner::ReplaceDevice { index: 3 }.fd_count(), 1);
        assert_eq!(ToRunner::DeviceFailed { index: 3 }.fd_count(), 0);
        assert_eq!(ToRunner::PowerButton.fd_count(), 0);
    }
}
