//! What the ring fuzz targets share: guest memory filled from the input, and a split
//! virtqueue over it as a driver would have set it up.
//!
//! Input layout: bytes 0-1 the queue size (any value: invalid sizes are refused as a device
//! refuses them), byte 2 flags (bit 0 EVENT_IDX; the other bits are the target's), the rest
//! the first [`IMAGE_BYTES`] of guest memory. The avail ring is at [`AVAIL`] (0x10), the
//! descriptor table at [`DESC`], the used ring at [`USED`]: what the driver writes comes
//! first, so that the short inputs a fuzzer starts with (libFuzzer's default `-max_len` is
//! 4096) reach the avail index, the ring and the first descriptors. (With the descriptor table
//! first and the avail ring at 0x1000, no input of 4096 bytes offered a single chain.) Free
//! memory for headers and data: 0..0x10, 0x218..0x400 and from 0x1c10 on.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// How much of guest memory, from address 0, the input fills.
pub const IMAGE_BYTES: usize = 0x14000;
/// The avail ring (at most 0x206 bytes for 256 entries). Not 0: `virtio-queue` takes an
/// avail ring at address 0 for a queue that is not set up.
pub const AVAIL: u64 = 0x10;
/// The descriptor table (at most 0x1000 bytes).
pub const DESC: u64 = 0x400;
/// The used ring (at most 0x806 bytes).
pub const USED: u64 = 0x1400;

/// Guest memory and a ready queue over it, with the input's flag byte.
pub struct Ring {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub flags: u8,
}

/// The ring an input describes, in guest memory made of `regions` (which must cover
/// 0..[`IMAGE_BYTES`]); `None` for an input shorter than its head or a queue the device
/// would refuse (a bad size, rings outside memory).
pub fn ring(data: &[u8], regions: &[(GuestAddress, usize)]) -> Option<Ring> {
    let (head, image) = data.split_at_checked(3)?;
    let size = u16::from_le_bytes([head[0], head[1]]);
    let flags = head[2];
    let mem = GuestMemoryMmap::from_ranges(regions).expect("guest memory");
    let n = image.len().min(IMAGE_BYTES);
    mem.write_slice(&image[..n], GuestAddress(0)).expect("fill");

    let mut queue = Queue::new(256).expect("queue");
    queue.try_set_size(size).ok()?;
    queue
        .try_set_desc_table_address(GuestAddress(DESC))
        .expect("desc");
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL))
        .expect("avail");
    queue
        .try_set_used_ring_address(GuestAddress(USED))
        .expect("used");
    queue.set_event_idx(flags & 1 != 0);
    queue.set_ready(true);
    queue.is_valid(&mem).then_some(Ring { mem, queue, flags })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use vm_memory::GuestAddress;

    /// The rings of the seeds `fuzz/seeds.py` writes for `target` (`scripts/fuzz.sh` runs it
    /// first), by name; each seed fits libFuzzer's default `-max_len` and describes a ring.
    fn seed_rings(target: &str) -> Vec<(String, super::Ring)> {
        let regions = [(GuestAddress(0), 0x10000), (GuestAddress(0x10000), 0x4000)];
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(target);
        let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (run fuzz/seeds.py first)", dir.display()))
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("seed-"))
            .map(|e| {
                let data = std::fs::read(e.path()).expect("seed");
                (e.file_name().to_string_lossy().into_owned(), data)
            })
            .collect();
        out.sort();
        assert!(!out.is_empty(), "no seeds in {}", dir.display());
        out.into_iter()
            .map(|(name, data)| {
                assert!(
                    data.len() <= 4096,
                    "{name} is longer than libFuzzer's default max_len"
                );
                let ring =
                    super::ring(&data, &regions).unwrap_or_else(|| panic!("{name}: no ring"));
                (name, ring)
            })
            .collect()
    }

    /// An unlinked file in /dev/shm.
    fn tempfile_in_shm() -> std::fs::File {
        let path = format!("/dev/shm/capvm-fuzz-seeds-{}", std::process::id());
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("scratch disk");
        let _ = std::fs::remove_file(&path);
        file
    }

    /// Every seed is a ring whose first chain dev-blk runs to `VIRTIO_BLK_S_OK`: the layout
    /// lets a fuzzer's inputs reach the request path (an avail ring at 0 or past the first
    /// 4096 bytes of input never offered a chain).
    #[test]
    fn every_blk_seed_offers_a_request() {
        let file = tempfile_in_shm();
        file.set_len(1 << 20).expect("size");
        let disk = dev_blk::disk::FileDisk::new(file).expect("disk");
        let ctx = dev_blk::request::Context {
            read_only: false,
            serial: b"seed".to_vec(),
            discard: true,
            write_zeroes: true,
        };
        for (name, mut ring) in seed_rings("blk_request") {
            let popped = dev_blk::queue_loop::pop_request(&mut ring.queue, &ring.mem);
            let Ok(Some((_, req))) = popped else {
                panic!("{name}: {popped:?}");
            };
            let done = dev_blk::request::execute(&req, &ring.mem, &disk, &ctx);
            assert_eq!(done.status, 0, "{name}: {req:?} did not complete OK");
        }
    }

    /// Every seed is a ring whose first chain dev-net takes as a well-formed command, answered
    /// as its name says (`seed-ok-*`, `seed-err-*`).
    #[test]
    fn every_net_ctrl_seed_offers_a_command() {
        for (name, mut ring) in seed_rings("net_ctrl") {
            let popped = dev_net::ctrl::pop_command(&mut ring.queue, &ring.mem);
            let Ok(Some(cmd)) = popped else {
                panic!("{name}: {popped:?}");
            };
            assert!(!cmd.malformed, "{name}: malformed");
            let answer = dev_net::ctrl::answer(&cmd.bytes, 4, true);
            let want = if name.starts_with("seed-ok-") {
                dev_net::ctrl::ACK_OK
            } else {
                dev_net::ctrl::ACK_ERR
            };
            assert_eq!(answer.ack, want, "{name}: {answer:?}");
        }
    }
}
