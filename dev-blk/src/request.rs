//! The request path: a descriptor chain from guest memory → a typed [`Request`] → executed
//! against a [`Disk`] → a status byte and a used length.
//!
//! Everything here treats guest memory as hostile (virtio 1.2 §2.7.5, §5.2.6). A chain whose
//! shape is broken (a loop, a `next` out of range, a bad indirect table, no writable status
//! byte) is a [`ChainError`]: the device cannot even tell the driver, so it asks for a reset.
//! A chain whose shape is fine but whose request is not (a short header, a sector past the end,
//! a buffer outside RAM, a write to a read-only disk) completes with `VIRTIO_BLK_S_IOERR` or
//! `VIRTIO_BLK_S_UNSUPP`.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::config::{MAX_RANGE_SECTORS, MAX_RANGE_SEGMENTS, SECTOR_SIZE, SEG_MAX, SIZE_MAX};
use crate::disk::Disk;

/// Most descriptors one chain may have (direct or through an indirect table); well above
/// `seg_max` + 2, far below what an indirect table can describe.
pub const MAX_DESCRIPTORS: usize = 1024;
/// Most guest memory slices of a request handed to the disk from the stack.
const INLINE_SLICES: usize = 8;
/// Bytes of `struct virtio_blk_outhdr`: type, reserved/ioprio, sector.
const HEADER_LEN: u32 = 16;
/// Bytes of one `struct virtio_blk_discard_write_zeroes`.
const RANGE_LEN: u32 = 16;
/// The `unmap` flag of a write-zeroes range (§5.2.6).
const RANGE_FLAG_UNMAP: u32 = 1;

/// A chain the device cannot complete: the device needs a reset (§2.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor chain is empty (head index out of range or unreadable descriptor)")]
    Empty,
    #[error(
        "descriptor chain is cut short: a loop, a chain longer than the queue, a next index out \
         of range, an unreadable descriptor or a bad indirect table"
    )]
    Truncated,
    #[error("descriptor chain is longer than {MAX_DESCRIPTORS} descriptors")]
    TooLong,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the chain has no device-writable status byte")]
    NoStatus,
    #[error("the status byte is outside guest memory")]
    StatusOutsideMemory,
}

/// One guest buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// `struct virtio_blk_outhdr`, as far as the device uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u32,
    pub sector: u64,
}

/// A chain split into its parts; its contents are still unchecked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `None` if the readable part is shorter than a header or outside guest memory.
    pub header: Option<Header>,
    /// Device-readable bytes after the header (write data, discard ranges).
    pub data_out: Vec<Segment>,
    /// Device-writable bytes before the status byte (read data, the ID).
    pub data_in: Vec<Segment>,
    /// The status byte: the last device-writable byte of the chain.
    pub status: GuestAddress,
}

/// What the request path knows about the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    pub read_only: bool,
    /// The `GET_ID` answer, at most 20 bytes.
    pub serial: Vec<u8>,
    /// `VIRTIO_BLK_F_DISCARD` was negotiated.
    pub discard: bool,
    /// `VIRTIO_BLK_F_WRITE_ZEROES` was negotiated.
    pub write_zeroes: bool,
}

/// How a request ended: the status byte and the bytes written to device-writable buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub status: u8,
    /// The used length: data written plus the status byte.
    pub used_len: u32,
}

/// Splits a chain's descriptors into a [`Request`]. `descriptors` is the chain as
/// `virtio-queue` yields it: it stops early, silently, on loops, out-of-range `next` indices,
/// unreadable descriptors and bad indirect tables, so a last descriptor that still says
/// `NEXT` marks a broken chain.
pub fn parse(
    descriptors: impl Iterator<Item = Descriptor>,
    mem: &GuestMemoryMmap,
) -> Result<Request, ChainError> {
    let mut readable: Vec<Segment> = Vec::new();
    let mut writable: Vec<Segment> = Vec::new();
    // A first descriptor that is exactly the header (as Linux lays requests out) is kept
    // apart, so the rest of the readable part needs no splitting (and no allocation).
    let mut header_seg: Option<Segment> = None;
    let mut last: Option<Descriptor> = None;
    for (n, d) in descriptors.enumerate() {
        if n >= MAX_DESCRIPTORS {
            return Err(ChainError::TooLong);
        }
        let seg = Segment {
            addr: d.addr(),
            len: d.len(),
        };
        if d.is_write_only() {
            writable.push(seg);
        } else if n == 0 && seg.len == HEADER_LEN {
            header_seg = Some(seg);
        } else if writable.is_empty() {
            readable.push(seg);
        } else {
            // §2.7.4.2: device-writable descriptors come after all device-readable ones.
            return Err(ChainError::ReadableAfterWritable);
        }
        last = Some(d);
    }
    match last {
        None => return Err(ChainError::Empty),
        Some(d) if d.has_next() => return Err(ChainError::Truncated),
        Some(_) => {}
    }
    let status_seg = writable.pop().ok_or(ChainError::NoStatus)?;
    let status_off = status_seg.len.checked_sub(1).ok_or(ChainError::NoStatus)?;
    let status = status_seg
        .addr
        .0
        .checked_add(u64::from(status_off))
        .map(GuestAddress)
        .ok_or(ChainError::StatusOutsideMemory)?;
    if !mem.address_in_range(status) {
        return Err(ChainError::StatusOutsideMemory);
    }
    if status_off > 0 {
        writable.push(Segment {
            addr: status_seg.addr,
            len: status_off,
        });
    }

    let mut raw = [0u8; HEADER_LEN as usize];
    let (whole, data_out) = if let Some(h) = header_seg {
        (gather(mem, std::slice::from_ref(&h), &mut raw), readable)
    } else {
        let (head, data_out) = split_at(&readable, HEADER_LEN);
        (
            total_len(&head) == u64::from(HEADER_LEN) && gather(mem, &head, &mut raw),
            data_out,
        )
    };
    let header = whole.then(|| Header {
        kind: u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]),
        sector: u64::from_le_bytes([
            raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
        ]),
    });
    Ok(Request {
        header,
        data_out,
        data_in: writable,
        status,
    })
}

/// Runs `req` against `disk` and writes its status byte. The request may have been parsed on
/// another thread; guest memory is re-checked for every buffer.
pub fn execute(req: &Request, mem: &GuestMemoryMmap, disk: &dyn Disk, ctx: &Context) -> Completion {
    let (status, written) = match run(req, mem, disk, ctx) {
        Ok(written) => (VIRTIO_BLK_S_OK, written),
        Err(status) => (status, 0),
    };
    let status = u8::try_from(status).unwrap_or(u8::MAX);
    // The status address was checked in `parse`; a failure here means memory went away, and
    // the driver sees whatever the byte held.
    let _ = mem.write_obj(status, req.status);
    Completion {
        status,
        used_len: written.saturating_add(1),
    }
}

/// How a request runs: the plain reads, writes and flushes an asynchronous engine submits
/// itself, or anything else, run synchronously with [`execute`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan<'r> {
    /// Fill `segs` (`len` bytes in all) from the disk at byte `offset`.
    Read {
        offset: u64,
        segs: &'r [Segment],
        len: u32,
    },
    /// Write `segs` to the disk at byte `offset`.
    Write { offset: u64, segs: &'r [Segment] },
    /// Make completed writes durable.
    Flush,
    /// Fails at once with this status.
    Fail(u32),
    /// Anything else (`GET_ID`, discard, write-zeroes, an unknown type): run by [`execute`].
    Other,
}

/// Checks `req` against the disk and the negotiated context, and says how it runs.
pub fn plan<'r>(req: &'r Request, ctx: &Context, disk_size: u64) -> Plan<'r> {
    let Some(header) = req.header else {
        return Plan::Fail(VIRTIO_BLK_S_IOERR);
    };
    match header.kind {
        VIRTIO_BLK_T_IN => match data_range(header.sector, &req.data_in, disk_size) {
            Ok((offset, len)) => match u32::try_from(len) {
                Ok(len) => Plan::Read {
                    offset,
                    segs: &req.data_in,
                    len,
                },
                Err(_) => Plan::Fail(VIRTIO_BLK_S_IOERR),
            },
            Err(status) => Plan::Fail(status),
        },
        VIRTIO_BLK_T_OUT if ctx.read_only => Plan::Fail(VIRTIO_BLK_S_IOERR),
        VIRTIO_BLK_T_OUT => match data_range(header.sector, &req.data_out, disk_size) {
            Ok((offset, _)) => Plan::Write {
                offset,
                segs: &req.data_out,
            },
            Err(status) => Plan::Fail(status),
        },
        VIRTIO_BLK_T_FLUSH => Plan::Flush,
        _ => Plan::Other,
    }
}

/// Returns the bytes written into `data_in`, or the failure status.
fn run(req: &Request, mem: &GuestMemoryMmap, disk: &dyn Disk, ctx: &Context) -> Result<u32, u32> {
    match plan(req, ctx, disk.size()) {
        Plan::Read { offset, segs, len } => {
            with_slices(mem, segs, |slices| disk.read_into(offset, slices))?;
            Ok(len)
        }
        Plan::Write { offset, segs } => {
            with_slices(mem, segs, |slices| disk.write_from(offset, slices))?;
            Ok(0)
        }
        Plan::Flush => {
            disk.flush().map_err(|_| VIRTIO_BLK_S_IOERR)?;
            Ok(0)
        }
        Plan::Fail(status) => Err(status),
        Plan::Other => run_other(req, mem, disk, ctx),
    }
}

/// The request types [`plan`] leaves to [`execute`].
fn run_other(
    req: &Request,
    mem: &GuestMemoryMmap,
    disk: &dyn Disk,
    ctx: &Context,
) -> Result<u32, u32> {
    let header = req.header.ok_or(VIRTIO_BLK_S_IOERR)?;
    match header.kind {
        VIRTIO_BLK_T_GET_ID => {
            let want = total_len(&req.data_in).min(u64::from(VIRTIO_BLK_ID_BYTES));
            if want == 0 {
                return Err(VIRTIO_BLK_S_IOERR);
            }
            // §5.2.6: the ID is zero-padded when shorter than 20 bytes.
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            for (dst, src) in id.iter_mut().zip(&ctx.serial) {
                *dst = *src;
            }
            let want = usize::try_from(want).unwrap_or(0);
            let (segs, _) = split_at(&req.data_in, u32::try_from(want).unwrap_or(0));
            if !scatter(mem, &segs, id.get(..want).unwrap_or_default()) {
                return Err(VIRTIO_BLK_S_IOERR);
            }
            u32::try_from(want).map_err(|_| VIRTIO_BLK_S_IOERR)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = header.kind == VIRTIO_BLK_T_DISCARD;
            if (discard && !ctx.discard) || (!discard && !ctx.write_zeroes) {
                return Err(VIRTIO_BLK_S_UNSUPP);
            }
            if ctx.read_only {
                return Err(VIRTIO_BLK_S_IOERR);
            }
            ranges(req, mem, disk, discard)?;
            Ok(0)
        }
        _ => Err(VIRTIO_BLK_S_UNSUPP),
    }
}

/// The byte range of a read or write: a non-empty multiple of 512 bytes inside the disk
/// (§5.2.6.1: the device MUST fail requests beyond capacity).
fn data_range(sector: u64, segs: &[Segment], disk_size: u64) -> Result<(u64, u64), u32> {
    within_limits(segs, SEG_MAX, SIZE_MAX)?;
    let len = total_len(segs);
    if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(VIRTIO_BLK_S_IOERR)?;
    let end = offset.checked_add(len).ok_or(VIRTIO_BLK_S_IOERR)?;
    let usable = disk_size - disk_size % SECTOR_SIZE;
    if end > usable {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    Ok((offset, len))
}

/// Checks the limits the device offers (`seg_max`, `size_max`): a driver that sends more
/// data segments or a longer one gets `IOERR`, so the request path never builds an I/O
/// vector longer than the device said it would take.
fn within_limits(segs: &[Segment], seg_max: u32, size_max: u32) -> Result<(), u32> {
    let too_many = u32::try_from(segs.len()).map_or(true, |n| n > seg_max);
    if too_many || segs.iter().any(|s| s.len > size_max) {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    Ok(())
}

/// Executes the ranges of a discard or write-zeroes request (§5.2.6: its data is an array of
/// `virtio_blk_discard_write_zeroes`).
fn ranges(req: &Request, mem: &GuestMemoryMmap, disk: &dyn Disk, discard: bool) -> Result<(), u32> {
    let len = total_len(&req.data_out);
    let count = len / u64::from(RANGE_LEN);
    if len == 0 || !len.is_multiple_of(u64::from(RANGE_LEN)) {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    if count > u64::from(MAX_RANGE_SEGMENTS) {
        return Err(VIRTIO_BLK_S_UNSUPP);
    }
    let mut raw = vec![0u8; usize::try_from(len).map_err(|_| VIRTIO_BLK_S_IOERR)?];
    if !gather(mem, &req.data_out, &mut raw) {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    let mut parsed = Vec::new();
    for r in raw.chunks_exact(RANGE_LEN as usize) {
        let word = |i: usize| {
            r.get(i..i + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
        };
        let sector = r
            .get(0..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or(VIRTIO_BLK_S_IOERR)?;
        let sectors = word(8).ok_or(VIRTIO_BLK_S_IOERR)?;
        let flags = word(12).ok_or(VIRTIO_BLK_S_IOERR)?;
        // §5.2.6.2: unmap is only meaningful for write-zeroes; any other flag is reserved.
        let allowed = if discard { 0 } else { RANGE_FLAG_UNMAP };
        if flags & !allowed != 0 {
            return Err(VIRTIO_BLK_S_UNSUPP);
        }
        if sectors == 0 || sectors > MAX_RANGE_SECTORS {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(VIRTIO_BLK_S_IOERR)?;
        let bytes = u64::from(sectors) * SECTOR_SIZE;
        let end = offset.checked_add(bytes).ok_or(VIRTIO_BLK_S_IOERR)?;
        if end > disk.size() - disk.size() % SECTOR_SIZE {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        parsed.push((offset, bytes, flags & RANGE_FLAG_UNMAP != 0));
    }
    for (offset, bytes, unmap) in parsed {
        let done = if discard {
            disk.discard(offset, bytes)
        } else {
            disk.write_zeroes(offset, bytes, unmap)
        };
        done.map_err(|_| VIRTIO_BLK_S_IOERR)?;
    }
    Ok(())
}

/// Builds bounds-checked slices of guest memory for `segs` (splitting at region boundaries)
/// and hands them to `io`.
pub fn with_slices<E>(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    io: impl FnOnce(&[VolatileSlice<'_>]) -> Result<(), E>,
) -> Result<(), u32> {
    // Requests of a few buffers (every 4 KiB one) build their slices on the stack.
    let mut inline: [Option<VolatileSlice<'_>>; INLINE_SLICES] = [None; INLINE_SLICES];
    let mut n = 0usize;
    let mut spilled: Vec<VolatileSlice<'_>> = Vec::new();
    for s in segs {
        let len = usize::try_from(s.len).map_err(|_| VIRTIO_BLK_S_IOERR)?;
        for slice in mem.get_slices(s.addr, len) {
            let slice = slice.map_err(|_| VIRTIO_BLK_S_IOERR)?;
            if let Some(free) = inline.get_mut(n) {
                *free = Some(slice);
                n += 1;
            } else {
                if spilled.is_empty() {
                    spilled.extend(inline.iter().flatten());
                }
                spilled.push(slice);
            }
        }
    }
    if !spilled.is_empty() {
        io(&spilled).map_err(|_| VIRTIO_BLK_S_IOERR)
    } else if let Some(Some(first)) = inline.first().copied() {
        // Entries past `n` repeat the first slice only to fill the array; they are not passed.
        let slices: [VolatileSlice<'_>; INLINE_SLICES] =
            std::array::from_fn(|i| inline.get(i).copied().flatten().unwrap_or(first));
        io(slices.get(..n).unwrap_or_default()).map_err(|_| VIRTIO_BLK_S_IOERR)
    } else {
        io(&[]).map_err(|_| VIRTIO_BLK_S_IOERR)
    }
}

fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Splits a byte stream described by `segs` after `n` bytes (fewer if the stream is shorter).
fn split_at(segs: &[Segment], n: u32) -> (Vec<Segment>, Vec<Segment>) {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut left = n;
    for s in segs {
        if left == 0 {
            tail.push(*s);
        } else if s.len <= left {
            head.push(*s);
            left -= s.len;
        } else {
            head.push(Segment {
                addr: s.addr,
                len: left,
            });
            if let Some(rest) = s.addr.0.checked_add(u64::from(left)) {
                tail.push(Segment {
                    addr: GuestAddress(rest),
                    len: s.len - left,
                });
            }
            left = 0;
        }
    }
    (head, tail)
}

/// Copies the stream `segs` into `buf` (which must be no longer); false if memory is missing.
fn gather(mem: &GuestMemoryMmap, segs: &[Segment], buf: &mut [u8]) -> bool {
    let mut pos = 0usize;
    for s in segs {
        let len = usize::try_from(s.len).unwrap_or(usize::MAX);
        let Some(dst) = pos.checked_add(len).and_then(|end| buf.get_mut(pos..end)) else {
            return false;
        };
        if mem.read_slice(dst, s.addr).is_err() {
            return false;
        }
        pos += len;
    }
    true
}

/// Copies `bytes` into the stream `segs` (as long as `bytes`); false if memory is missing.
fn scatter(mem: &GuestMemoryMmap, segs: &[Segment], bytes: &[u8]) -> bool {
    let mut pos = 0usize;
    for s in segs {
        let len = usize::try_from(s.len).unwrap_or(usize::MAX);
        let Some(src) = pos.checked_add(len).and_then(|end| bytes.get(pos..end)) else {
            return false;
        };
        if mem.write_slice(src, s.addr).is_err() {
            return false;
        }
        pos += len;
    }
    true
}

#[cfg(test)]
// Test constants are small; the casts cannot truncate.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::disk::FileDisk;
    use std::io::Write;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::{Queue, QueueOwnedT, QueueT};

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    const QSIZE: u16 = 16;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const HDR: u64 = 0x4000;
    const DATA: u64 = 0x10000;
    const STATUS: u64 = 0x5000;
    /// Two adjacent regions, then a hole, then a third.
    const REGION2: u64 = 0x10_0000;
    const HOLE: u64 = 0x20_0000;
    const REGION3: u64 = 0x30_0000;
    const DISK_BYTES: usize = 1 << 20;

    struct Fixture {
        mem: GuestMemoryMmap,
        file: tempfile::NamedTempFile,
        disk: FileDisk,
        queue: Queue,
        avail: u16,
    }

    fn fixture() -> Fixture {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), REGION2 as usize),
            (GuestAddress(REGION2), (HOLE - REGION2) as usize),
            (GuestAddress(REGION3), 0x10_0000),
        ])
        .expect("guest memory");
        let mut file = tempfile::NamedTempFile::new().expect("temp disk");
        let content: Vec<u8> = (0..DISK_BYTES).map(|i| (i % 253) as u8).collect();
        file.write_all(&content).expect("fill disk");
        let disk = FileDisk::new(file.reopen().expect("reopen")).expect("disk");
        let mut queue = Queue::new(QSIZE).expect("queue");
        queue
            .try_set_desc_table_address(GuestAddress(DESC))
            .expect("desc");
        queue
            .try_set_avail_ring_address(GuestAddress(AVAIL))
            .expect("avail");
        queue
            .try_set_used_ring_address(GuestAddress(USED))
            .expect("used");
        queue.set_ready(true);
        assert!(queue.is_valid(&mem));
        Fixture {
            mem,
            file,
            disk,
            queue,
            avail: 0,
        }
    }

    fn ctx() -> Context {
        Context {
            read_only: false,
            serial: b"capvm-serial-01".to_vec(),
            discard: true,
            write_zeroes: true,
        }
    }

    impl Fixture {
        fn desc_at(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = GuestAddress(table + u64::from(i) * 16);
            let d = Descriptor::new(addr, len, flags, next);
            self.mem.write_obj(d, at).expect("descriptor");
        }
        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            self.desc_at(DESC, i, addr, len, flags, next);
        }
        fn header(&self, at: u64, kind: u32, sector: u64) {
            self.mem
                .write_obj(kind.to_le(), GuestAddress(at))
                .expect("type");
            self.mem
                .write_obj(0u32, GuestAddress(at + 4))
                .expect("ioprio");
            self.mem
                .write_obj(sector.to_le(), GuestAddress(at + 8))
                .expect("sector");
        }
        /// Offers `head` as the next available chain; `idx` is the new avail index.
        fn offer(&self, head: u16, idx: u16) {
            let slot = u64::from(idx.wrapping_sub(1) % QSIZE);
            self.mem
                .write_obj(head, GuestAddress(AVAIL + 4 + slot * 2))
                .expect("ring");
            self.mem
                .write_obj(idx, GuestAddress(AVAIL + 2))
                .expect("idx");
        }
        fn pop(&mut self) -> Result<Request, ChainError> {
            let chain = self
                .queue
                .iter(&self.mem)
                .expect("avail ok")
                .next()
                .expect("a chain");
            parse(chain, &self.mem)
        }
        /// A header / data / status chain at descriptors 0, 1, 2.
        fn simple(
            &mut self,
            kind: u32,
            sector: u64,
            data: u64,
            len: u32,
            data_flags: u16,
        ) -> Result<Request, ChainError> {
            self.header(HDR, kind, sector);
            self.desc(0, HDR, 16, NEXT, 1);
            self.desc(1, data, len, data_flags | NEXT, 2);
            self.desc(2, STATUS, 1, WRITE, 0);
            self.avail += 1;
            self.offer(0, self.avail);
            self.pop()
        }
        fn run(&self, req: &Request, ctx: &Context) -> Completion {
            execute(req, &self.mem, &self.disk, ctx)
        }
        fn status_byte(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).expect("status")
        }
        fn disk_bytes(&self) -> Vec<u8> {
            std::fs::read(self.file.path()).expect("disk file")
        }
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn a_write_then_a_read_round_trip_through_the_disk() {
        let mut f = fixture();
        f.mem
            .write_slice(&[0x5a; 1024], GuestAddress(DATA))
            .expect("data");
        let req = f
            .simple(VIRTIO_BLK_T_OUT, 4, DATA, 1024, 0)
            .expect("parse write");
        assert_eq!(
            f.run(&req, &ctx()),
            Completion {
                status: OK,
                used_len: 1
            }
        );
        assert_eq!(f.status_byte(), OK);
        assert_eq!(f.disk_bytes().get(2048..3072), Some(&[0x5a; 1024][..]));

        let req = f.simple(VIRTIO_BLK_T_IN, 4, DATA + 0x4000, 1024, WRITE);
        let c = f.run(&req.expect("parse read"), &ctx());
        assert_eq!(
            c,
            Completion {
                status: OK,
                used_len: 1025
            }
        );
        let mut back = [0u8; 1024];
        f.mem
            .read_slice(&mut back, GuestAddress(DATA + 0x4000))
            .expect("read back");
        assert_eq!(back, [0x5a; 1024]);
    }

    /// Header at descriptor 0, `count` 512-byte data buffers (buffer `k` at `addr(k)`), status.
    fn scattered(f: &mut Fixture, kind: u32, count: u16, flags: u16, addr: impl Fn(u16) -> u64) {
        f.header(HDR, kind, 0);
        f.desc(0, HDR, 16, NEXT, 1);
        for k in 0..count {
            f.desc(k + 1, addr(k), 512, flags | NEXT, k + 2);
        }
        f.desc(count + 1, STATUS, 1, WRITE, 0);
        f.avail += 1;
        f.offer(0, f.avail);
    }

    #[test]
    fn requests_of_more_buffers_than_fit_on_the_stack_move_every_buffer_in_order() {
        // 12 buffers: more than the 8 whose slices and iovecs live on the stack.
        let mut f = fixture();
        let out_at = |k: u16| DATA + 0x1000 * u64::from(12 - k);
        for k in 0..12u16 {
            f.mem
                .write_slice(&[k as u8 + 1; 512], GuestAddress(out_at(k)))
                .expect("data");
        }
        scattered(&mut f, VIRTIO_BLK_T_OUT, 12, 0, out_at);
        let req = f.pop().expect("parse write");
        assert_eq!(f.run(&req, &ctx()).status, OK);
        let disk = f.disk_bytes();
        for k in 0..12usize {
            assert_eq!(
                disk.get(k * 512..(k + 1) * 512),
                Some(&[k as u8 + 1; 512][..])
            );
        }

        let in_at = |k: u16| DATA + 0x2_0000 + 0x1000 * u64::from(k);
        scattered(&mut f, VIRTIO_BLK_T_IN, 12, WRITE, in_at);
        let req = f.pop().expect("parse read");
        assert_eq!(
            f.run(&req, &ctx()),
            Completion {
                status: OK,
                used_len: 12 * 512 + 1
            }
        );
        for k in 0..12u16 {
            let mut back = [0u8; 512];
            f.mem
                .read_slice(&mut back, GuestAddress(in_at(k)))
                .expect("read back");
            assert_eq!(back, [k as u8 + 1; 512]);
        }
    }

    #[test]
    fn header_data_and_status_may_share_descriptors() {
        let mut f = fixture();
        // One readable descriptor holds header and data; one writable holds nothing but status.
        f.header(DATA, VIRTIO_BLK_T_OUT, 0);
        f.mem
            .write_slice(&[7; 512], GuestAddress(DATA + 16))
            .expect("data");
        f.desc(0, DATA, 16 + 512, NEXT, 1);
        f.desc(1, STATUS, 1, WRITE, 0);
        f.offer(0, 1);
        let req = f.pop().expect("parse");
        assert_eq!(f.run(&req, &ctx()).status, OK);
        assert_eq!(f.disk_bytes().get(..512), Some(&[7; 512][..]));
    }

    #[test]
    fn data_spanning_two_adjacent_regions_is_read() {
        let mut f = fixture();
        let req = f
            .simple(VIRTIO_BLK_T_IN, 0, REGION2 - 512, 1024, WRITE)
            .expect("parse");
        assert_eq!(f.run(&req, &ctx()).status, OK);
        let mut back = [0u8; 1024];
        f.mem
            .read_slice(&mut back, GuestAddress(REGION2 - 512))
            .expect("read back");
        assert_eq!(back.as_slice(), f.disk_bytes().get(..1024).expect("disk"));
    }

    #[test]
    fn data_outside_ram_or_across_a_hole_is_an_io_error() {
        for addr in [HOLE - 512, HOLE + 0x1000, u64::MAX - 100, 0x40_0000] {
            let mut f = fixture();
            let req = f
                .simple(VIRTIO_BLK_T_IN, 0, addr, 1024, WRITE)
                .expect("parse");
            assert_eq!(f.run(&req, &ctx()).status, IOERR, "address {addr:#x}");
            assert_eq!(f.status_byte(), IOERR);
        }
    }

    #[test]
    fn zero_huge_and_unaligned_lengths_are_io_errors() {
        for len in [0, 0xffff_fe00, 100, 513] {
            let mut f = fixture();
            let req = f
                .simple(VIRTIO_BLK_T_IN, 0, DATA, len, WRITE)
                .expect("parse");
            assert_eq!(f.run(&req, &ctx()).status, IOERR, "length {len}");
        }
    }

    #[test]
    fn more_segments_than_seg_max_or_longer_than_size_max_are_io_errors() {
        let seg = |len| Segment {
            addr: GuestAddress(DATA),
            len,
        };
        assert_eq!(within_limits(&vec![seg(512); 254], 254, 4096), Ok(()));
        assert_eq!(
            within_limits(&vec![seg(512); 255], 254, 4096),
            Err(VIRTIO_BLK_S_IOERR)
        );
        assert_eq!(within_limits(&[seg(4096)], 254, 4096), Ok(()));
        assert_eq!(
            within_limits(&[seg(512), seg(4608)], 254, 4096),
            Err(VIRTIO_BLK_S_IOERR)
        );
        // Through the request path: a read of SEG_MAX + 1 sectors, one descriptor each, fails
        // and writes nothing, while SEG_MAX of them succeed.
        let f = fixture();
        let sectors = |n: u32| Request {
            header: Some(Header {
                kind: VIRTIO_BLK_T_IN,
                sector: 0,
            }),
            data_out: Vec::new(),
            data_in: (0..u64::from(n))
                .map(|i| Segment {
                    addr: GuestAddress(DATA + i * 512),
                    len: 512,
                })
                .collect(),
            status: GuestAddress(STATUS),
        };
        f.mem
            .write_slice(&[0xee; 512], GuestAddress(DATA + u64::from(SEG_MAX) * 512))
            .expect("poison");
        assert_eq!(f.run(&sectors(SEG_MAX + 1), &ctx()).status, IOERR);
        let last = f
            .mem
            .read_obj::<u8>(GuestAddress(DATA + u64::from(SEG_MAX) * 512))
            .expect("read");
        assert_eq!(last, 0xee, "a refused read wrote guest memory");
        assert_eq!(f.run(&sectors(SEG_MAX), &ctx()).status, OK);
    }

    #[test]
    fn chains_longer_than_4_gib_break() {
        // §2.7.5.2: a chain must not exceed 2^32 bytes; virtio-queue stops it short.
        let mut f = fixture();
        assert_eq!(
            f.simple(VIRTIO_BLK_T_IN, 0, DATA, u32::MAX, WRITE),
            Err(ChainError::Truncated)
        );
    }

    #[test]
    fn sectors_past_the_end_of_the_disk_are_io_errors_and_touch_nothing() {
        let last = (DISK_BYTES / 512) as u64;
        for sector in [last, last - 1, u64::MAX, u64::MAX / 512] {
            let mut f = fixture();
            let before = f.disk_bytes();
            let req = f
                .simple(VIRTIO_BLK_T_OUT, sector, DATA, 1024, 0)
                .expect("parse");
            assert_eq!(f.run(&req, &ctx()).status, IOERR, "sector {sector}");
            assert_eq!(f.disk_bytes(), before);
        }
    }

    #[test]
    fn writes_to_a_read_only_disk_are_refused() {
        let mut f = fixture();
        let before = f.disk_bytes();
        let ro = Context {
            read_only: true,
            ..ctx()
        };
        let req = f.simple(VIRTIO_BLK_T_OUT, 0, DATA, 512, 0).expect("parse");
        assert_eq!(f.run(&req, &ro).status, IOERR);
        assert_eq!(f.disk_bytes(), before);
    }

    #[test]
    fn wrong_direction_data_is_an_io_error() {
        let mut f = fixture();
        // A read whose data buffer is device-readable: nothing to read into.
        let req = f.simple(VIRTIO_BLK_T_IN, 0, DATA, 512, 0).expect("parse");
        assert_eq!(f.run(&req, &ctx()).status, IOERR);
        // A write whose data buffer is device-writable: nothing to write.
        let req = f
            .simple(VIRTIO_BLK_T_OUT, 0, DATA, 512, WRITE)
            .expect("parse");
        assert_eq!(f.run(&req, &ctx()).status, IOERR);
    }

    #[test]
    fn a_readable_descriptor_after_a_writable_one_breaks_the_chain() {
        let mut f = fixture();
        f.desc(0, HDR, 16, NEXT, 1);
        f.desc(1, DATA, 512, WRITE | NEXT, 2);
        f.desc(2, STATUS, 1, NEXT, 3);
        f.desc(3, STATUS + 8, 1, WRITE, 0);
        f.offer(0, 1);
        assert_eq!(f.pop(), Err(ChainError::ReadableAfterWritable));
    }

    #[test]
    fn chains_without_a_writable_status_byte_break() {
        let mut f = fixture();
        f.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
        f.desc(0, HDR, 16, 0, 0); // header only
        f.offer(0, 1);
        assert_eq!(f.pop(), Err(ChainError::NoStatus));
        f.desc(0, HDR, 16, NEXT, 1);
        f.desc(1, STATUS, 1, 0, 0); // read-only status
        f.offer(0, 2);
        assert_eq!(f.pop(), Err(ChainError::NoStatus));
        f.desc(1, STATUS, 0, WRITE, 0); // empty status
        f.offer(0, 3);
        assert_eq!(f.pop(), Err(ChainError::NoStatus));
        f.desc(1, HOLE + 16, 1, WRITE, 0); // status in the hole
        f.offer(0, 4);
        assert_eq!(f.pop(), Err(ChainError::StatusOutsideMemory));
        f.desc(1, u64::MAX, 2, WRITE, 0); // status address overflows
        f.offer(0, 5);
        assert_eq!(f.pop(), Err(ChainError::StatusOutsideMemory));
    }

    #[test]
    fn descriptor_loops_and_overlong_chains_are_truncated_chains() {
        let mut f = fixture();
        f.desc(0, HDR, 16, NEXT, 1);
        f.desc(1, STATUS, 1, NEXT, 0); // 0 → 1 → 0 → ...
        f.offer(0, 1);
        assert_eq!(f.pop(), Err(ChainError::Truncated));
        // Every descriptor chained: the chain is as long as the queue and still says NEXT.
        for i in 0..QSIZE {
            f.desc(i, HDR, 16, NEXT, (i + 1) % QSIZE);
        }
        f.offer(3, 2);
        assert_eq!(f.pop(), Err(ChainError::Truncated));
    }

    #[test]
    fn next_and_head_indices_out_of_range_break_the_chain() {
        let mut f = fixture();
        f.desc(0, HDR, 16, NEXT, QSIZE + 3);
        f.offer(0, 1);
        assert_eq!(f.pop(), Err(ChainError::Truncated));
        f.offer(QSIZE + 1, 2);
        assert_eq!(f.pop(), Err(ChainError::Empty));
    }

    #[test]
    fn an_avail_index_jump_beyond_the_queue_size_is_refused() {
        let mut f = fixture();
        f.mem
            .write_obj(QSIZE + 1, GuestAddress(AVAIL + 2))
            .expect("idx");
        assert!(f.queue.iter(&f.mem).is_err());
    }

    #[test]
    fn indirect_tables_work_and_bad_ones_break_the_chain() {
        let table = 0x8000;
        let mut f = fixture();
        f.header(HDR, VIRTIO_BLK_T_IN, 0);
        f.desc_at(table, 0, HDR, 16, NEXT, 1);
        f.desc_at(table, 1, DATA, 512, WRITE | NEXT, 2);
        f.desc_at(table, 2, STATUS, 1, WRITE, 0);
        f.desc(0, table, 48, INDIRECT, 0);
        f.offer(0, 1);
        let req = f.pop().expect("indirect chain");
        assert_eq!(f.run(&req, &ctx()).status, OK);

        // Misaligned table length.
        f.desc(0, table, 40, INDIRECT, 0);
        f.offer(0, 2);
        assert_eq!(f.pop(), Err(ChainError::Empty));
        // Nested indirect table.
        f.desc_at(table, 1, table, 48, INDIRECT, 0);
        f.desc(0, table, 48, INDIRECT, 0);
        f.offer(0, 3);
        assert_eq!(f.pop(), Err(ChainError::Truncated));
        // Table outside RAM.
        f.desc(0, HOLE, 48, INDIRECT, 0);
        f.offer(0, 4);
        assert_eq!(f.pop(), Err(ChainError::Empty));
        // A table longer than the device accepts.
        let n = (MAX_DESCRIPTORS + 8) as u16;
        for i in 0..n {
            f.desc_at(0x2_0000, i, DATA, 512, NEXT, i + 1);
        }
        f.desc(0, 0x2_0000, u32::from(n) * 16, INDIRECT, 0);
        f.offer(0, 5);
        assert_eq!(f.pop(), Err(ChainError::TooLong));
    }

    #[test]
    fn short_headers_are_io_errors() {
        let mut f = fixture();
        f.desc(0, HDR, 8, NEXT, 1);
        f.desc(1, STATUS, 1, WRITE, 0);
        f.offer(0, 1);
        let req = f.pop().expect("parse");
        assert_eq!(req.header, None);
        assert_eq!(f.run(&req, &ctx()).status, IOERR);
    }

    #[test]
    fn unknown_request_types_are_unsupported() {
        let mut f = fixture();
        let req = f.simple(0x77, 0, DATA, 512, WRITE).expect("parse");
        assert_eq!(f.run(&req, &ctx()).status, UNSUPP);
    }

    #[test]
    fn flush_and_get_id_complete() {
        let mut f = fixture();
        let req = f
            .simple(VIRTIO_BLK_T_FLUSH, 0, DATA, 0, WRITE)
            .expect("parse flush");
        assert_eq!(f.run(&req, &ctx()).status, OK);
        let req = f
            .simple(VIRTIO_BLK_T_GET_ID, 0, DATA, 20, WRITE)
            .expect("parse id");
        assert_eq!(
            f.run(&req, &ctx()),
            Completion {
                status: OK,
                used_len: 21
            }
        );
        let mut id = [0xffu8; 20];
        f.mem.read_slice(&mut id, GuestAddress(DATA)).expect("id");
        assert_eq!(id.get(..15), Some(&b"capvm-serial-01"[..]));
        assert_eq!(id.get(15..), Some(&[0u8; 5][..]));
    }

    fn range(f: &Fixture, sector: u64, sectors: u32, flags: u32) {
        f.mem
            .write_obj(sector.to_le(), GuestAddress(DATA))
            .expect("sector");
        f.mem
            .write_obj(sectors.to_le(), GuestAddress(DATA + 8))
            .expect("count");
        f.mem
            .write_obj(flags.to_le(), GuestAddress(DATA + 12))
            .expect("flags");
    }

    #[test]
    fn write_zeroes_and_discard_clear_their_range() {
        let mut f = fixture();
        range(&f, 8, 8, 0);
        let req = f
            .simple(VIRTIO_BLK_T_WRITE_ZEROES, 0, DATA, 16, 0)
            .expect("parse");
        assert_eq!(f.run(&req, &ctx()).status, OK);
        let disk = f.disk_bytes();
        assert!(disk.get(4096..8192).expect("range").iter().all(|&b| b == 0));
        assert_ne!(disk.get(8192), Some(&0));

        range(&f, 64, 16, 0);
        let req = f
            .simple(VIRTIO_BLK_T_DISCARD, 0, DATA, 16, 0)
            .expect("parse");
        assert_eq!(f.run(&req, &ctx()).status, OK);
        let disk = f.disk_bytes();
        assert_eq!(disk.len(), DISK_BYTES);
        assert!(
            disk.get(32768..40960)
                .expect("range")
                .iter()
                .all(|&b| b == 0)
        );
    }

    #[test]
    fn bad_ranges_are_refused() {
        let cases: [(u32, u64, u32, u32, Context, u8); 6] = [
            (VIRTIO_BLK_T_DISCARD, 0, 8, 1, ctx(), UNSUPP), // unmap on discard
            (VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 2, ctx(), UNSUPP), // reserved flag
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                (DISK_BYTES / 512) as u64,
                8,
                0,
                ctx(),
                IOERR,
            ),
            (VIRTIO_BLK_T_WRITE_ZEROES, 0, 0, 0, ctx(), IOERR),
            (
                VIRTIO_BLK_T_DISCARD,
                0,
                8,
                0,
                Context {
                    discard: false,
                    ..ctx()
                },
                UNSUPP,
            ),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                0,
                8,
                0,
                Context {
                    read_only: true,
                    ..ctx()
                },
                IOERR,
            ),
        ];
        for (kind, sector, sectors, flags, c, want) in cases {
            let mut f = fixture();
            let before = f.disk_bytes();
            range(&f, sector, sectors, flags);
            let req = f.simple(kind, 0, DATA, 16, 0).expect("parse");
            assert_eq!(
                f.run(&req, &c).status,
                want,
                "{kind} {sector} {sectors} {flags}"
            );
            assert_eq!(f.disk_bytes(), before);
        }
        let mut f = fixture();
        let req = f
            .simple(VIRTIO_BLK_T_DISCARD, 0, DATA, 15, 0)
            .expect("parse");
        assert_eq!(f.run(&req, &ctx()).status, IOERR);
    }
}
