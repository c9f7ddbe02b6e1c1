//! Drives dev-net's control queue with arbitrary guest memory: the ring, the descriptor table
//! (direct and indirect), the commands and their data all come from the input. Popping,
//! answering and acknowledging must never panic; an accepted `VQ_PAIRS_SET` names 1 to the
//! device's pairs, and any acknowledgement is `OK` or `ERR` written into a device-writable
//! byte of guest memory.
//!
//! Input layout: bytes 0-1 the queue size (invalid sizes are refused as the device refuses
//! them), byte 2 flags (bit 0 EVENT_IDX, bit 1 MQ negotiated, bits 4-7 the device's pairs),
//! the rest the first bytes of guest memory (0..0x10000, then 0x10000..0x14000); the
//! descriptor table is at 0, the avail ring at 0x1000, the used ring at 0x2000.

#![no_main]

use dev_net::ctrl::{ACK_ERR, ACK_OK, answer, pop_command, write_ack};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MAX_COMMANDS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((head, image)) = data.split_at_checked(3) else {
        return;
    };
    let size = u16::from_le_bytes([head[0], head[1]]);
    let flags = head[2];
    let max_pairs = u16::from(flags >> 4).max(1);
    let multiqueue = flags & 2 != 0;
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(0x10000), 0x4000),
    ])
    .expect("guest memory");
    let n = image.len().min(0x14000);
    mem.write_slice(&image[..n], GuestAddress(0)).expect("fill");

    let mut q = Queue::new(256).expect("queue");
    if q.try_set_size(size).is_err() {
        return;
    }
    q.try_set_desc_table_address(GuestAddress(0)).expect("desc");
    q.try_set_avail_ring_address(GuestAddress(0x1000))
        .expect("avail");
    q.try_set_used_ring_address(GuestAddress(0x2000))
        .expect("used");
    q.set_event_idx(flags & 1 != 0);
    q.set_ready(true);
    if !q.is_valid(&mem) {
        return;
    }
    for _ in 0..MAX_COMMANDS {
        match pop_command(&mut q, &mem) {
            Ok(Some(cmd)) => {
                assert!(cmd.bytes.len() <= dev_net::ctrl::MAX_COMMAND_BYTES);
                let a = if cmd.malformed {
                    None
                } else {
                    Some(answer(&cmd.bytes, max_pairs, multiqueue))
                };
                if let Some(a) = a {
                    assert!(a.ack == ACK_OK || a.ack == ACK_ERR);
                    if let Some(p) = a.set_pairs {
                        assert_eq!(a.ack, ACK_OK);
                        assert!(multiqueue && (1..=max_pairs).contains(&p), "{p}");
                    }
                }
                let ack = a.map_or(ACK_ERR, |a| a.ack);
                let len = write_ack(&cmd, ack, &mem);
                assert!(len <= 1);
                if len == 1 {
                    let at = cmd.ack_at.expect("an ack needs a place");
                    let mut got = [0u8];
                    mem.read_slice(&mut got, at).expect("ack readable");
                    assert_eq!(got[0], ack);
                }
                if q.add_used(&mem, cmd.head, len).is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(_) => break, // the device would ask for a reset
        }
    }
});
