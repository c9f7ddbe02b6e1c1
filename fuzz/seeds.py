#!/usr/bin/env python3
"""Writes seed inputs for the ring fuzz targets (blk_request, net_ctrl) into
fuzz/corpus/<target>/: well-formed requests as a Linux driver lays them out, in the layout
capvm_fuzz::ring (fuzz/src/lib.rs) reads. From these the fuzzer mutates its way into the
request paths at once instead of having to discover a valid ring, chain and header by chance.

Usage: fuzz/seeds.py [CORPUS_DIR]   (default: fuzz/corpus next to this file)
"""

import os
import struct
import sys

AVAIL = 0x10
DESC = 0x400

NEXT, WRITE, INDIRECT = 1, 2, 4


class Image:
    """Guest memory from address 0, grown as it is written."""

    def __init__(self):
        self.mem = bytearray()

    def put(self, at, data):
        end = at + len(data)
        if len(self.mem) < end:
            self.mem.extend(b"\0" * (end - len(self.mem)))
        self.mem[at:end] = data

    def desc(self, table, i, addr, length, flags, nxt=0):
        self.put(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def chain(self, table, first, buffers):
        """Lays out `buffers` ((address, length, device-writable) each) as a chain from
        descriptor `first` of `table`; returns the next free descriptor."""
        for j, (addr, length, writable) in enumerate(buffers):
            last = j == len(buffers) - 1
            flags = (WRITE if writable else 0) | (0 if last else NEXT)
            self.desc(table, first + j, addr, length, flags, 0 if last else first + j + 1)
        return first + len(buffers)

    def avail(self, heads):
        self.put(AVAIL, struct.pack("<HH", 0, len(heads)))
        for i, h in enumerate(heads):
            self.put(AVAIL + 4 + 2 * i, struct.pack("<H", h))


def seed(size, flags, image):
    return struct.pack("<HB", size, flags) + bytes(image.mem)


# virtio-blk request types
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
HDRS, STATUS, SEGS, INDIRECT_TABLE, DATA = 0x220, 0x2A0, 0x2C0, 0x300, 0x2000


def blk_seeds():
    """(name, input) pairs: each request kind alone, then all of them in one ring."""
    # (type, sector, data descriptors as (address, length, device-writable))
    kinds = {
        "read": (T_IN, 0, [(DATA, 4096, True)]),
        "write": (T_OUT, 8, [(DATA, 512, False)]),
        "read-two-segments": (T_IN, 16, [(DATA, 512, True), (DATA + 0x1000, 3584, True)]),
        "flush": (T_FLUSH, 0, []),
        "get-id": (T_GET_ID, 0, [(DATA, 20, True)]),
        "discard": (T_DISCARD, 0, [(SEGS, 16, False)]),
        "write-zeroes": (T_WRITE_ZEROES, 0, [(SEGS, 16, False)]),
    }

    def request(img, table, first, n, kind):
        """Lays out request `n` of `kind` from descriptor `first` of `table`; returns the next
        free descriptor."""
        typ, sector, data = kinds[kind]
        img.put(HDRS + 16 * n, struct.pack("<IIQ", typ, 0, sector))
        return img.chain(table, first, [(HDRS + 16 * n, 16, False)] + data + [(STATUS + n, 1, True)])

    # One discard/write-zeroes segment: sector 0, 8 sectors, no flags.
    segment = struct.pack("<QII", 0, 8, 0)
    out = []
    for kind in kinds:
        img = Image()
        img.put(SEGS, segment)
        request(img, DESC, 0, 0, kind)
        img.avail([0])
        out.append((f"seed-{kind}", seed(16, 0x4, img)))
    # Every kind in one ring of 32, EVENT_IDX on.
    img = Image()
    img.put(SEGS, segment)
    heads, nxt = [], 0
    for n, kind in enumerate(kinds):
        heads.append(nxt)
        nxt = request(img, DESC, nxt, n, kind)
    img.avail(heads)
    out.append(("seed-all", seed(32, 0x5, img)))
    # An indirect read: one descriptor pointing at a table of three.
    img = Image()
    img.desc(DESC, 0, INDIRECT_TABLE, 48, INDIRECT)
    request(img, INDIRECT_TABLE, 0, 0, "read")
    img.avail([0])
    out.append(("seed-indirect-read", seed(16, 0x4, img)))
    return out


# virtio-net control commands: (class, command, data, whether dev-net accepts it). dev-net
# offers CTRL_RX and MQ; MAC_ADDR_SET (CTRL_MAC_ADDR) and VLAN filtering are refused.
CTRL = {
    "rx-promisc": (0, 0, b"\x01", True),
    "rx-allmulti": (0, 1, b"\x00", True),
    "mac-table-set": (1, 0, struct.pack("<I", 1) + b"\x52\x54\x00\x12\x34\x56" + struct.pack("<I", 0), True),
    "vq-pairs-set": (4, 0, struct.pack("<H", 2), True),
    "mac-addr-set": (1, 1, b"\x52\x54\x00\x12\x34\x57", False),
    "vlan-add": (2, 0, struct.pack("<H", 100), False),
}


def net_seeds():
    out = []
    for name, (cls, cmd, data, accepted) in CTRL.items():
        img = Image()
        img.put(HDRS, bytes([cls, cmd]))
        descs = [(HDRS, 2, False)]
        if data:
            img.put(SEGS, data)
            descs.append((SEGS, len(data), False))
        descs.append((STATUS, 1, True))
        img.chain(DESC, 0, descs)
        img.avail([0])
        # flags: MQ negotiated, the device offers 4 pairs.
        verdict = "ok" if accepted else "err"
        out.append((f"seed-{verdict}-{name}", seed(16, 0x42, img)))
    return out


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus")
    for target, seeds in (("blk_request", blk_seeds()), ("net_ctrl", net_seeds())):
        d = os.path.join(root, target)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds:
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        print(f"{target}: {len(seeds)} seeds in {d}")


if __name__ == "__main__":
    main()
