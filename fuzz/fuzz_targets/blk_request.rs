//! Drives dev-blk's request path with arbitrary guest memory: the rings, descriptor tables,
//! indirect tables, headers and data all come from the input. Popping, parsing, executing and
//! completing must never panic, and no request may grow the disk (nothing is written outside
//! it).
//!
//! Input layout: as [`capvm_fuzz::ring`] describes; flag bit 1 makes the disk read-only,
//! bit 2 negotiates DISCARD and WRITE_ZEROES. Guest memory is two adjacent regions
//! (0..0x10000, 0x10000..0x14000), a hole, and a third (0x20000..0x24000).

#![no_main]

use std::fs::File;
use std::sync::OnceLock;

use dev_blk::disk::FileDisk;
use dev_blk::queue_loop::pop_request;
use dev_blk::request::{Context, execute};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::GuestAddress;

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
    let Some(ring) = capvm_fuzz::ring(
        data,
        &[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x4000),
            (GuestAddress(0x20000), 0x4000),
        ],
    ) else {
        return;
    };
    let (mem, mut q, flags) = (ring.mem, ring.queue, ring.flags);
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
