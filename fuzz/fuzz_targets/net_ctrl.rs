//! Drives dev-net's control queue with arbitrary guest memory: the ring, the descriptor table
//! (direct and indirect), the commands and their data all come from the input. Popping,
//! answering and acknowledging must never panic; an accepted `VQ_PAIRS_SET` names 1 to the
//! device's pairs, and any acknowledgement is `OK` or `ERR` written into a device-writable
//! byte of guest memory.
//!
//! Input layout: as [`capvm_fuzz::ring`] describes; flag bit 1 negotiates MQ, bits 4-7 are
//! the device's pairs. Guest memory is 0..0x10000 and 0x10000..0x14000.

#![no_main]

use dev_net::ctrl::{ACK_ERR, ACK_OK, answer, pop_command, write_ack};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

const MAX_COMMANDS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some(ring) = capvm_fuzz::ring(
        data,
        &[(GuestAddress(0), 0x10000), (GuestAddress(0x10000), 0x4000)],
    ) else {
        return;
    };
    let max_pairs = u16::from(ring.flags >> 4).max(1);
    let multiqueue = ring.flags & 2 != 0;
    let (mem, mut q) = (ring.mem, ring.queue);
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
