//! The bootstrap channel: what the per-VM supervisor sends a child on its fd 3, and the
//! child's answer once it is inside its sandbox.
//!
//! The supervisor sends one [`Bootstrap`] with the child's fds attached in the order of
//! [`Bootstrap::fds`]; the child checks it with [`Bootstrap::validate`], pairs the fds with
//! their roles ([`Bootstrap::pair_fds`]), enters capability mode and replies with a
//! [`BootstrapReply`].

use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};

use crate::bounds::{clip, is_printable_ascii};
use crate::channel::MAX_FDS;

/// Longest VM name, in bytes.
pub const MAX_VM_NAME_BYTES: usize = 64;
/// Longest `tracing` filter directive, in bytes.
pub const MAX_LOG_FILTER_BYTES: usize = 256;
/// Highest `index` of a [`Role::DevBlk`] or [`Role::DevNet`].
pub const MAX_DEVICE_INDEX: u32 = 63;
/// Highest fd ceiling a child may be given.
pub const MAX_SANDBOX_FDS: u32 = 1024;
/// Longest [`BootstrapReply::Failed`] `stage`, in bytes.
pub const MAX_STAGE_BYTES: usize = 64;
/// Longest [`BootstrapReply::Failed`] `error`, in bytes.
pub const MAX_ERROR_BYTES: usize = 1024;

/// The job a child process is started for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    VcpuRunner,
    /// The virtio-blk device of the guest's `disk{index}`.
    DevBlk {
        index: u32,
    },
    /// The virtio-net device of the guest's `network{index}`.
    DevNet {
        index: u32,
    },
    DevFb,
    Netcfg,
}

impl Role {
    /// The process name, as used for the binary and in logs.
    pub fn name(&self) -> &'static str {
        match self {
            Role::VcpuRunner => "vcpu-runner",
            Role::DevBlk { .. } => "dev-blk",
            Role::DevNet { .. } => "dev-net",
            Role::DevFb => "dev-fb",
            Role::Netcfg => "netcfg",
        }
    }
}

/// What the child's sandbox is set to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSettings {
    /// Unprivileged uid to drop to; 0 only for [`Role::Netcfg`].
    pub uid: u32,
    /// Unprivileged gid to drop to; 0 only for [`Role::Netcfg`].
    pub gid: u32,
    /// The `RLIMIT_NOFILE` ceiling, at most [`MAX_SANDBOX_FDS`] and above the fds it is given.
    pub max_fds: u32,
}

/// What an attached fd is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FdRole {
    /// Where the child writes its log.
    Log,
    /// `/dev/kvm`, opened by the supervisor (the runner cannot open paths in capability mode).
    Kvm,
    /// The guest RAM memfd.
    GuestMemory,
    /// A disk image or ISO.
    Disk,
    /// A tap device from netcfg.
    Tap,
    /// A bzImage for `loader="linux"`.
    Kernel,
    /// An initramfs for `loader="linux"`.
    Initrd,
    /// The guest's serial console (a pty or socket end).
    Console,
    /// The listening VNC socket.
    VncListener,
    /// One runner↔device channel; the only role that may repeat.
    DeviceChannel,
    /// The framebuffer memfd shared by vcpu-runner and dev-fb.
    Framebuffer,
    /// UEFI firmware code (OVMF), mapped read-only below 4 GiB.
    Firmware,
    /// The guest's UEFI variable store.
    FirmwareVars,
    /// dev-blk's in-flight request region, which outlives a device restart.
    InflightRegion,
    /// A `NETLINK_ROUTE` socket for `netcfg`, opened by its parent.
    Netlink,
    /// The runner↔dev-fb channel: the bochs display's mode changes
    /// ([`ToDisplay`](crate::display::ToDisplay)) go from the runner to dev-fb on it.
    DisplayChannel,
}

impl FdRole {
    /// Whether a child may receive more than one fd of this role: the runner's device
    /// channels, and the queues of a multi-queue tap (one per virtio-net queue pair).
    pub fn may_repeat(self) -> bool {
        matches!(self, FdRole::DeviceChannel | FdRole::Tap)
    }
}

/// The setup message a child reads first on its fd 3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bootstrap {
    pub role: Role,
    /// The guest's name, for log context; see [`validate_vm_name`].
    pub vm_name: String,
    pub sandbox: SandboxSettings,
    /// The role of each attached fd, in attachment order; at most [`MAX_FDS`].
    pub fds: Vec<FdRole>,
    /// A `tracing` filter (printable ASCII, at most [`MAX_LOG_FILTER_BYTES`]).
    pub log_filter: String,
}

/// The child's answer, sent after it has entered its sandbox (or failed to).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootstrapReply {
    Ready {
        pid: u32,
    },
    /// `stage` at most [`MAX_STAGE_BYTES`], `error` at most [`MAX_ERROR_BYTES`].
    Failed {
        stage: String,
        error: String,
    },
}

/// Why a [`Bootstrap`] or [`BootstrapReply`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    #[error("message lists {declared} fds but {received} arrived")]
    FdCount { declared: usize, received: usize },
    #[error("VM name is {len} bytes, not 1 to {MAX_VM_NAME_BYTES}")]
    VmNameLength { len: usize },
    #[error(
        "VM name must start with a letter or digit and hold only letters, digits, '_', '.' and '-'"
    )]
    VmNameChars,
    #[error("log filter is {len} bytes, over {MAX_LOG_FILTER_BYTES}")]
    LogFilterLength { len: usize },
    #[error("log filter holds a character that is not printable ASCII")]
    LogFilterChars,
    #[error("device index {index} is over {MAX_DEVICE_INDEX}")]
    DeviceIndex { index: u32 },
    #[error("fd role {role:?} appears more than once")]
    DuplicateFdRole { role: FdRole },
    #[error("{role} must run as an unprivileged uid and gid, not {uid}:{gid}")]
    PrivilegedIds {
        role: &'static str,
        uid: u32,
        gid: u32,
    },
    #[error("fd ceiling {max_fds} is outside {min} to {MAX_SANDBOX_FDS}")]
    MaxFds { max_fds: u32, min: u32 },
    #[error("failure stage is {len} bytes, over {MAX_STAGE_BYTES}")]
    StageLength { len: usize },
    #[error("failure text is {len} bytes, over {MAX_ERROR_BYTES}")]
    ErrorLength { len: usize },
}

/// Checks a VM name: 1 to [`MAX_VM_NAME_BYTES`] bytes of `[A-Za-z0-9_.-]`, starting with a
/// letter or digit (so it is never `.`, `..`, a hidden file or an option).
pub fn validate_vm_name(name: &str) -> Result<(), BootstrapError> {
    if name.is_empty() || name.len() > MAX_VM_NAME_BYTES {
        return Err(BootstrapError::VmNameLength { len: name.len() });
    }
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(BootstrapError::VmNameChars)
    }
}

impl Bootstrap {
    /// Checks every field against its bound, and the fd list against the `received_fds` that
    /// actually arrived.
    pub fn validate(&self, received_fds: usize) -> Result<(), BootstrapError> {
        if self.fds.len() != received_fds || self.fds.len() > MAX_FDS {
            return Err(BootstrapError::FdCount {
                declared: self.fds.len(),
                received: received_fds,
            });
        }
        validate_vm_name(&self.vm_name)?;
        if self.log_filter.len() > MAX_LOG_FILTER_BYTES {
            return Err(BootstrapError::LogFilterLength {
                len: self.log_filter.len(),
            });
        }
        if !is_printable_ascii(&self.log_filter) {
            return Err(BootstrapError::LogFilterChars);
        }
        match self.role {
            Role::DevBlk { index } | Role::DevNet { index } if index > MAX_DEVICE_INDEX => {
                return Err(BootstrapError::DeviceIndex { index });
            }
            _ => {}
        }
        for (position, role) in self.fds.iter().enumerate() {
            let earlier = self.fds.get(..position).unwrap_or_default();
            if !role.may_repeat() && earlier.contains(role) {
                return Err(BootstrapError::DuplicateFdRole { role: *role });
            }
        }
        self.validate_sandbox()
    }

    fn validate_sandbox(&self) -> Result<(), BootstrapError> {
        let SandboxSettings { uid, gid, max_fds } = self.sandbox;
        // netcfg keeps uid 0 with CAP_NET_ADMIN only; every other child must leave root.
        if self.role != Role::Netcfg && (uid == 0 || gid == 0) {
            return Err(BootstrapError::PrivilegedIds {
                role: self.role.name(),
                uid,
                gid,
            });
        }
        // Room for every attached fd plus the bootstrap socket itself.
        let min = u32::try_from(self.fds.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        if max_fds < min || max_fds > MAX_SANDBOX_FDS {
            return Err(BootstrapError::MaxFds { max_fds, min });
        }
        Ok(())
    }

    /// Pairs the received fds with their roles, in order. Call after [`Bootstrap::validate`];
    /// a count mismatch is refused (and the fds closed).
    pub fn pair_fds(&self, fds: Vec<OwnedFd>) -> Result<Vec<(FdRole, OwnedFd)>, BootstrapError> {
        if fds.len() != self.fds.len() {
            return Err(BootstrapError::FdCount {
                declared: self.fds.len(),
                received: fds.len(),
            });
        }
        Ok(self.fds.iter().copied().zip(fds).collect())
    }
}

impl BootstrapReply {
    /// A `Failed` reply with both texts clipped to their bounds.
    pub fn failed(stage: &str, error: &str) -> BootstrapReply {
        BootstrapReply::Failed {
            stage: clip(stage, MAX_STAGE_BYTES),
            error: clip(error, MAX_ERROR_BYTES),
        }
    }

    /// Checks the text bounds of a `Failed` reply.
    pub fn validate(&self) -> Result<(), BootstrapError> {
        match self {
            BootstrapReply::Ready { .. } => Ok(()),
            BootstrapReply::Failed { stage, error } => {
                if stage.len() > MAX_STAGE_BYTES {
                    Err(BootstrapError::StageLength { len: stage.len() })
                } else if error.len() > MAX_ERROR_BYTES {
                    Err(BootstrapError::ErrorLength { len: error.len() })
                } else {
                    Ok(())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    use proptest::prelude::*;

    use super::*;
    use crate::channel::{Channel, decode_packet, encode_packet};

    fn runner_bootstrap() -> Bootstrap {
        Bootstrap {
            role: Role::VcpuRunner,
            vm_name: "debian-12.test_vm".to_owned(),
            sandbox: SandboxSettings {
                uid: 64_000,
                gid: 64_000,
                max_fds: 64,
            },
            fds: vec![FdRole::Log, FdRole::GuestMemory],
            log_filter: "info,vcpu_runner=debug".to_owned(),
        }
    }

    #[test]
    fn bootstrap_with_fds_round_trips_and_fds_reach_the_same_files() {
        let (supervisor, child) = Channel::pair().unwrap();
        let (mut log_reader, log_writer) = std::io::pipe().unwrap();
        let (mut mem_reader, mem_writer) = std::io::pipe().unwrap();
        let sent = runner_bootstrap();

        supervisor
            .send(&sent, &[log_writer.as_fd(), mem_writer.as_fd()])
            .unwrap();
        drop((log_writer, mem_writer));
        let received = child.recv::<Bootstrap>().unwrap();
        received.msg.validate(received.fds.len()).unwrap();
        let paired = received.msg.pair_fds(received.fds).unwrap();
        for (role, fd) in paired {
            let mut file = File::from(fd);
            write!(file, "{role:?}").unwrap();
        }

        let mut log = String::new();
        log_reader.read_to_string(&mut log).unwrap();
        let mut mem = String::new();
        mem_reader.read_to_string(&mut mem).unwrap();
        assert_eq!(received.msg, sent);
        assert_eq!((log.as_str(), mem.as_str()), ("Log", "GuestMemory"));
    }

    #[test]
    fn reply_round_trips() {
        let (supervisor, child) = Channel::pair().unwrap();
        let replies = [
            BootstrapReply::Ready { pid: 4242 },
            BootstrapReply::failed("landlock", "ruleset not supported"),
        ];

        for reply in &replies {
            child.send(reply, &[]).unwrap();
        }
        let got: Vec<BootstrapReply> = replies
            .iter()
            .map(|_| supervisor.recv().unwrap().expect_fds(0).unwrap().0)
            .collect();

        assert_eq!(got, replies);
    }

    #[test]
    fn valid_bootstrap_passes() {
        assert_eq!(runner_bootstrap().validate(2), Ok(()));
    }

    #[test]
    fn fd_list_longer_than_received_is_refused() {
        let err = runner_bootstrap().validate(1).unwrap_err();

        assert_eq!(
            err,
            BootstrapError::FdCount {
                declared: 2,
                received: 1
            }
        );
    }

    #[test]
    fn vm_names_outside_the_alphabet_or_length_are_refused() {
        for (name, expected) in [
            ("", BootstrapError::VmNameLength { len: 0 }),
            (&"a".repeat(65), BootstrapError::VmNameLength { len: 65 }),
            ("..", BootstrapError::VmNameChars),
            (".hidden", BootstrapError::VmNameChars),
            ("-rf", BootstrapError::VmNameChars),
            ("a/b", BootstrapError::VmNameChars),
            ("a b", BootstrapError::VmNameChars),
            ("vm\u{e9}", BootstrapError::VmNameChars),
        ] {
            assert_eq!(validate_vm_name(name), Err(expected), "{name:?}");
        }
        assert_eq!(validate_vm_name(&"a".repeat(64)), Ok(()));
        assert_eq!(validate_vm_name("web-01.example_2"), Ok(()));
    }

    #[test]
    fn log_filter_with_control_characters_is_refused() {
        let mut bootstrap = runner_bootstrap();
        bootstrap.log_filter = "info\nwarn".to_owned();

        assert_eq!(bootstrap.validate(2), Err(BootstrapError::LogFilterChars));
    }

    #[test]
    fn overlong_log_filter_is_refused() {
        let mut bootstrap = runner_bootstrap();
        bootstrap.log_filter = "x".repeat(MAX_LOG_FILTER_BYTES + 1);

        assert_eq!(
            bootstrap.validate(2),
            Err(BootstrapError::LogFilterLength { len: 257 })
        );
    }

    #[test]
    fn device_index_over_the_bound_is_refused() {
        let mut bootstrap = runner_bootstrap();
        bootstrap.role = Role::DevBlk { index: 64 };

        assert_eq!(
            bootstrap.validate(2),
            Err(BootstrapError::DeviceIndex { index: 64 })
        );
    }

    #[test]
    fn duplicate_singleton_fd_role_is_refused() {
        let mut bootstrap = runner_bootstrap();
        bootstrap.fds = vec![FdRole::Log, FdRole::Disk, FdRole::Disk];

        assert_eq!(
            bootstrap.validate(3),
            Err(BootstrapError::DuplicateFdRole { role: FdRole::Disk })
        );
    }

    #[test]
    fn repeated_device_channels_are_allowed() {
        let mut bootstrap = runner_bootstrap();
        bootstrap.fds = vec![FdRole::DeviceChannel; 3];

        assert_eq!(bootstrap.validate(3), Ok(()));
    }

    #[test]
    fn device_child_as_root_is_refused_but_netcfg_may_be_root() {
        let mut bootstrap = runner_bootstrap();
        bootstrap.role = Role::DevNet { index: 0 };
        bootstrap.sandbox.uid = 0;

        let device = bootstrap.validate(2);
        bootstrap.role = Role::Netcfg;
        let netcfg = bootstrap.validate(2);

        assert_eq!(
            device,
            Err(BootstrapError::PrivilegedIds {
                role: "dev-net",
                uid: 0,
                gid: 64_000
            })
        );
        assert_eq!(netcfg, Ok(()));
    }

    #[test]
    fn fd_ceiling_outside_its_range_is_refused() {
        let mut bootstrap = runner_bootstrap();
        bootstrap.sandbox.max_fds = 2;
        let too_low = bootstrap.validate(2);
        bootstrap.sandbox.max_fds = MAX_SANDBOX_FDS + 1;
        let too_high = bootstrap.validate(2);

        assert_eq!(too_low, Err(BootstrapError::MaxFds { max_fds: 2, min: 3 }));
        assert_eq!(
            too_high,
            Err(BootstrapError::MaxFds {
                max_fds: 1025,
                min: 3
            })
        );
    }

    #[test]
    fn pairing_fewer_fds_than_listed_is_refused() {
        let (_, writer) = std::io::pipe().unwrap();

        let err = runner_bootstrap()
            .pair_fds(vec![OwnedFd::from(writer)])
            .unwrap_err();

        assert_eq!(
            err,
            BootstrapError::FdCount {
                declared: 2,
                received: 1
            }
        );
    }

    #[test]
    fn failed_reply_is_clipped_to_its_bounds_and_then_valid() {
        let reply = BootstrapReply::failed(&"s".repeat(100), &"e".repeat(5000));

        let BootstrapReply::Failed { stage, error } = &reply else {
            panic!("not Failed: {reply:?}");
        };
        assert_eq!(
            (stage.len(), error.len()),
            (MAX_STAGE_BYTES, MAX_ERROR_BYTES)
        );
        assert_eq!(reply.validate(), Ok(()));
    }

    #[test]
    fn overlong_failed_reply_is_refused() {
        let reply = BootstrapReply::Failed {
            stage: "seccomp".to_owned(),
            error: "e".repeat(MAX_ERROR_BYTES + 1),
        };

        assert_eq!(
            reply.validate(),
            Err(BootstrapError::ErrorLength { len: 1025 })
        );
    }

    fn any_role() -> impl Strategy<Value = Role> {
        prop_oneof![
            Just(Role::VcpuRunner),
            any::<u32>().prop_map(|index| Role::DevBlk { index }),
            any::<u32>().prop_map(|index| Role::DevNet { index }),
            Just(Role::DevFb),
            Just(Role::Netcfg),
        ]
    }

    fn any_fd_role() -> impl Strategy<Value = FdRole> {
        prop::sample::select(vec![
            FdRole::Log,
            FdRole::GuestMemory,
            FdRole::Disk,
            FdRole::Tap,
            FdRole::Kernel,
            FdRole::Initrd,
            FdRole::Console,
            FdRole::VncListener,
            FdRole::DeviceChannel,
            FdRole::Framebuffer,
            FdRole::Firmware,
            FdRole::FirmwareVars,
            FdRole::InflightRegion,
            FdRole::Netlink,
            FdRole::DisplayChannel,
        ])
    }

    fn any_bootstrap() -> impl Strategy<Value = Bootstrap> {
        (
            any_role(),
            ".{0,80}",
            any::<(u32, u32, u32)>(),
            prop::collection::vec(any_fd_role(), 0..=40),
            ".{0,300}",
        )
            .prop_map(
                |(role, vm_name, (uid, gid, max_fds), fds, log_filter)| Bootstrap {
                    role,
                    vm_name,
                    sandbox: SandboxSettings { uid, gid, max_fds },
                    fds,
                    log_filter,
                },
            )
    }

    fn any_reply() -> impl Strategy<Value = BootstrapReply> {
        prop_oneof![
            any::<u32>().prop_map(|pid| BootstrapReply::Ready { pid }),
            (".{0,100}", ".{0,2000}")
                .prop_map(|(stage, error)| BootstrapReply::Failed { stage, error }),
        ]
    }

    proptest! {
        #[test]
        fn any_bootstrap_round_trips(bootstrap in any_bootstrap()) {
            let packet = encode_packet(&bootstrap, 0).unwrap();
            let back: Bootstrap = decode_packet(&packet, 0).unwrap();
            prop_assert_eq!(back, bootstrap);
        }

        #[test]
        fn any_bootstrap_reply_round_trips_through_a_channel(reply in any_reply()) {
            let (a, b) = Channel::pair().unwrap();
            a.send(&reply, &[]).unwrap();
            let (back, _) = b.recv::<BootstrapReply>().unwrap().expect_fds(0).unwrap();
            prop_assert_eq!(back, reply);
        }

        #[test]
        fn validate_never_panics(bootstrap in any_bootstrap(), received in 0usize..64) {
            let _ = bootstrap.validate(received);
        }
    }
}
