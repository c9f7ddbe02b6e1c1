//! dev-net, the real sandboxed binary, started the way the supervisor starts it, with a tap in
//! a network namespace the test creates, driven by a split-ring driver playing the guest
//! (`tests::virtio_driver`). The "guest" (`198.18.0.2` / `2001:db8::2`) exchanges real frames with
//! the namespace's kernel (`198.18.0.1` / `2001:db8::1` on the tap): ARP, ICMP and `ICMPv6` echo,
//! UDP both ways, checksum offload, a 60 000-byte frame through merged receive buffers,
//! hostile headers and chains, a tap deleted under the device, and a throughput figure.
//!
//! Needs root (namespaces, the sandbox) and `/dev/net/tun`; skips with a reason otherwise.
//! Build the binary first: `cargo build -p dev-net`. Nothing outside the namespace is touched.

// Packet fields are built from small constants; the casts cannot truncate.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use proto::bootstrap::{Bootstrap, FdRole, Role, SandboxSettings};
use proto::channel::{Channel, ChannelKind};
use proto::device::{
    DeviceInfo, DeviceSetup, FromDevice, MemoryRegion, NetSetup, QueueConfig, ToDevice,
};
use supervisor::spawn;
use tests::virtio_driver::{Buf, GuestRam, SplitQueue, Used};

const RAM: u64 = 16 << 20;
const QSIZE: u16 = 256;
const WAIT: Duration = Duration::from_secs(10);
const RXQ_BASE: u64 = 0x1_0000;
const TXQ_BASE: u64 = 0x2_0000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x40_0000;
const TX_SLOT: u64 = 0x2_0000;
const TX_SLOTS: u16 = 64;
const HDR: usize = 12;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0xc0, 0xff, 0xee];
const GUEST_IP: [u8; 4] = [198, 18, 0, 2];
const HOST_IP: [u8; 4] = [198, 18, 0, 1];
const GUEST_IP6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const HOST_IP6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const TAP: &str = "dn0";
const F_NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;

fn skip() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: dev-net tests need root (network namespaces, the sandbox)");
        return true;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP: dev-net tests need /dev/net/tun");
        return true;
    }
    false
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new() -> NetNs {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "capvm-dn-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        ip(&["netns", "add", &name]);
        NetNs(name)
    }

    /// Runs `f` on a thread inside the namespace (sockets it creates stay in it).
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = File::open(path).expect("open netns");
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.0];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Creates the tap inside the namespace (the fd stays valid wherever it goes), addresses
    /// it and brings it up; the guest's addresses get permanent neighbour entries.
    fn tap(&self) -> OwnedFd {
        let fd = self.run(|| {
            let tun = OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .expect("open /dev/net/tun");
            let mut ifr = [0u8; 40];
            ifr[..TAP.len()].copy_from_slice(TAP.as_bytes());
            ifr[16..18].copy_from_slice(&(0x0002u16 | 0x1000 | 0x4000).to_ne_bytes());
            // SAFETY: TUNSETIFF reads and writes one `struct ifreq` (40 bytes) at the pointer,
            // which points at `ifr`, alive for the call; `tun` is an open /dev/net/tun.
            let r = unsafe { nix::libc::ioctl(tun.as_raw_fd(), 0x4004_54ca, ifr.as_mut_ptr()) };
            assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            OwnedFd::from(tun)
        });
        let mac = HOST_MAC
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let guest_mac = GUEST_MAC
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        self.ip(&["link", "set", "lo", "up"]);
        self.ip(&["link", "set", TAP, "address", &mac, "mtu", "65521"]);
        self.ip(&["addr", "add", "198.18.0.1/24", "dev", TAP]);
        self.ip(&["addr", "add", "2001:db8::1/64", "dev", TAP, "nodad"]);
        self.ip(&["link", "set", TAP, "up"]);
        for addr in ["198.18.0.2", "2001:db8::2"] {
            self.ip(&[
                "neigh",
                "replace",
                addr,
                "lladdr",
                &guest_mac,
                "dev",
                TAP,
                "nud",
                "permanent",
            ]);
        }
        fd
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A running dev-net with a guest and a runner played by the test.
struct Harness {
    ns: NetNs,
    running: Option<spawn::Running>,
    runner: Channel,
    ram: GuestRam,
    log: tempfile::NamedTempFile,
    info: DeviceInfo,
    rx: SplitQueue,
    tx: SplitQueue,
    rx_buf_len: u32,
    /// Used receive elements not consumed yet.
    rx_used: VecDeque<Used>,
    tx_free: Vec<u16>,
    /// Receive buffers go back on the ring once read.
    repost: bool,
    /// Receive buffers [`Harness::activate`] posts.
    rx_posted: u16,
}

/// One received frame: its virtio header bytes and the Ethernet frame.
struct Frame {
    hdr: [u8; HDR],
    data: Vec<u8>,
}

impl Frame {
    fn num_buffers(&self) -> u16 {
        u16::from_le_bytes([self.hdr[10], self.hdr[11]])
    }
}

impl Harness {
    fn start(rx_buf_len: u32) -> Harness {
        let ns = NetNs::new();
        let tap = ns.tap();
        let ram = GuestRam::new(RAM).expect("guest RAM");
        let log = tempfile::NamedTempFile::new().expect("log file");
        let (runner, theirs) = Channel::pair().expect("device channel");
        let (uid, gid) = sandbox::nobody();
        let boot = Bootstrap {
            role: Role::DevNet { index: 0 },
            vm_name: "net-test".into(),
            sandbox: SandboxSettings {
                uid,
                gid,
                max_fds: 64,
            },
            fds: vec![
                FdRole::Log,
                FdRole::GuestMemory,
                FdRole::Tap,
                FdRole::DeviceChannel,
            ],
            log_filter: "debug".into(),
        };
        let log_fd = log.reopen().expect("log fd");
        let running = spawn::spawn(
            &tests::harness::build_dir().join("dev-net"),
            &boot,
            &[log_fd.as_fd(), ram.fd(), tap.as_fd(), theirs.as_fd()],
        )
        .expect("spawn dev-net (run `cargo build -p dev-net` first)");
        drop((theirs, tap));
        let setup = DeviceSetup::Net(NetSetup {
            memory: vec![MemoryRegion {
                guest_addr: 0,
                size: RAM,
                file_offset: 0,
            }],
            mac: GUEST_MAC,
            mtu: 1500,
            queue_pairs: 1,
        });
        running.channel.send(&setup, &[]).expect("send setup");
        runner
            .handshake_timeout(ChannelKind::RunnerDevice, WAIT)
            .expect("handshake");
        let info = match runner.recv_timeout::<FromDevice>(WAIT).expect("info").msg {
            FromDevice::Info(info) => info,
            other => panic!("expected Info, got {other:?}"),
        };
        info.validate().expect("valid info");
        let rx = SplitQueue::new(&ram, RXQ_BASE, QSIZE).expect("rx queue");
        let tx = SplitQueue::new(&ram, TXQ_BASE, QSIZE).expect("tx queue");
        let mut h = Harness {
            ns,
            running: Some(running),
            runner,
            ram,
            log,
            info,
            rx,
            tx,
            rx_buf_len,
            rx_used: VecDeque::new(),
            tx_free: (0..TX_SLOTS).rev().collect(),
            repost: true,
            rx_posted: QSIZE,
        };
        let features = h.info.features;
        h.activate(features);
        h
    }

    fn pid(&self) -> u32 {
        self.running.as_ref().expect("running").process.id()
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        self.running
            .as_mut()
            .expect("running")
            .process
            .try_wait()
            .expect("try_wait")
            .is_none()
    }

    /// Fresh rings, every receive buffer posted, then `Activate` with `features`.
    fn activate(&mut self, features: u64) {
        self.rx = SplitQueue::new(&self.ram, RXQ_BASE, QSIZE).expect("rx queue");
        self.tx = SplitQueue::new(&self.ram, TXQ_BASE, QSIZE).expect("tx queue");
        let event_idx = features & (1 << 29) != 0;
        self.rx.set_event_idx(event_idx);
        self.tx.set_event_idx(event_idx);
        self.rx_used.clear();
        self.tx_free = (0..TX_SLOTS).rev().collect();
        for i in 0..self.rx_posted {
            self.post_rx(i);
        }
        let configs: Vec<QueueConfig> = [(0u16, &self.rx), (1, &self.tx)]
            .iter()
            .map(|(index, q)| QueueConfig {
                index: *index,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
            })
            .collect();
        let fds = [
            self.rx.kick.as_fd(),
            self.rx.call.as_fd(),
            self.tx.kick.as_fd(),
            self.tx.call.as_fd(),
        ];
        self.runner
            .send(
                &ToDevice::Activate {
                    features,
                    queues: configs,
                },
                &fds,
            )
            .expect("activate");
        let reply = self.runner_msg();
        assert_eq!(reply, FromDevice::Activated, "log:\n{}", self.log_text());
        self.rx.notify(&self.ram);
    }

    fn runner_msg(&self) -> FromDevice {
        self.runner
            .recv_timeout::<FromDevice>(WAIT)
            .unwrap_or_else(|e| panic!("runner message: {e}; log:\n{}", self.log_text()))
            .msg
    }

    fn reset(&mut self) {
        self.runner.send(&ToDevice::Reset, &[]).expect("reset");
        assert_eq!(self.runner_msg(), FromDevice::ResetDone);
    }

    /// Puts receive buffer `i` (descriptor `i`) on the ring.
    fn post_rx(&mut self, i: u16) {
        let addr = RX_BUFS + u64::from(i) * u64::from(self.rx_buf_len);
        let head = self
            .rx
            .add_chain_at(&self.ram, i, &[Buf::input(addr, self.rx_buf_len)]);
        self.rx.publish(&self.ram, head);
    }

    fn rx_addr(&self, id: u32) -> u64 {
        RX_BUFS + u64::from(id) * u64::from(self.rx_buf_len)
    }

    /// The next received frame, reassembled from its merged buffers (which are reposted).
    fn recv(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        let need = |h: &mut Harness, n: usize| -> bool {
            while h.rx_used.len() < n {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                if let Ok(u) = h.rx.wait_some(&h.ram, left.min(Duration::from_millis(200))) {
                    h.rx_used.extend(u);
                }
            }
            true
        };
        if !need(self, 1) {
            return None;
        }
        let first = self.rx_used[0];
        let hdr_bytes = self.ram.read(self.rx_addr(first.id), HDR);
        let mut hdr = [0u8; HDR];
        hdr.copy_from_slice(&hdr_bytes);
        let count = usize::from(u16::from_le_bytes([hdr[10], hdr[11]]).max(1));
        assert!(need(self, count), "frame of {count} buffers incomplete");
        let mut data = Vec::new();
        for k in 0..count {
            let u = self.rx_used.pop_front().expect("used");
            let bytes = self.ram.read(self.rx_addr(u.id), u.len as usize);
            data.extend_from_slice(if k == 0 { &bytes[HDR..] } else { &bytes });
            if self.repost {
                self.post_rx(u.id as u16);
            }
        }
        self.rx.notify(&self.ram);
        Some(Frame { hdr, data })
    }

    /// Waits for a frame `want` accepts, dropping others (IPv6 router solicitations, ...).
    fn recv_matching(&mut self, timeout: Duration, want: impl Fn(&Frame) -> bool) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let f = self.recv(left)?;
            if want(&f) {
                return Some(f);
            }
        }
    }

    /// Waits for transmitted chains to come back and frees their slots.
    fn reclaim_tx(&mut self) {
        let got = self
            .tx
            .wait_some(&self.ram, WAIT)
            .unwrap_or_else(|e| panic!("tx: {e}; log:\n{}", self.log_text()));
        for u in got {
            assert_eq!(u.len, 0, "transmit buffers come back with length 0");
            self.tx_free.push(u.id as u16 / 2);
        }
    }

    /// Queues `bufs` (relative to a free transmit slot) and notifies.
    fn send_chain(&mut self, content: &[u8], split: &[Buf]) -> u16 {
        if self.tx_free.is_empty() {
            self.reclaim_tx();
        }
        let slot = self.tx_free.pop().expect("free tx slot");
        let base = TX_BUFS + u64::from(slot) * TX_SLOT;
        self.ram.write(base, content);
        let bufs: Vec<Buf> = split
            .iter()
            .map(|b| Buf {
                addr: if b.addr >= RAM { b.addr } else { base + b.addr },
                ..*b
            })
            .collect();
        let head = self.tx.add_chain_at(&self.ram, slot * 2, &bufs);
        self.tx.publish(&self.ram, head);
        self.tx.notify(&self.ram);
        head
    }

    /// Sends one frame with virtio header `hdr` in one buffer.
    fn send(&mut self, hdr: [u8; HDR], frame: &[u8]) {
        let mut content = hdr.to_vec();
        content.extend_from_slice(frame);
        let len = content.len() as u32;
        self.send_chain(&content, &[Buf::out(0, len)]);
    }

    /// Sends and waits for the chain to come back.
    fn send_wait(&mut self, hdr: [u8; HDR], frame: &[u8]) {
        self.send(hdr, frame);
        self.drain_tx();
    }

    /// Waits until every transmitted chain came back.
    fn drain_tx(&mut self) {
        while self.tx_free.len() < usize::from(TX_SLOTS) {
            self.reclaim_tx();
        }
    }

    /// Pings the namespace's kernel and waits for its reply.
    fn ping(&mut self, id: u16, seq: u16, payload: &[u8]) -> Option<Frame> {
        self.send(plain(), &icmp_echo(id, seq, payload, true));
        self.recv_matching(Duration::from_secs(3), |f| is_echo_reply(&f.data, id, seq))
    }

    /// Stops the device (closing the bootstrap channel) and returns its log.
    fn stop(&mut self) -> String {
        if let Some(mut r) = self.running.take() {
            drop(r.channel);
            for _ in 0..300 {
                if r.process.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = r.process.kill();
            let _ = r.process.wait();
        }
        self.log_text()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop();
    }
}

/// CPU time (user + system) of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// Asserts that `pid` burns (almost) no CPU for a second.
fn assert_idle(pid: u32, what: &str) {
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    assert!(used <= 5, "{what}: {used} ticks of CPU in an idle second");
}

// --- Packets ------------------------------------------------------------------------------

fn plain() -> [u8; HDR] {
    [0; HDR]
}

fn csum_hdr(start: u16, offset: u16) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[0] = F_NEEDS_CSUM;
    h[6..8].copy_from_slice(&start.to_le_bytes());
    h[8..10].copy_from_slice(&offset.to_le_bytes());
    h
}

/// Internet checksum of `data` with `seed` (an unfolded sum).
fn checksum(data: &[u8], seed: u32) -> u16 {
    let mut sum = seed;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn eth(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ipv4(proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&GUEST_IP);
    h.extend_from_slice(&HOST_IP);
    let c = checksum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An ICMP echo request frame to the host; with `fill_csum` false the checksum is zero.
fn icmp_echo(id: u16, seq: u16, payload: &[u8], fill_csum: bool) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    if fill_csum {
        let c = checksum(&m, 0);
        m[2..4].copy_from_slice(&c.to_be_bytes());
    }
    eth(HOST_MAC, 0x0800, &ipv4(1, &m))
}

fn is_echo_reply(f: &[u8], id: u16, seq: u16) -> bool {
    f.len() >= 42
        && f[12..14] == [0x08, 0x00]
        && f[23] == 1
        && f[26..30] == HOST_IP
        && f[30..34] == GUEST_IP
        && f[34] == 0
        && f[38..40] == id.to_be_bytes()
        && f[40..42] == seq.to_be_bytes()
}

fn udp4(dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = 4000u16.to_be_bytes().to_vec();
    u.extend_from_slice(&dst_port.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]); // no checksum (IPv4 allows it)
    u.extend_from_slice(payload);
    eth(HOST_MAC, 0x0800, &ipv4(17, &u))
}

fn icmp6_echo(id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![128, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    // Pseudo-header: addresses, upper-layer length, next header 58.
    let mut pseudo = GUEST_IP6.to_vec();
    pseudo.extend_from_slice(&HOST_IP6);
    pseudo.extend_from_slice(&(m.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&m);
    let c = checksum(&pseudo, 0);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(m.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[58, 64]);
    ip.extend_from_slice(&GUEST_IP6);
    ip.extend_from_slice(&HOST_IP6);
    ip.extend_from_slice(&m);
    eth(HOST_MAC, 0x86dd, &ip)
}

// --- Tests --------------------------------------------------------------------------------

#[test]
fn arp_icmp_and_icmpv6_echo_get_the_kernels_replies() {
    if skip() {
        return;
    }
    let mut h = Harness::start(2048);
    // ARP request: who has 198.18.0.1? tell 198.18.0.2.
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&GUEST_IP);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&HOST_IP);
    h.send(plain(), &eth([0xff; 6], 0x0806, &arp));
    let reply = h
        .recv_matching(WAIT, |f| f.data.len() >= 42 && f.data[12..14] == [8, 6])
        .unwrap_or_else(|| panic!("no ARP reply; log:\n{}", h.log_text()));
    let r = &reply.data;
    assert_eq!(r[..6], GUEST_MAC, "to the guest");
    assert_eq!(r[20..22], [0, 2], "an ARP reply");
    assert_eq!(r[22..28], HOST_MAC, "sender MAC is the tap's");
    assert_eq!(r[28..32], HOST_IP);
    assert_eq!(r[32..38], GUEST_MAC);
    assert_eq!(r[38..42], GUEST_IP);

    let payload: Vec<u8> = (0..56u8).collect();
    let reply = h
        .ping(0x1234, 7, &payload)
        .unwrap_or_else(|| panic!("no echo reply; log:\n{}", h.log_text()));
    assert_eq!(reply.data[..6], GUEST_MAC);
    assert_eq!(reply.data[42..], payload[..], "echoed payload");

    // ICMPv6 echo to 2001:db8::1.
    let payload6 = b"capvm dev-net ipv6 echo".to_vec();
    h.send(plain(), &icmp6_echo(0x4242, 3, &payload6));
    let reply = h
        .recv_matching(WAIT, |f| {
            let d = &f.data;
            d.len() > 62 && d[12..14] == [0x86, 0xdd] && d[20] == 58 && d[54] == 129
        })
        .unwrap_or_else(|| panic!("no ICMPv6 echo reply; log:\n{}", h.log_text()));
    let d = &reply.data;
    assert_eq!(d[22..38], HOST_IP6, "from 2001:db8::1");
    assert_eq!(d[38..54], GUEST_IP6, "to 2001:db8::2");
    assert_eq!(d[58..60], 0x4242u16.to_be_bytes());
    assert_eq!(d[60..62], 3u16.to_be_bytes());
    assert_eq!(d[62..], payload6[..]);

    // The process serving all this is in capability mode.
    tests::procfs::assert_sandboxed(h.pid()).expect("sandboxed");
    assert_eq!(
        fs::read_dir(format!("/proc/{}/root", h.pid()))
            .expect("root")
            .count(),
        0,
        "its root is empty"
    );
    assert!(h.log_text().contains("in capability mode"));
}

#[test]
fn checksum_offload_completes_a_zero_checksum() {
    if skip() {
        return;
    }
    let mut h = Harness::start(2048);
    let payload = [0x5a; 32];
    // Without NEEDS_CSUM a zero ICMP checksum is wrong: the kernel drops the request.
    h.send(plain(), &icmp_echo(1, 1, &payload, false));
    assert!(
        h.recv_matching(Duration::from_millis(700), |f| is_echo_reply(&f.data, 1, 1))
            .is_none(),
        "the kernel answered an echo with a bad checksum"
    );
    // With NEEDS_CSUM at the ICMP header (start 34, checksum at +2) it is completed.
    h.send(csum_hdr(34, 2), &icmp_echo(1, 2, &payload, false));
    let reply = h
        .recv_matching(WAIT, |f| is_echo_reply(&f.data, 1, 2))
        .unwrap_or_else(|| panic!("no reply to a NEEDS_CSUM echo; log:\n{}", h.log_text()));
    assert_eq!(reply.data[42..], payload[..]);
}

#[test]
fn a_60000_byte_datagram_arrives_through_small_merged_buffers() {
    if skip() {
        return;
    }
    let mut h = Harness::start(512);
    let payload: Vec<u8> = (0..60_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sent = payload.clone();
    h.ns.run(move || {
        let s = UdpSocket::bind("198.18.0.1:5000").expect("bind");
        s.send_to(&sent, "198.18.0.2:6000").expect("send");
    });
    let f = h
        .recv_matching(WAIT, |f| f.data.len() > 42 && f.data[23] == 17)
        .unwrap_or_else(|| panic!("no datagram; log:\n{}", h.log_text()));
    assert_eq!(f.data.len(), 14 + 20 + 8 + 60_000, "one unfragmented frame");
    assert_eq!(
        usize::from(f.num_buffers()),
        (HDR + f.data.len()).div_ceil(512),
        "num_buffers"
    );
    assert_eq!(f.data[36..38], 6000u16.to_be_bytes());
    assert_eq!(f.data[42..], payload[..], "payload intact");
    // GUEST_CSUM was negotiated: the kernel leaves the UDP checksum to the guest.
    assert_eq!(f.hdr[0] & F_NEEDS_CSUM, F_NEEDS_CSUM);
    assert_eq!(u16::from_le_bytes([f.hdr[6], f.hdr[7]]), 34, "csum_start");
    assert_eq!(u16::from_le_bytes([f.hdr[8], f.hdr[9]]), 6, "csum_offset");
    // And the device still answers small frames afterwards.
    assert!(h.ping(9, 9, b"after").is_some());
}

#[test]
fn hostile_frames_are_dropped_and_the_device_serves_on() {
    if skip() {
        return;
    }
    let mut h = Harness::start(2048);
    let echo = icmp_echo(5, 1, &[1; 16], true);
    let len = echo.len() as u16;
    let mut gso_zero = csum_hdr(34, 2);
    gso_zero[1] = GSO_TCPV4;
    let mut long_hdr = csum_hdr(34, 2);
    long_hdr[2..4].copy_from_slice(&(len + 1).to_le_bytes());
    let mut bad_flags = plain();
    bad_flags[0] = 2; // DATA_VALID is receive-only
    let headers: [([u8; HDR], &[u8]); 6] = [
        (csum_hdr(len - 1, 0), &echo), // csum_start past the end
        (csum_hdr(34, len), &echo),    // csum_offset past the end
        (gso_zero, &echo),             // GSO with gso_size 0
        (long_hdr, &echo),             // hdr_len > frame length
        (plain(), &echo[..13]),        // runt
        (bad_flags, &echo),
    ];
    for (hdr, frame) in headers {
        h.send_wait(hdr, frame);
    }
    // A 70 000-byte chain (over any frame size), a plain frame over the MTU.
    let big = vec![0u8; 70_000];
    h.send_chain(&big, &[Buf::out(0, 35_000), Buf::out(35_000, 35_000)]);
    h.drain_tx();
    h.send_wait(plain(), &eth(HOST_MAC, 0x0800, &[0; 2000]));
    // Descriptor abuse: a device-writable buffer, a buffer outside RAM, 100 descriptors (one
    // at a time: the long chain borrows other slots' descriptors).
    h.send_chain(&echo, &[Buf::input(0, 100)]);
    h.drain_tx();
    h.send_chain(&echo, &[Buf::out(0, 12), Buf::out(RAM + 0x1000, 100)]);
    h.drain_tx();
    let many: Vec<Buf> = (0..100).map(|i| Buf::out(i, 1)).collect();
    h.send_chain(&[0u8; 100], &many);
    h.drain_tx();
    assert!(h.alive(), "dev-net died; log:\n{}", h.log_text());
    // None of them reached the kernel (no echo reply for id 5), and pings still work.
    let reply = h.ping(6, 1, b"still here");
    assert!(reply.is_some(), "no echo reply after the hostile frames");
    let log = h.stop();
    assert!(
        log.contains("tx_bad_headers=8"),
        "six bad headers and two oversized frames counted; log:\n{log}"
    );
    assert!(log.contains("tx_bad_chains=3"), "log:\n{log}");
}

#[test]
fn a_broken_ring_needs_a_reset_and_the_device_serves_again() {
    if skip() {
        return;
    }
    let mut h = Harness::start(2048);
    // A descriptor loop on the transmit queue.
    h.tx.write_desc(&h.ram, 0, TX_BUFS, 16, 1, 1);
    h.tx.write_desc(&h.ram, 1, TX_BUFS, 16, 1, 0);
    h.tx.publish(&h.ram, 0);
    h.tx.kick();
    match h.runner_msg() {
        FromDevice::NeedsReset { reason } => eprintln!("needs reset: {reason}"),
        other => panic!("expected NeedsReset, got {other:?}"),
    }
    assert!(h.alive());
    h.reset();
    let features = h.info.features;
    h.activate(features);
    assert!(h.ping(7, 1, b"after reset").is_some());
}

#[test]
fn without_event_idx_every_frame_still_interrupts() {
    if skip() {
        return;
    }
    let mut h = Harness::start(2048);
    h.reset();
    let features = h.info.features & !(1 << 29);
    h.activate(features);
    for seq in 0..20 {
        assert!(h.ping(8, seq, b"no event idx").is_some(), "ping {seq}");
    }
}

#[test]
fn a_deleted_tap_turns_the_link_down_and_the_process_lives() {
    if skip() {
        return;
    }
    let mut h = Harness::start(2048);
    assert_eq!(h.info.config[6..8], [1, 0], "link up at start");
    assert!(h.ping(3, 1, b"before").is_some());
    h.ns.ip(&["link", "del", TAP]);
    match h.runner_msg() {
        FromDevice::ConfigChanged { config } => {
            assert_eq!(config.len(), h.info.config.len());
            assert_eq!(config[6..8], [0, 0], "link down");
            assert_eq!(config[..6], GUEST_MAC);
        }
        other => panic!("expected ConfigChanged, got {other:?}"),
    }
    assert!(h.alive(), "log:\n{}", h.log_text());
    assert_idle(h.pid(), "after the tap went away");
    // Frames sent now are completed (and dropped); the device still answers the runner.
    h.send_wait(plain(), &icmp_echo(3, 2, b"after", true));
    h.reset();
    let features = h.info.features;
    h.activate(features);
    assert!(h.alive());
    let log = h.stop();
    assert!(log.contains("link down"), "log:\n{log}");
    assert!(log.contains("tx_no_link=1"), "log:\n{log}");
}

#[test]
fn throughput_over_the_tap() {
    if skip() {
        return;
    }
    let mut h = Harness::start(2048);
    let secs = 2.0;
    // Host → guest: a UDP flood from the namespace.
    let flood =
        h.ns.run(|| UdpSocket::bind("198.18.0.1:5001").expect("bind"));
    let sender = std::thread::spawn(move || {
        let buf = [0x77u8; 1472];
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let mut n = 0u64;
        while Instant::now() < end {
            if flood.send_to(&buf, "198.18.0.2:9").is_ok() {
                n += 1;
            }
        }
        n
    });
    let start = Instant::now();
    let (mut frames, mut bytes) = (0u64, 0u64);
    while let Some(f) = h.recv(Duration::from_millis(500)) {
        if f.data.len() == 14 + 20 + 8 + 1472 {
            frames += 1;
            bytes += f.data.len() as u64;
        }
    }
    let elapsed = start.elapsed().as_secs_f64() - 0.5;
    let sent = sender.join().expect("sender");
    eprintln!(
        "host->guest: {frames} of {sent} frames in {elapsed:.2}s: {:.0} frames/s, {:.1} MB/s",
        frames as f64 / elapsed,
        bytes as f64 / elapsed / 1e6
    );
    assert!(frames > 1000, "host->guest frames: {frames}");

    // Guest → host: UDP to a socket in the namespace.
    let sink = h.ns.run(|| {
        let s = UdpSocket::bind("198.18.0.1:5002").expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        s
    });
    let receiver = std::thread::spawn(move || {
        let mut buf = vec![0u8; 2048];
        let (mut n, mut b) = (0u64, 0u64);
        while let Ok((len, _)) = sink.recv_from(&mut buf) {
            n += 1;
            b += len as u64;
        }
        (n, b)
    });
    let frame = udp4(5002, &[0x33; 1472]);
    let mut content = plain().to_vec();
    content.extend_from_slice(&frame);
    let start = Instant::now();
    let mut sent = 0u64;
    let len = content.len() as u32;
    for slot in 0..TX_SLOTS {
        h.ram.write(TX_BUFS + u64::from(slot) * TX_SLOT, &content);
    }
    while start.elapsed().as_secs_f64() < secs {
        while let Some(slot) = h.tx_free.pop() {
            let head = h.tx.add_chain_at(
                &h.ram,
                slot * 2,
                &[Buf::out(TX_BUFS + u64::from(slot) * TX_SLOT, len)],
            );
            h.tx.publish(&h.ram, head);
            sent += 1;
        }
        h.tx.notify(&h.ram);
        h.reclaim_tx();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (got, got_bytes) = receiver.join().expect("receiver");
    eprintln!(
        "guest->host: {got} of {sent} frames in {elapsed:.2}s: {:.0} frames/s, {:.1} MB/s (UDP payload)",
        got as f64 / elapsed,
        got_bytes as f64 / elapsed / 1e6
    );
    assert!(got > 1000, "guest->host frames: {got}");
    let status = fs::read_to_string(format!("/proc/{}/status", h.pid())).expect("status");
    let rss: Vec<&str> = status
        .lines()
        .filter(|l| l.starts_with("VmRSS") || l.starts_with("Rss"))
        .collect();
    eprintln!("dev-net memory after the flood: {}", rss.join(", "));
}

#[test]
fn a_dry_receive_ring_parks_the_tap_until_buffers_come_back() {
    if skip() {
        return;
    }
    let mut h = Harness::start(2048);
    h.reset();
    h.rx_posted = 4;
    h.repost = false;
    let features = h.info.features;
    h.activate(features);
    h.ns.run(|| {
        let s = UdpSocket::bind("198.18.0.1:5003").expect("bind");
        for n in 0..10u8 {
            s.send_to(&[n; 100], "198.18.0.2:7000").expect("send");
        }
    });
    let is_ours = |f: &Frame| f.data.len() == 142 && f.data[36..38] == 7000u16.to_be_bytes();
    let mut got = Vec::new();
    while let Some(f) = h.recv(Duration::from_millis(500)) {
        if is_ours(&f) {
            got.push(f.data[42]);
        }
    }
    assert!(got.len() <= 4, "only 4 buffers were posted: {got:?}");
    // The ring is dry and frames wait in the tap: the device must not spin on it.
    assert_idle(h.pid(), "with a dry receive ring");
    h.repost = true;
    for i in 0..QSIZE {
        h.post_rx(i);
    }
    h.rx.notify(&h.ram);
    while let Some(f) = h.recv(Duration::from_secs(1)) {
        if is_ours(&f) {
            got.push(f.data[42]);
        }
    }
    assert_eq!(
        got,
        (0..10).collect::<Vec<u8>>(),
        "every datagram, in order"
    );
}
