//! Drives dev-blk's request path with arbitrary guest memory: the rings, descriptor tables,
//! indirect tables, headers and data all come from the input. Popping, parsing, executing and
//! completing must never panic, and no request may grow the disk (nothing is written outside
//! it).
//!
//! Input layout: bytes 0-1 the queue size (any value; invalid sizes are refused like the
//! device refuses them), byte 2 flags (bit 0 EVENT_IDX, bit 1 read-only, bit 2 DISCARD and
//! WRITE_ZEROES negotiated), the rest the first bytes of guest memory. Guest memory is two
//! adjacent regions (0..0x10000, 0x10000..0x14000), a hole, and a third (0x20000..0x24000);
//! the descriptor table is at 0, the avail ring at 0x1000, the used ring at 0x2000.

#![no_main]

use std::fs::File;
use std::sync::OnceLock;

use dev_blk::disk::FileDisk;
use dev_blk::queue_loop::pop_request;
use dev_blk::request::{Context, execute};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DISK_BYTES: u64 = 256 * 1024;
const MAX_REQUESTS: usize = 64;

fn disk() -> &'static FileDisk {
    static DISK: OnceLock<FileDisk> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = format!("/dev/shm/capvm-blk-fuzz-{}", std::process::id());
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("fuzz disk");
        let _ = std::fs::remove_file(&path);
        file.set_len(DISK_BYTES).expect("size fuzz disk");
        FileDisk::new(file).expect("fuzz disk")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((head, image)) = data.split_at_checked(3) else {
        return;
    };
    let size = u16::from_le_bytes([head[0], head[1]]);
    let flags = head[2];
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(0x10000), 0x4000),
        (GuestAddress(0x20000), 0x4000),
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
    let ctx = Context {
        read_only: flags & 2 != 0,
        serial: b"fuzz-serial".to_vec(),
        discard: flags & 4 != 0,
        write_zeroes: flags & 4 != 0,
    };
    let disk = disk();
    for _ in 0..MAX_REQUESTS {
        match pop_request(&mut q, &mem) {
            Ok(Some((head, req))) => {
                let c = execute(&req, &mem, disk, &ctx);
                assert!(c.status <= 2, "status {}", c.status);
                if q.add_used(&mem, head, c.used_len).is_err() {
                    break;
                }
                let _ = q.needs_notification(&mem);
            }
            Ok(None) => {
                let _ = q.enable_notification(&mem);
                break;
            }
            Err(_) => break, // the device would ask for a reset
        }
    }
    let len = disk.file().metadata().expect("disk metadata").len();
    assert_eq!(len, DISK_BYTES, "a request changed the disk's size");
});
