//! Feeds arbitrary packets to the decoder `Channel::recv` uses, for each message a peer can
//! send: decoding and validation must never panic, and whatever decodes must survive its own
//! encode/decode round trip.
//!
//! Input layout: byte 0 picks the message type (bootstrap, its reply, control request and
//! reply, a device's message to the runner, the runner's to a device — validated against a
//! multi-queue NIC's offer — or a hello), byte 1 the number of fds "received" with the
//! packet, the rest is the packet (header + payload).

#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::bootstrap::{Bootstrap, BootstrapReply};
use proto::channel::{ChannelKind, Hello, decode_packet, encode_packet};
use proto::control::{Reply, Request};
use proto::device::{DeviceInfo, FromDevice, ToDevice, VIRTIO_ID_NET};

/// Decodes `$packet` as `$ty`; if it decodes, re-encodes and decodes it again and checks the
/// value survived. A macro rather than a generic fn: the fuzz crate has no serde dependency to
/// name the bounds with.
macro_rules! decode_and_round_trip {
    ($ty:ty, $packet:expr, $fd_count:expr) => {
        decode_packet::<$ty>($packet, $fd_count)
            .ok()
            .inspect(|msg| {
                let again = encode_packet(msg, $fd_count).expect("a decoded message re-encodes");
                let back =
                    decode_packet::<$ty>(&again, $fd_count).expect("a re-encoded message decodes");
                assert_eq!(&back, msg);
            })
    };
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Some((&fds, packet)) = rest.split_first() else {
        return;
    };
    let fd_count = usize::from(fds % 40);
    match selector % 7 {
        0 => {
            if let Some(msg) = decode_and_round_trip!(Bootstrap, packet, fd_count) {
                let _ = msg.validate(fd_count);
            }
        }
        1 => {
            if let Some(msg) = decode_and_round_trip!(BootstrapReply, packet, fd_count) {
                let _ = msg.validate();
            }
        }
        2 => {
            if let Some(msg) = decode_and_round_trip!(Request, packet, fd_count) {
                let _ = msg.validate();
            }
        }
        3 => {
            if let Some(msg) = decode_and_round_trip!(Reply, packet, fd_count) {
                let _ = msg.validate();
            }
        }
        4 => {
            if let Some(msg) = decode_and_round_trip!(FromDevice, packet, fd_count) {
                let _ = msg.validate();
            }
        }
        5 => {
            // Checked against a multi-queue NIC's offer (3 pairs: 7 queues), as dev-net does.
            let info = DeviceInfo {
                device_type: VIRTIO_ID_NET,
                features: (1 << 32) | (1 << 22) | (1 << 17),
                queues: 7,
                max_queue_size: 256,
                config: vec![0; 12],
            };
            if let Some(msg) = decode_and_round_trip!(ToDevice, packet, fd_count) {
                let _ = msg.validate(&info);
                let _ = msg.fd_count();
            }
        }
        _ => {
            if let Some(msg) = decode_and_round_trip!(Hello, packet, fd_count) {
                let _ = msg.check(ChannelKind::Control);
            }
        }
    }
});
