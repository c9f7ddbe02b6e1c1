//! The transport: typed messages over a `SOCK_SEQPACKET` unix socket, fds as `SCM_RIGHTS`.
//!
//! One `sendmsg` carries one packet (see the crate docs for its layout) and its fds; one
//! `recvmsg` returns exactly one packet, so a malformed packet is reported and skipped and the
//! next one is read intact. Every fd that arrives is wrapped in an [`OwnedFd`] before anything
//! else is checked, so an error drops (closes) them instead of leaking them.

mod error;
mod handshake;
mod packet;

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use error::ChannelError;
pub use handshake::{ChannelKind, HELLO_MAGIC, Hello, PROTOCOL_VERSION};
pub use packet::{HEADER_LEN, PACKET_MAGIC, decode_packet, encode_packet};

/// Upper bound on the encoded payload of one message, header excluded.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Upper bound on the fds attached to one message.
pub const MAX_FDS: usize = 32;

/// Bytes of ancillary space for [`MAX_FDS`] descriptors (alignment slack included).
const CONTROL_SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_FDS));

/// One end of a connected `SOCK_SEQPACKET` unix socket carrying capvm packets.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

/// A received message and the fds that came with it, in the order the sender attached them.
#[derive(Debug)]
pub struct Received<T> {
    pub msg: T,
    pub fds: Vec<OwnedFd>,
}

impl<T> Received<T> {
    /// Returns the message and its fds if exactly `n` fds came with it; otherwise the fds are
    /// closed and the count is reported.
    pub fn expect_fds(self, n: usize) -> Result<(T, Vec<OwnedFd>), ChannelError> {
        if self.fds.len() == n {
            Ok((self.msg, self.fds))
        } else {
            Err(ChannelError::FdCountMismatch {
                expected: n,
                got: self.fds.len(),
            })
        }
    }
}

impl Channel {
    /// A connected pair: `socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC)`.
    pub fn pair() -> Result<(Channel, Channel), ChannelError> {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| ChannelError::Socketpair(e.into()))?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Wraps an fd that is already a connected `SOCK_SEQPACKET` unix socket, such as the
    /// bootstrap socket a child finds at fd 3.
    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel { fd }
    }

    /// Sends `msg` with `fds` attached (at most [`MAX_FDS`]). The fds stay open here; the peer
    /// receives duplicates.
    pub fn send<T: Serialize>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        let packet = encode_packet(msg, fds.len())?;
        let iov = [IoSlice::new(&packet)];
        let mut space = [MaybeUninit::<u8>::uninit(); CONTROL_SPACE];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(ChannelError::TooManyFds);
        }
        loop {
            // NOSIGNAL: a vanished peer is an EPIPE error here, not a SIGPIPE for the process.
            match rustix::net::sendmsg(&self.fd, &iov, &mut control, SendFlags::NOSIGNAL) {
                Ok(sent) if sent == packet.len() => return Ok(()),
                Ok(sent) => {
                    return Err(ChannelError::ShortSend {
                        sent,
                        len: packet.len(),
                    });
                }
                Err(Errno::INTR) => {}
                Err(Errno::PIPE | Errno::CONNRESET | Errno::NOTCONN) => {
                    return Err(ChannelError::Closed);
                }
                Err(Errno::AGAIN) => return Err(ChannelError::WouldBlock),
                Err(Errno::MSGSIZE) => return Err(ChannelError::TooLarge),
                Err(e) => return Err(ChannelError::Send(e.into())),
            }
        }
    }

    /// Receives the next message, blocking until one arrives (or failing with
    /// [`ChannelError::WouldBlock`] on a non-blocking channel).
    pub fn recv<T: DeserializeOwned>(&self) -> Result<Received<T>, ChannelError> {
        self.recv_packet(RecvFlags::empty())
    }

    /// Receives the next message, waiting at most `timeout` for it to arrive.
    pub fn recv_timeout<T: DeserializeOwned>(
        &self,
        timeout: Duration,
    ) -> Result<Received<T>, ChannelError> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            // A deadline too far away to represent is no deadline.
            let wait = deadline
                .and_then(|d| Timespec::try_from(d.saturating_duration_since(Instant::now())).ok());
            let mut pollfds = [PollFd::new(&self.fd, PollFlags::IN)];
            match rustix::event::poll(&mut pollfds, wait.as_ref()) {
                Ok(0) => return Err(ChannelError::Timeout),
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(e) => return Err(ChannelError::Poll(e.into())),
            }
            // DONTWAIT: if another reader took the packet, poll again rather than block.
            match self.recv_packet(RecvFlags::DONTWAIT) {
                Err(ChannelError::WouldBlock) => {}
                other => return other,
            }
        }
    }

    /// Switches `O_NONBLOCK` on or off (for use with an event loop).
    pub fn set_nonblocking(&self, on: bool) -> Result<(), ChannelError> {
        rustix::io::ioctl_fionbio(&self.fd, on).map_err(|e| ChannelError::SetNonblocking(e.into()))
    }

    fn recv_packet<T: DeserializeOwned>(
        &self,
        flags: RecvFlags,
    ) -> Result<Received<T>, ChannelError> {
        let mut buf = vec![0u8; HEADER_LEN + MAX_MESSAGE_BYTES];
        let mut space = [MaybeUninit::<u8>::uninit(); CONTROL_SPACE];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match rustix::net::recvmsg(
                &self.fd,
                &mut iov,
                &mut control,
                flags | RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(received) => break received,
                Err(Errno::INTR) => {}
                Err(Errno::CONNRESET) => return Err(ChannelError::Closed),
                Err(Errno::AGAIN) => return Err(ChannelError::WouldBlock),
                Err(e) => return Err(ChannelError::Recv(e.into())),
            }
        };
        // Own every fd first: from here on, any early return closes them.
        let fds = take_fds(&mut control);

        if received.flags.contains(ReturnFlags::CTRUNC) || fds.len() > MAX_FDS {
            return Err(ChannelError::TooManyFds);
        }
        if received.flags.contains(ReturnFlags::TRUNC) {
            return Err(ChannelError::TooLarge);
        }
        if received.bytes == 0 && fds.is_empty() {
            // End of stream. A zero-length packet looks the same; treating it as a hang-up is
            // the conservative reading.
            return Err(ChannelError::Closed);
        }
        let bytes = buf.get(..received.bytes).ok_or(ChannelError::TooLarge)?;
        let msg = decode_packet(bytes, fds.len())?;
        Ok(Received { msg, fds })
    }
}

/// Moves every descriptor out of the ancillary buffer into owned fds; any other control
/// message is discarded.
fn take_fds(control: &mut RecvAncillaryBuffer<'_>) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    fds
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<Channel> for OwnedFd {
    fn from(channel: Channel) -> OwnedFd {
        channel.fd
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{ErrorKind, PipeReader, Read, Write};

    use proptest::prelude::*;

    use super::*;

    /// Sends `bytes` as one raw packet on `peer` with `fds` attached, bypassing
    /// `Channel::send` and its checks.
    fn send_raw(peer: &Channel, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(64))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        }
        let sent = rustix::net::sendmsg(
            peer,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::empty(),
        )
        .unwrap();
        assert_eq!(sent, bytes.len());
    }

    fn header(len: usize, fds: usize) -> Vec<u8> {
        let mut h = PACKET_MAGIC.to_le_bytes().to_vec();
        h.extend_from_slice(&u32::try_from(len).unwrap().to_le_bytes());
        h.extend_from_slice(&u32::try_from(fds).unwrap().to_le_bytes());
        h
    }

    /// Whether every write end of the pipe is closed: a non-blocking read then sees EOF
    /// instead of "would block".
    fn all_writers_closed(reader: &mut PipeReader) -> bool {
        rustix::io::ioctl_fionbio(&*reader, true).unwrap();
        let mut byte = [0u8; 1];
        match reader.read(&mut byte) {
            Ok(0) => true,
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            other => panic!("unexpected pipe read result {other:?}"),
        }
    }

    /// The channel still carries a good message after an error.
    fn assert_still_usable(sender: &Channel, receiver: &Channel) {
        sender.send(&(42u32, "next".to_owned()), &[]).unwrap();
        let received = receiver.recv::<(u32, String)>().unwrap();
        assert_eq!(received.msg, (42, "next".to_owned()));
    }

    #[test]
    fn message_with_fd_arrives_and_fd_is_the_same_pipe() {
        let (a, b) = Channel::pair().unwrap();
        let (mut reader, writer) = std::io::pipe().unwrap();

        a.send(&vec![1u16, 2, 3], &[writer.as_fd()]).unwrap();
        drop(writer);
        let (msg, fds) = b.recv::<Vec<u16>>().unwrap().expect_fds(1).unwrap();
        let mut file = File::from(fds.into_iter().next().unwrap());
        file.write_all(b"through the fd").unwrap();
        drop(file);

        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        assert_eq!(msg, vec![1, 2, 3]);
        assert_eq!(text, "through the fd");
    }

    #[test]
    fn exactly_max_fds_are_accepted() {
        let (a, b) = Channel::pair().unwrap();
        let (_reader, writer) = std::io::pipe().unwrap();
        let fds = vec![writer.as_fd(); MAX_FDS];

        a.send(&(), &fds).unwrap();
        let received = b.recv::<()>().unwrap();

        assert_eq!(received.fds.len(), MAX_FDS);
    }

    #[test]
    fn received_fds_are_close_on_exec() {
        let (a, b) = Channel::pair().unwrap();
        let (_reader, writer) = std::io::pipe().unwrap();

        a.send(&(), &[writer.as_fd()]).unwrap();
        let ((), fds) = b.recv::<()>().unwrap().expect_fds(1).unwrap();
        let flags = rustix::io::fcntl_getfd(&fds[0]).unwrap();

        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    }

    #[test]
    fn recv_after_peer_dropped_is_closed() {
        let (a, b) = Channel::pair().unwrap();
        drop(a);

        let err = b.recv::<u32>().unwrap_err();

        assert!(matches!(err, ChannelError::Closed), "{err:?}");
    }

    #[test]
    fn queued_message_is_still_read_before_closed() {
        let (a, b) = Channel::pair().unwrap();
        a.send(&7u8, &[]).unwrap();
        drop(a);

        let first = b.recv::<u8>().unwrap().msg;
        let second = b.recv::<u8>().unwrap_err();

        assert_eq!(first, 7);
        assert!(matches!(second, ChannelError::Closed), "{second:?}");
    }

    #[test]
    fn send_after_peer_dropped_is_closed() {
        let (a, b) = Channel::pair().unwrap();
        drop(b);

        let err = a.send(&1u8, &[]).unwrap_err();

        assert!(matches!(err, ChannelError::Closed), "{err:?}");
    }

    #[test]
    fn packet_shorter_than_header_is_truncated_and_channel_recovers() {
        let (a, b) = Channel::pair().unwrap();
        send_raw(&a, b"cpvm\x01", &[]);

        let err = b.recv::<u32>().unwrap_err();

        assert!(matches!(err, ChannelError::Truncated { len: 5 }), "{err:?}");
        assert_still_usable(&a, &b);
    }

    #[test]
    fn empty_packet_with_fd_is_truncated_and_fd_closed() {
        let (a, b) = Channel::pair().unwrap();
        let (mut reader, writer) = std::io::pipe().unwrap();
        send_raw(&a, b"", &[writer.as_fd()]);
        drop(writer);

        let err = b.recv::<u32>().unwrap_err();

        assert!(matches!(err, ChannelError::Truncated { len: 0 }), "{err:?}");
        assert!(all_writers_closed(&mut reader));
        assert_still_usable(&a, &b);
    }

    #[test]
    fn oversized_packet_is_too_large_and_its_fd_closed() {
        let (a, b) = Channel::pair().unwrap();
        let (mut reader, writer) = std::io::pipe().unwrap();
        let mut packet = header(MAX_MESSAGE_BYTES + 1, 1);
        packet.resize(HEADER_LEN + MAX_MESSAGE_BYTES + 1, 0);
        send_raw(&a, &packet, &[writer.as_fd()]);
        drop(writer);

        let err = b.recv::<Vec<u8>>().unwrap_err();

        assert!(matches!(err, ChannelError::TooLarge), "{err:?}");
        assert!(all_writers_closed(&mut reader));
        assert_still_usable(&a, &b);
    }

    #[test]
    fn garbage_payload_is_decode_error_and_channel_recovers() {
        let (a, b) = Channel::pair().unwrap();
        // Option<u8> tag 7 is neither None (0) nor Some (1).
        let mut packet = header(2, 0);
        packet.extend_from_slice(&[7, 7]);
        send_raw(&a, &packet, &[]);

        let err = b.recv::<Option<u8>>().unwrap_err();

        assert!(matches!(err, ChannelError::Decode(_)), "{err:?}");
        assert_still_usable(&a, &b);
    }

    #[test]
    fn trailing_bytes_are_refused_and_channel_recovers() {
        let (a, b) = Channel::pair().unwrap();
        let mut packet = encode_packet(&5u8, 0).unwrap();
        packet.push(0);
        let declared = u32::try_from(packet.len() - HEADER_LEN).unwrap();
        packet.splice(4..8, declared.to_le_bytes());
        send_raw(&a, &packet, &[]);

        let err = b.recv::<u8>().unwrap_err();

        assert!(
            matches!(err, ChannelError::TrailingBytes { extra: 1 }),
            "{err:?}"
        );
        assert_still_usable(&a, &b);
    }

    #[test]
    fn more_than_max_fds_is_too_many_fds_and_all_are_closed() {
        let (a, b) = Channel::pair().unwrap();
        let (mut reader, writer) = std::io::pipe().unwrap();
        let fds = vec![writer.as_fd(); MAX_FDS + 1];
        send_raw(&a, &encode_packet(&(), MAX_FDS).unwrap(), &fds);
        drop(fds);
        drop(writer);

        let err = b.recv::<()>().unwrap_err();

        assert!(matches!(err, ChannelError::TooManyFds), "{err:?}");
        assert!(all_writers_closed(&mut reader));
        assert_still_usable(&a, &b);
    }

    #[test]
    fn fd_count_disagreeing_with_header_is_refused_and_fd_closed() {
        let (a, b) = Channel::pair().unwrap();
        let (mut reader, writer) = std::io::pipe().unwrap();
        send_raw(&a, &encode_packet(&1u8, 0).unwrap(), &[writer.as_fd()]);
        drop(writer);

        let err = b.recv::<u8>().unwrap_err();

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
        assert!(all_writers_closed(&mut reader));
        assert_still_usable(&a, &b);
    }

    #[test]
    fn sending_more_than_max_fds_is_refused_before_sending() {
        let (a, b) = Channel::pair().unwrap();
        let (_reader, writer) = std::io::pipe().unwrap();
        let fds = vec![writer.as_fd(); MAX_FDS + 1];

        let err = a.send(&(), &fds).unwrap_err();
        let nothing = b.recv_timeout::<()>(Duration::ZERO).unwrap_err();

        assert!(matches!(err, ChannelError::TooManyFds), "{err:?}");
        assert!(matches!(nothing, ChannelError::Timeout), "{nothing:?}");
    }

    #[test]
    fn expect_fds_with_wrong_count_is_mismatch_and_closes_them() {
        let (a, b) = Channel::pair().unwrap();
        let (mut reader, writer) = std::io::pipe().unwrap();
        a.send(&(), &[writer.as_fd(), writer.as_fd()]).unwrap();
        drop(writer);

        let err = b.recv::<()>().unwrap().expect_fds(1).unwrap_err();

        assert!(
            matches!(
                err,
                ChannelError::FdCountMismatch {
                    expected: 1,
                    got: 2
                }
            ),
            "{err:?}"
        );
        assert!(all_writers_closed(&mut reader));
    }

    #[test]
    fn recv_timeout_without_message_times_out_after_the_timeout() {
        let (_a, b) = Channel::pair().unwrap();
        let start = Instant::now();

        let err = b
            .recv_timeout::<u8>(Duration::from_millis(100))
            .unwrap_err();

        assert!(matches!(err, ChannelError::Timeout), "{err:?}");
        assert!(start.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn recv_timeout_returns_a_message_sent_while_waiting() {
        let (a, b) = Channel::pair().unwrap();

        let got = std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                a.send(&9u64, &[]).unwrap();
            });
            b.recv_timeout::<u64>(Duration::from_secs(10))
        });

        assert_eq!(got.unwrap().msg, 9);
    }

    #[test]
    fn recv_timeout_after_peer_dropped_is_closed() {
        let (a, b) = Channel::pair().unwrap();
        drop(a);

        let err = b.recv_timeout::<u8>(Duration::from_secs(10)).unwrap_err();

        assert!(matches!(err, ChannelError::Closed), "{err:?}");
    }

    #[test]
    fn nonblocking_recv_without_message_would_block() {
        let (a, b) = Channel::pair().unwrap();
        b.set_nonblocking(true).unwrap();

        let err = b.recv::<u8>().unwrap_err();
        a.send(&3u8, &[]).unwrap();
        let got = b.recv::<u8>().unwrap().msg;

        assert!(matches!(err, ChannelError::WouldBlock), "{err:?}");
        assert_eq!(got, 3);
    }

    #[test]
    fn channel_converts_into_its_fd() {
        let (a, b) = Channel::pair().unwrap();
        let raw = a.as_raw_fd();

        let fd = OwnedFd::from(a);
        let again = Channel::from_fd(fd);
        again.send(&1u8, &[]).unwrap();

        assert_eq!(again.as_raw_fd(), raw);
        assert_eq!(b.recv::<u8>().unwrap().msg, 1);
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    enum Sample {
        Unit,
        Text(String),
        List(Vec<u32>),
    }

    proptest! {
        #[test]
        fn arbitrary_packets_never_panic_and_never_leave_the_channel_stuck(
            bytes in prop::collection::vec(any::<u8>(), 0..256),
            with_header in any::<bool>(),
        ) {
            let (a, b) = Channel::pair().unwrap();
            let packet = if with_header {
                let mut p = header(bytes.len(), 0);
                p.extend_from_slice(&bytes);
                p
            } else {
                bytes
            };
            send_raw(&a, &packet, &[]);
            a.send(&Sample::Text("good".to_owned()), &[]).unwrap();

            let first = b.recv::<Sample>();
            if let Ok(received) = &first {
                // Whatever decodes is a well-formed value: it survives its own round trip.
                let again = encode_packet(&received.msg, 0).unwrap();
                prop_assert_eq!(&decode_packet::<Sample>(&again, 0).unwrap(), &received.msg);
            }
            let second = b.recv::<Sample>().unwrap();
            prop_assert_eq!(second.msg, Sample::Text("good".to_owned()));
        }
    }
}
