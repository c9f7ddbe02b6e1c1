//! The version handshake every channel starts with.
//!
//! Both ends send a [`Hello`] and then read the peer's. The hello's fields are plain integers,
//! so a peer of another version still decodes and is reported as
//! [`ChannelError::WrongVersion`] rather than as a decode error.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Channel, ChannelError, Received};

/// The protocol version this build speaks; any change to any message bumps it.
pub const PROTOCOL_VERSION: u32 = 1;

/// Magic number opening every hello: `b"cpvh"` read as a little-endian `u32`.
pub const HELLO_MAGIC: u32 = u32::from_le_bytes(*b"cpvh");

/// Which protocol a channel carries; both ends must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChannelKind {
    /// Supervisor → child on the child's fd 3: [`crate::bootstrap`].
    Bootstrap,
    /// `vm` CLI ↔ per-VM supervisor: [`crate::control`].
    Control,
    /// vcpu-runner ↔ one device process.
    RunnerDevice,
    /// Supervisor ↔ netcfg.
    Netcfg,
}

impl ChannelKind {
    /// The code sent in a [`Hello`]; stable across versions.
    pub fn code(self) -> u32 {
        match self {
            ChannelKind::Bootstrap => 1,
            ChannelKind::Control => 2,
            ChannelKind::RunnerDevice => 3,
            ChannelKind::Netcfg => 4,
        }
    }

    /// The kind a wire code names, if any.
    pub fn from_code(code: u32) -> Option<ChannelKind> {
        match code {
            1 => Some(ChannelKind::Bootstrap),
            2 => Some(ChannelKind::Control),
            3 => Some(ChannelKind::RunnerDevice),
            4 => Some(ChannelKind::Netcfg),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ChannelKind::Bootstrap => "bootstrap",
            ChannelKind::Control => "control",
            ChannelKind::RunnerDevice => "runner-device",
            ChannelKind::Netcfg => "netcfg",
        }
    }
}

impl fmt::Display for ChannelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The first message on every channel, in each direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: u32,
    pub version: u32,
    /// [`ChannelKind::code`] of the sender's idea of the channel.
    pub kind: u32,
}

impl Hello {
    /// This build's hello for a channel of `kind`.
    pub fn new(kind: ChannelKind) -> Hello {
        Hello {
            magic: HELLO_MAGIC,
            version: PROTOCOL_VERSION,
            kind: kind.code(),
        }
    }

    /// Checks a peer's hello against this side's `kind`: magic, then version, then kind.
    pub fn check(&self, ours: ChannelKind) -> Result<(), ChannelError> {
        if self.magic != HELLO_MAGIC {
            return Err(ChannelError::BadMagic { found: self.magic });
        }
        if self.version != PROTOCOL_VERSION {
            return Err(ChannelError::WrongVersion {
                ours: PROTOCOL_VERSION,
                theirs: self.version,
            });
        }
        if self.kind != ours.code() {
            return Err(ChannelError::WrongKind {
                ours,
                theirs: self.kind,
            });
        }
        Ok(())
    }
}

impl Channel {
    /// Sends this side's hello, then reads and checks the peer's. Both ends call it before any
    /// other message; on error the channel should be dropped. Blocks until the peer's hello
    /// arrives: see [`Channel::handshake_timeout`] for a peer that may hang.
    pub fn handshake(&self, kind: ChannelKind) -> Result<(), ChannelError> {
        self.send(&Hello::new(kind), &[])?;
        check_hello(self.recv(), kind)
    }

    /// [`Channel::handshake`], waiting at most `timeout` for the peer's hello.
    pub fn handshake_timeout(
        &self,
        kind: ChannelKind,
        timeout: Duration,
    ) -> Result<(), ChannelError> {
        self.send(&Hello::new(kind), &[])?;
        check_hello(self.recv_timeout(timeout), kind)
    }
}

fn check_hello(
    received: Result<Received<Hello>, ChannelError>,
    ours: ChannelKind,
) -> Result<(), ChannelError> {
    let (hello, _) = received?.expect_fds(0)?;
    hello.check(ours)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::time::Duration;

    use rustix::net::SendFlags;

    use super::*;
    use crate::channel::encode_packet;

    /// Sends `bytes` as one raw packet on `peer`, bypassing `Channel::send`.
    fn send_raw(peer: &Channel, bytes: &[u8]) {
        let sent = rustix::net::send(peer, bytes, SendFlags::empty()).unwrap();
        assert_eq!(sent, bytes.len());
    }

    #[test]
    fn matching_ends_complete_the_handshake_and_then_exchange_messages() {
        let (a, b) = Channel::pair().unwrap();

        let (ours, theirs) = std::thread::scope(|scope| {
            let peer = scope.spawn(|| b.handshake(ChannelKind::RunnerDevice));
            (a.handshake(ChannelKind::RunnerDevice), peer.join().unwrap())
        });
        a.send(&"after hello", &[]).unwrap();

        assert!(ours.is_ok() && theirs.is_ok(), "{ours:?} {theirs:?}");
        assert_eq!(b.recv::<String>().unwrap().msg, "after hello");
    }

    #[test]
    fn peer_of_another_version_is_wrong_version() {
        let (ours, peer) = Channel::pair().unwrap();
        let hello = Hello {
            version: PROTOCOL_VERSION + 1,
            ..Hello::new(ChannelKind::Control)
        };
        send_raw(&peer, &encode_packet(&hello, 0).unwrap());

        let err = ours.handshake(ChannelKind::Control).unwrap_err();

        assert!(
            matches!(err, ChannelError::WrongVersion { ours: 1, theirs: 2 }),
            "{err:?}"
        );
    }

    #[test]
    fn peer_of_another_kind_is_wrong_kind() {
        let (ours, peer) = Channel::pair().unwrap();
        send_raw(
            &peer,
            &encode_packet(&Hello::new(ChannelKind::Netcfg), 0).unwrap(),
        );

        let err = ours.handshake(ChannelKind::Control).unwrap_err();

        assert!(
            matches!(
                err,
                ChannelError::WrongKind {
                    ours: ChannelKind::Control,
                    theirs: 4
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn hello_with_wrong_magic_is_bad_magic() {
        let (ours, peer) = Channel::pair().unwrap();
        let hello = Hello {
            magic: 0x1234_5678,
            ..Hello::new(ChannelKind::Bootstrap)
        };
        send_raw(&peer, &encode_packet(&hello, 0).unwrap());

        let err = ours.handshake(ChannelKind::Bootstrap).unwrap_err();

        assert!(
            matches!(err, ChannelError::BadMagic { found: 0x1234_5678 }),
            "{err:?}"
        );
    }

    #[test]
    fn hello_carrying_fds_is_refused() {
        let (ours, peer) = Channel::pair().unwrap();
        let (_reader, writer) = std::io::pipe().unwrap();
        peer.send(&Hello::new(ChannelKind::Bootstrap), &[writer.as_fd()])
            .unwrap();

        let err = ours.handshake(ChannelKind::Bootstrap).unwrap_err();

        assert!(
            matches!(
                err,
                ChannelError::FdCountMismatch {
                    expected: 0,
                    got: 1
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn silent_peer_times_out() {
        let (ours, _peer) = Channel::pair().unwrap();

        let err = ours
            .handshake_timeout(ChannelKind::Control, Duration::from_millis(50))
            .unwrap_err();

        assert!(matches!(err, ChannelError::Timeout), "{err:?}");
    }

    #[test]
    fn peer_gone_before_hello_is_closed() {
        let (ours, peer) = Channel::pair().unwrap();
        drop(peer);

        let err = ours.handshake(ChannelKind::Control).unwrap_err();

        assert!(matches!(err, ChannelError::Closed), "{err:?}");
    }

    #[test]
    fn kind_codes_map_back_to_their_kinds() {
        for kind in [
            ChannelKind::Bootstrap,
            ChannelKind::Control,
            ChannelKind::RunnerDevice,
            ChannelKind::Netcfg,
        ] {
            assert_eq!(ChannelKind::from_code(kind.code()), Some(kind));
        }
        assert_eq!(ChannelKind::from_code(0), None);
    }
}
