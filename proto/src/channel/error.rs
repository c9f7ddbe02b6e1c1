//! What can go wrong on a channel.

use std::io;

use super::handshake::ChannelKind;
use super::{HEADER_LEN, MAX_FDS, MAX_MESSAGE_BYTES};

/// A failed send, receive or handshake.
///
/// Every variant except [`ChannelError::Closed`] and the handshake ones leaves the channel
/// usable: the offending packet has been consumed and its fds closed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The peer went away (end of stream, `EPIPE`, `ECONNRESET`).
    #[error("peer closed the channel")]
    Closed,
    /// The packet was shorter than the fixed header.
    #[error("packet of {len} bytes is shorter than the {HEADER_LEN}-byte header")]
    Truncated { len: usize },
    /// The payload is over [`MAX_MESSAGE_BYTES`] (declared, encoded or received).
    #[error("payload exceeds {MAX_MESSAGE_BYTES} bytes")]
    TooLarge,
    /// The header's payload length disagrees with the bytes that arrived.
    #[error("header declares {declared} payload bytes but {actual} arrived")]
    LengthMismatch { declared: usize, actual: usize },
    /// The payload is not a valid encoding of the expected message.
    #[error("decoding the payload failed")]
    Decode(#[source] bincode::error::DecodeError),
    /// The message could not be encoded.
    #[error("encoding the message failed")]
    Encode(#[source] bincode::error::EncodeError),
    /// The payload holds a complete message followed by more bytes.
    #[error("{extra} bytes follow the message")]
    TrailingBytes { extra: usize },
    /// More than [`MAX_FDS`] fds were attached (all received ones are closed).
    #[error("more than {MAX_FDS} file descriptors in one packet")]
    TooManyFds,
    /// The number of fds differs from what the header or the receiver expects.
    #[error("expected {expected} file descriptors, got {got}")]
    FdCountMismatch { expected: usize, got: usize },
    /// The peer's handshake names another protocol version.
    #[error("peer speaks protocol version {theirs}, this side speaks {ours}")]
    WrongVersion { ours: u32, theirs: u32 },
    /// The peer's handshake names another channel kind (its raw wire code).
    #[error("peer expects channel kind {theirs}, this is a {ours} channel")]
    WrongKind { ours: ChannelKind, theirs: u32 },
    /// A packet header or handshake did not start with the expected magic number.
    #[error("bad magic {found:#010x}")]
    BadMagic { found: u32 },
    /// No message arrived within the timeout.
    #[error("no message before the timeout")]
    Timeout,
    /// The channel is non-blocking and nothing can be sent or received right now.
    #[error("channel not ready")]
    WouldBlock,
    /// The kernel accepted only part of a packet (cannot happen on `SOCK_SEQPACKET`).
    #[error("sent {sent} of {len} bytes")]
    ShortSend { sent: usize, len: usize },
    #[error("socketpair failed")]
    Socketpair(#[source] io::Error),
    #[error("sendmsg failed")]
    Send(#[source] io::Error),
    #[error("recvmsg failed")]
    Recv(#[source] io::Error),
    #[error("poll failed")]
    Poll(#[source] io::Error),
    #[error("setting O_NONBLOCK failed")]
    SetNonblocking(#[source] io::Error),
}
