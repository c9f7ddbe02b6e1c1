//! The control channel: the `vm` CLI ↔ a per-VM supervisor.
//!
//! The CLI connects to the guest's control socket, handshakes as [`ChannelKind::Control`],
//! sends one [`Request`] and reads one [`Reply`]. The requests mirror vm-bhyve's lifecycle
//! commands on a running guest (`vm info`/`list`, `stop`, `poweroff`, `reset`, `restart`,
//! `console`); starting a guest is not a request, since there is no supervisor to ask yet.
//!
//! The CLI trusts the supervisor (both run as root) but still checks the reply's bounds with
//! [`Reply::validate`], because it prints the text to a terminal.
//!
//! [`ChannelKind::Control`]: crate::channel::ChannelKind::Control

use serde::{Deserialize, Serialize};

use crate::bounds::clip;

/// Longest grace period of [`Request::Stop`], in seconds.
pub const MAX_STOP_TIMEOUT_SECS: u32 = 3600;
/// Most entries in [`VmStatus::processes`].
pub const MAX_PROCESSES: usize = 256;
/// Longest [`ProcessInfo::role`], in bytes.
pub const MAX_ROLE_BYTES: usize = 32;
/// Longest [`VmStatus::vnc`] address, in bytes.
pub const MAX_VNC_BYTES: usize = 64;
/// Longest [`Reply::Error`] message, in bytes.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// What the CLI asks of a running guest's supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Report the guest's processes (`vm info`, `vm list`): replied with [`Reply::Status`].
    Status,
    /// Press the ACPI power button (`vm stop`). Replied with [`Reply::Ok`] once pressed; if the
    /// guest is still running `timeout_secs` later the supervisor powers it off. 0 never forces.
    /// At most [`MAX_STOP_TIMEOUT_SECS`].
    Stop { timeout_secs: u32 },
    /// Stop the guest at once, as pulling the plug (`vm poweroff`).
    Poweroff,
    /// Reset the guest at once, without a shutdown (`vm reset`).
    Reset,
    /// Shut the guest down through ACPI and boot it again (`vm restart`).
    Restart,
    /// Attach to the serial console (`vm console`): replied with [`Reply::Ok`] carrying one fd,
    /// a bidirectional stream to the guest's first UART; [`Reply::Error`] if already attached.
    ConsoleAttach,
}

/// The supervisor's answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Status(VmStatus),
    Ok,
    /// The request failed; see [`Reply::error`] for building one within bounds.
    Error {
        message: String,
    },
}

/// A running guest as its supervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// The supervisor's pid.
    pub pid: u32,
    pub uptime_secs: u64,
    /// One entry per child process, at most [`MAX_PROCESSES`].
    pub processes: Vec<ProcessInfo>,
    /// Where the VNC server listens (`host:port`), if the guest has graphics.
    pub vnc: Option<String>,
}

/// One child process of a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// The process's role, e.g. `dev-blk0` (at most [`MAX_ROLE_BYTES`]).
    pub role: String,
    pub pid: u32,
    pub rss_kib: u64,
    /// How often the supervisor has restarted it after a crash.
    pub restarts: u32,
}

/// Why a [`Request`] or [`Reply`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("stop timeout of {secs} s is over {MAX_STOP_TIMEOUT_SECS} s")]
    StopTimeout { secs: u32 },
    #[error("status lists {count} processes, over {MAX_PROCESSES}")]
    ProcessCount { count: usize },
    #[error("process role is {len} bytes, over {MAX_ROLE_BYTES}")]
    RoleLength { len: usize },
    #[error("VNC address is {len} bytes, over {MAX_VNC_BYTES}")]
    VncLength { len: usize },
    #[error("error message is {len} bytes, over {MAX_ERROR_MESSAGE_BYTES}")]
    MessageLength { len: usize },
    #[error("{field} holds a control character")]
    ControlCharacter { field: &'static str },
}

impl Request {
    /// Checks the request's fields against their bounds.
    pub fn validate(&self) -> Result<(), ControlError> {
        match *self {
            Request::Stop { timeout_secs } if timeout_secs > MAX_STOP_TIMEOUT_SECS => {
                Err(ControlError::StopTimeout { secs: timeout_secs })
            }
            _ => Ok(()),
        }
    }

    /// How many fds a [`Reply::Ok`] to this request carries.
    pub fn reply_fds(&self) -> usize {
        match self {
            Request::ConsoleAttach => 1,
            _ => 0,
        }
    }
}

impl Reply {
    /// An error reply clipped to [`MAX_ERROR_MESSAGE_BYTES`], control characters replaced by
    /// spaces so that it passes [`Reply::validate`].
    pub fn error(message: &str) -> Reply {
        let printable: String = message
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        Reply::Error {
            message: clip(&printable, MAX_ERROR_MESSAGE_BYTES),
        }
    }

    /// Checks every string and list against its bound; text must hold no control characters.
    pub fn validate(&self) -> Result<(), ControlError> {
        match self {
            Reply::Ok => Ok(()),
            Reply::Error { message } => {
                check_text("error message", message, MAX_ERROR_MESSAGE_BYTES, |len| {
                    ControlError::MessageLength { len }
                })
            }
            Reply::Status(status) => status.validate(),
        }
    }
}

impl VmStatus {
    fn validate(&self) -> Result<(), ControlError> {
        if self.processes.len() > MAX_PROCESSES {
            return Err(ControlError::ProcessCount {
                count: self.processes.len(),
            });
        }
        for process in &self.processes {
            check_text("process role", &process.role, MAX_ROLE_BYTES, |len| {
                ControlError::RoleLength { len }
            })?;
        }
        if let Some(vnc) = &self.vnc {
            check_text("VNC address", vnc, MAX_VNC_BYTES, |len| {
                ControlError::VncLength { len }
            })?;
        }
        Ok(())
    }
}

fn check_text(
    field: &'static str,
    text: &str,
    max: usize,
    too_long: impl FnOnce(usize) -> ControlError,
) -> Result<(), ControlError> {
    if text.len() > max {
        return Err(too_long(text.len()));
    }
    if text.chars().any(char::is_control) {
        return Err(ControlError::ControlCharacter { field });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    use proptest::prelude::*;

    use super::*;
    use crate::channel::{Channel, ChannelKind, decode_packet, encode_packet};

    fn status() -> VmStatus {
        VmStatus {
            pid: 1000,
            uptime_secs: 86_400,
            processes: vec![
                ProcessInfo {
                    role: "vcpu-runner".to_owned(),
                    pid: 1001,
                    rss_kib: 2_097_152,
                    restarts: 0,
                },
                ProcessInfo {
                    role: "dev-blk0".to_owned(),
                    pid: 1002,
                    rss_kib: 4096,
                    restarts: 2,
                },
            ],
            vnc: Some("127.0.0.1:5900".to_owned()),
        }
    }

    #[test]
    fn every_request_round_trips_after_a_handshake() {
        let (cli, supervisor) = Channel::pair().unwrap();
        std::thread::scope(|scope| {
            let peer = scope.spawn(|| supervisor.handshake(ChannelKind::Control));
            cli.handshake(ChannelKind::Control).unwrap();
            peer.join().unwrap().unwrap();
        });
        let requests = [
            Request::Status,
            Request::Stop { timeout_secs: 30 },
            Request::Poweroff,
            Request::Reset,
            Request::Restart,
            Request::ConsoleAttach,
        ];

        for request in &requests {
            cli.send(request, &[]).unwrap();
        }
        let got: Vec<Request> = requests
            .iter()
            .map(|_| supervisor.recv().unwrap().expect_fds(0).unwrap().0)
            .collect();

        assert_eq!(got, requests);
    }

    #[test]
    fn every_reply_round_trips() {
        let (cli, supervisor) = Channel::pair().unwrap();
        let replies = [
            Reply::Status(status()),
            Reply::Ok,
            Reply::error("guest is not running"),
        ];

        for reply in &replies {
            supervisor.send(reply, &[]).unwrap();
        }
        let got: Vec<Reply> = replies
            .iter()
            .map(|_| cli.recv().unwrap().expect_fds(0).unwrap().0)
            .collect();

        assert_eq!(got, replies);
        assert!(got.iter().all(|reply| reply.validate().is_ok()));
    }

    #[test]
    fn console_attach_reply_carries_a_working_console_fd() {
        let (cli, supervisor) = Channel::pair().unwrap();
        let (mut console_out, console_in) = std::io::pipe().unwrap();

        supervisor.send(&Reply::Ok, &[console_in.as_fd()]).unwrap();
        drop(console_in);
        let (reply, fds) = cli
            .recv::<Reply>()
            .unwrap()
            .expect_fds(Request::ConsoleAttach.reply_fds())
            .unwrap();
        let mut console = File::from(fds.into_iter().next().unwrap());
        console.write_all(b"root\n").unwrap();
        drop(console);

        let mut typed = String::new();
        console_out.read_to_string(&mut typed).unwrap();
        assert_eq!((reply, typed.as_str()), (Reply::Ok, "root\n"));
    }

    #[test]
    fn stop_timeout_over_the_bound_is_refused() {
        let ok = Request::Stop {
            timeout_secs: MAX_STOP_TIMEOUT_SECS,
        }
        .validate();
        let err = Request::Stop {
            timeout_secs: MAX_STOP_TIMEOUT_SECS + 1,
        }
        .validate();

        assert_eq!(ok, Ok(()));
        assert_eq!(err, Err(ControlError::StopTimeout { secs: 3601 }));
    }

    #[test]
    fn status_with_too_many_processes_is_refused() {
        let mut status = status();
        status.processes = vec![status.processes[0].clone(); MAX_PROCESSES + 1];

        assert_eq!(
            Reply::Status(status).validate(),
            Err(ControlError::ProcessCount { count: 257 })
        );
    }

    #[test]
    fn overlong_role_or_vnc_is_refused() {
        let mut long_role = status();
        long_role.processes[1].role = "r".repeat(MAX_ROLE_BYTES + 1);
        let mut long_vnc = status();
        long_vnc.vnc = Some("v".repeat(MAX_VNC_BYTES + 1));

        assert_eq!(
            Reply::Status(long_role).validate(),
            Err(ControlError::RoleLength { len: 33 })
        );
        assert_eq!(
            Reply::Status(long_vnc).validate(),
            Err(ControlError::VncLength { len: 65 })
        );
    }

    #[test]
    fn error_text_with_terminal_escapes_is_refused() {
        let reply = Reply::Error {
            message: "\u{1b}]0;pwned\u{7}".to_owned(),
        };

        assert_eq!(
            reply.validate(),
            Err(ControlError::ControlCharacter {
                field: "error message"
            })
        );
    }

    #[test]
    fn error_constructor_clips_and_blanks_control_characters() {
        let reply = Reply::error(&format!("bad\n{}", "x".repeat(2000)));

        let Reply::Error { message } = &reply else {
            panic!("not Error: {reply:?}");
        };
        assert!(message.starts_with("bad x"));
        assert_eq!(message.len(), MAX_ERROR_MESSAGE_BYTES);
        assert_eq!(reply.validate(), Ok(()));
    }

    fn any_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            Just(Request::Status),
            any::<u32>().prop_map(|timeout_secs| Request::Stop { timeout_secs }),
            Just(Request::Poweroff),
            Just(Request::Reset),
            Just(Request::Restart),
            Just(Request::ConsoleAttach),
        ]
    }

    fn any_reply() -> impl Strategy<Value = Reply> {
        let process = (".{0,40}", any::<u32>(), any::<u64>(), any::<u32>()).prop_map(
            |(role, pid, rss_kib, restarts)| ProcessInfo {
                role,
                pid,
                rss_kib,
                restarts,
            },
        );
        let status = (
            any::<u32>(),
            any::<u64>(),
            prop::collection::vec(process, 0..=40),
            prop::option::of(".{0,80}"),
        )
            .prop_map(|(pid, uptime_secs, processes, vnc)| VmStatus {
                pid,
                uptime_secs,
                processes,
                vnc,
            });
        prop_oneof![
            status.prop_map(Reply::Status),
            Just(Reply::Ok),
            ".{0,2000}".prop_map(|message| Reply::Error { message }),
        ]
    }

    proptest! {
        #[test]
        fn any_request_round_trips(request in any_request()) {
            let packet = encode_packet(&request, 0).unwrap();
            let back: Request = decode_packet(&packet, 0).unwrap();
            prop_assert_eq!(back, request);
        }

        #[test]
        fn any_reply_round_trips_through_a_channel(reply in any_reply()) {
            let (a, b) = Channel::pair().unwrap();
            a.send(&reply, &[]).unwrap();
            let (back, _) = b.recv::<Reply>().unwrap().expect_fds(0).unwrap();
            prop_assert_eq!(back, reply);
        }

        #[test]
        fn error_constructor_always_validates(text in ".{0,3000}") {
            prop_assert_eq!(Reply::error(&text).validate(), Ok(()));
        }
    }
}
