//! Drives dev-net's transmit path with arbitrary guest memory: a chain of up to four buffers
//! whose bytes (virtio header and frame) come from the input is split, its header copied out
//! and checked against the negotiated offloads and the MTU. Nothing may panic, and every frame
//! the check accepts must satisfy the invariants the tap relies on (checked here again,
//! independently): at least an Ethernet header, within the size bound, checksum field and
//! `hdr_len` inside the frame, a known segmentation type with a segment size.
//!
//! Input layout: byte 0 the offloads (bits 0-3: CSUM, HOST_TSO4, HOST_TSO6, HOST_ECN), bytes
//! 1-2 the MTU, byte 3 the number of buffers (1-4), bytes 4-11 their lengths (u16 each), the
//! rest the bytes of the chain, laid out in guest memory at 0x1000, 0x3000, 0x5000, 0x7000.

#![no_main]

use dev_net::header::{
    ETH_HLEN, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, MAX_GSO_FRAME, NetHeader,
    TxOffloads, VLAN_HLEN,
};
use dev_net::ring::Segment;
use dev_net::tx::frame;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const BASES: [u64; 4] = [0x1000, 0x3000, 0x5000, 0x7000];
const MAX_BUF: usize = 0x2000;

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let offloads = TxOffloads {
        csum: data[0] & 1 != 0,
        tso4: data[0] & 2 != 0,
        tso6: data[0] & 4 != 0,
        ecn: data[0] & 8 != 0,
    };
    let mtu = u16::from_le_bytes([data[1], data[2]]);
    let count = usize::from(data[3] % 4) + 1;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("memory");
    let mut payload = &data[12..];
    let mut segments = Vec::new();
    for (i, base) in BASES.iter().enumerate().take(count) {
        let want = usize::from(u16::from_le_bytes([data[4 + 2 * i], data[5 + 2 * i]]));
        let len = want.min(MAX_BUF).min(payload.len());
        let (now, rest) = payload.split_at(len);
        mem.write_slice(now, GuestAddress(*base)).expect("fill");
        payload = rest;
        // The declared length may exceed what the input filled: the rest is zeroes.
        segments.push(Segment {
            addr: GuestAddress(*base),
            len: want.min(MAX_BUF) as u32,
        });
    }
    let Ok(f) = frame(&segments, &mem, mtu, offloads) else {
        return;
    };
    let hdr = NetHeader::decode(&f.header);
    let total: u64 = f.segments.iter().map(|s| u64::from(s.len)).sum();
    assert_eq!(total, u64::from(f.len));
    assert!(f.len >= ETH_HLEN);
    assert!(f.len <= MAX_GSO_FRAME);
    assert!(u32::from(hdr.hdr_len) <= f.len);
    if hdr.flags & F_NEEDS_CSUM != 0 {
        assert!(offloads.csum);
        assert!(u32::from(hdr.csum_start) + u32::from(hdr.csum_offset) + 2 <= f.len);
    }
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE => {
            assert_eq!(hdr.gso_type, GSO_NONE);
            assert!(f.len <= u32::from(mtu) + ETH_HLEN + VLAN_HLEN);
        }
        GSO_TCPV4 | GSO_TCPV6 => {
            assert!(hdr.gso_size > 0);
            assert!(hdr.flags & F_NEEDS_CSUM != 0);
        }
        other => panic!("accepted gso_type {other:#x}"),
    }
});
