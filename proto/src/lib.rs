//! Every message that crosses a capvm process boundary, and the transport that carries them.
//!
//! - [`channel`]: [`Channel`], a `SOCK_SEQPACKET` unix socket carrying typed messages with fds
//!   attached as `SCM_RIGHTS`, and the version handshake.
//! - [`bootstrap`]: supervisor → child on the child's fd 3, and the child's reply.
//! - [`control`]: the `vm` CLI ↔ a per-VM supervisor.
//! - [`runner`]: the per-VM supervisor ↔ `vcpu-runner` (machine config, guest exits).
//! - [`device`]: `vcpu-runner` ↔ a virtio device process (info, activate, reset, config).
//! - [`netcfg`]: the supervisor or CLI ↔ `netcfg` (bridges, taps, host addresses).
//!
//! Types and transport only, no business logic. The crate trusts nothing it receives: every
//! packet is checked before decoding, decoding is bounded, and each message type has a
//! `validate` for the per-field bounds a receiver relies on. It touches only the sockets and
//! fds its caller hands it, and uses no `unsafe`.
//!
//! # Wire format
//!
//! Each message is one `SOCK_SEQPACKET` packet, so the kernel keeps message boundaries and a
//! bad packet never desynchronises the next one:
//!
//! | bytes | field | value |
//! |---|---|---|
//! | 0..4 | magic | [`PACKET_MAGIC`](channel::PACKET_MAGIC), `b"cpvm"` |
//! | 4..8 | payload length | `u32` LE, at most [`MAX_MESSAGE_BYTES`], equal to the bytes that follow |
//! | 8..12 | fd count | `u32` LE, at most [`MAX_FDS`], equal to the `SCM_RIGHTS` fds attached |
//! | 12.. | payload | the message, serde-encoded by bincode 2 (`config::standard()`: varint integers, little endian) with nothing after it |
//!
//! The receiver reads with a buffer one payload limit long and an ancillary buffer for
//! [`MAX_FDS`] fds (`MSG_CMSG_CLOEXEC`), takes ownership of every fd that arrived, then checks
//! `MSG_TRUNC`/`MSG_CTRUNC`, the header and the payload in that order
//! ([`channel::decode_packet`]). Any failure closes the packet's fds. A read of zero bytes
//! without fds is the peer's hang-up ([`ChannelError::Closed`]).
//!
//! Each channel opens with a [`Hello`](channel::Hello) in both directions: a magic number,
//! [`PROTOCOL_VERSION`] and the [`ChannelKind`] code, all plain `u32`s so that a peer of any
//! version is told apart from garbage and reported as [`ChannelError::WrongVersion`].

#![forbid(unsafe_code)]

pub mod bootstrap;
mod bounds;
pub mod channel;
pub mod control;
pub mod device;
pub mod display;
pub mod netcfg;
pub mod runner;

pub use channel::{
    Channel, ChannelError, ChannelKind, MAX_FDS, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Received,
    decode_packet,
};
