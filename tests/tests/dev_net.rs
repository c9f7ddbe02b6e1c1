//! dev-net, the real sandboxed binary, started the way the supervisor starts it, with a tap in
//! a network namespace the test creates, driven by a split-ring driver playing the guest
//! (`tests::virtio_driver`). The "guest" (`198.18.0.2` / `2001:db8::2`) exchanges real frames with
//! the namespace's kernel (`198.18.0.1` / `2001:db8::1` on the tap): ARP, ICMP and `ICMPv6` echo,
//! UDP both ways, checksum offload, a 60 000-byte frame through merged receive buffers,
//! hostile headers and chains, a tap deleted under the device, and a throughput figure.
//! Guest→host bulk traffic as Linux sends it (`EVENT_IDX`, 64 KiB TSO frames, transmit slots
//! refilled as they complete) while the host sends into the guest: the rings must never stall
//! and every completion must interrupt; and a real TCP stream into a listener in the namespace
//! (the test plays the guest's TCP: handshake, window, go-back-N) must keep being acknowledged.
//! Multi-queue: flows over two pairs after `VQ_PAIRS_SET`, and a dev-net killed and started
//! again on the same rings and tap queues that resumes the driver's pair count.
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
use proto::device::{DeviceInfo, DeviceSetup, FromDevice, MemoryRegion, NetSetup, ToDevice};
use supervisor::spawn;
use tests::virtio_driver::{Buf, GuestRam, SplitQueue, Used, activation};

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
        self.tap_queues(1).pop().expect("one queue")
    }

    /// [`NetNs::tap`] with `n` queues (`IFF_MULTI_QUEUE` when `n` > 1), one fd each.
    fn tap_queues(&self, n: usize) -> Vec<OwnedFd> {
        let fds = self.run(move || {
            (0..n)
                .map(|_| {
                    let tun = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open("/dev/net/tun")
                        .expect("open /dev/net/tun");
                    let mq = if n > 1 { 0x0100u16 } else { 0 };
                    let mut ifr = [0u8; 40];
                    ifr[..TAP.len()].copy_from_slice(TAP.as_bytes());
                    ifr[16..18].copy_from_slice(&(0x0002u16 | 0x1000 | 0x4000 | mq).to_ne_bytes());
                    // SAFETY: TUNSETIFF reads and writes one `struct ifreq` (40 bytes) at the
                    // pointer, which points at `ifr`, alive for the call; `tun` is an open
                    // /dev/net/tun.
                    let r =
                        unsafe { nix::libc::ioctl(tun.as_raw_fd(), 0x4004_54ca, ifr.as_mut_ptr()) };
                    assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
                    OwnedFd::from(tun)
                })
                .collect::<Vec<_>>()
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
        fds
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

/// A sandboxed dev-net that has sent its `Info`, not yet activated.
struct Spawned {
    running: spawn::Running,
    runner: Channel,
    log: tempfile::NamedTempFile,
    info: DeviceInfo,
}

/// Starts dev-net on `ram` with one queue pair per tap queue in `taps` (the first passed
/// where a single-queue NIC's tap goes, the rest after the device channel, as the supervisor
/// does) and waits for its `Info`.
fn spawn_dev_net(ram: &GuestRam, taps: Vec<OwnedFd>, max_fds: u32) -> Spawned {
    let pairs = u16::try_from(taps.len()).expect("pairs");
    let log = tempfile::NamedTempFile::new().expect("log file");
    let (runner, theirs) = Channel::pair().expect("device channel");
    let (uid, gid) = sandbox::nobody();
    let mut roles = vec![
        FdRole::Log,
        FdRole::GuestMemory,
        FdRole::Tap,
        FdRole::DeviceChannel,
    ];
    roles.extend(taps.iter().skip(1).map(|_| FdRole::Tap));
    let boot = Bootstrap {
        role: Role::DevNet { index: 0 },
        vm_name: "net-test".into(),
        sandbox: SandboxSettings { uid, gid, max_fds },
        fds: roles,
        log_filter: "debug".into(),
    };
    let log_fd = log.reopen().expect("log fd");
    let mut fds = vec![log_fd.as_fd(), ram.fd(), taps[0].as_fd(), theirs.as_fd()];
    fds.extend(taps.iter().skip(1).map(AsFd::as_fd));
    let running = spawn::spawn(&tests::harness::build_dir().join("dev-net"), &boot, &fds)
        .expect("spawn dev-net (run `cargo build -p dev-net` first)");
    drop(fds);
    drop((theirs, taps));
    let setup = DeviceSetup::Net(NetSetup {
        memory: vec![MemoryRegion {
            guest_addr: 0,
            size: RAM,
            file_offset: 0,
        }],
        mac: GUEST_MAC,
        mtu: 1500,
        queue_pairs: pairs,
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
    Spawned {
        running,
        runner,
        log,
        info,
    }
}

impl Harness {
    fn start(rx_buf_len: u32) -> Harness {
        let ns = NetNs::new();
        let ram = GuestRam::new(RAM).expect("guest RAM");
        let Spawned {
            running,
            runner,
            log,
            info,
        } = spawn_dev_net(&ram, vec![ns.tap()], 64);
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
        let (msg, fds) = activation(features, [(0, &self.rx), (1, &self.tx)]);
        self.runner.send(&msg, &fds).expect("activate");
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

/// Rx and tx bytes of the namespace's tap (`ip -s`), as the kernel counts them.
fn tap_counters(ns: &NetNs) -> (u64, u64) {
    let out = Command::new("ip")
        .args(["-n", &ns.0, "-j", "-s", "link", "show", TAP])
        .output()
        .expect("ip -s link");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip json");
    let stats = &v[0]["stats64"];
    let get = |dir: &str| stats[dir]["bytes"].as_u64().unwrap_or(0);
    (get("rx"), get("tx"))
}

/// Small datagrams from the namespace to the guest, ACK-like, until the flag is set; the
/// thread answers how many it sent.
fn ack_like_traffic(
    ns: &NetNs,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<u64>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acks = ns.run(|| UdpSocket::bind("198.18.0.1:5010").expect("bind"));
    let flag = std::sync::Arc::clone(&stop);
    let acker = std::thread::spawn(move || {
        let mut n = 0u64;
        while !flag.load(Ordering::Relaxed) {
            if acks.send_to(&[0xac; 40], "198.18.0.2:9").is_ok() {
                n += 1;
            }
            if n.is_multiple_of(16) {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        n
    });
    (stop, acker)
}

/// Writes a TSO frame (a plain one in every fourth slot) into each transmit slot; returns
/// each slot's chain length and frame length.
fn tso_frames_in_every_slot(h: &Harness) -> Vec<(u32, u64)> {
    (0..TX_SLOTS)
        .map(|slot| {
            let payload = if slot % 4 == 3 { 1400 } else { 64_000 };
            let (hdr, frame) = tso_frame(5011, u32::from(slot) * 65_536, payload);
            let mut content = hdr.to_vec();
            content.extend_from_slice(&frame);
            h.ram.write(TX_BUFS + u64::from(slot) * TX_SLOT, &content);
            (content.len() as u32, frame.len() as u64)
        })
        .collect()
}

/// Whether `call` is written within `ms` milliseconds.
fn signalled_within(call: &nix::sys::eventfd::EventFd, ms: u16) -> bool {
    let mut fd = [nix::poll::PollFd::new(
        call.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    nix::poll::poll(&mut fd, nix::poll::PollTimeout::from(ms)).unwrap_or(0) > 0
}

/// The rings' indices as the driver sees them, for a failure message.
fn ring_state(h: &Harness) -> String {
    let avail_event = |q: &SplitQueue| h.ram.load_u16(q.used + 4 + 8 * u64::from(QSIZE));
    format!(
        "tx: avail idx {} used idx {} avail_event {}, {} of {TX_SLOTS} slots free; rx: avail \
         idx {} used idx {} avail_event {}",
        h.ram.load_u16(h.tx.avail + 2),
        h.ram.load_u16(h.tx.used + 2),
        avail_event(&h.tx),
        h.tx_free.len(),
        h.ram.load_u16(h.rx.avail + 2),
        h.ram.load_u16(h.rx.used + 2),
        avail_event(&h.rx),
    )
}

/// A TCP segment of `payload_len` bytes from the guest to `198.18.0.1:port` as Linux sends it
/// with TSO: one frame up to 64 KiB, `gso_type` TCPV4, the checksum left to the host.
fn tso_frame(port: u16, seq: u32, payload_len: usize) -> ([u8; HDR], Vec<u8>) {
    let mut tcp = 40000u16.to_be_bytes().to_vec();
    tcp.extend_from_slice(&port.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&1u32.to_be_bytes()); // ack
    tcp.extend_from_slice(&[0x50, 0x18]); // 20-byte header, PSH|ACK
    tcp.extend_from_slice(&0xffffu16.to_be_bytes()); // window
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum (offloaded), urgent
    tcp.extend(std::iter::repeat_n(0x6bu8, payload_len));
    let frame = eth(HOST_MAC, 0x0800, &ipv4(6, &tcp));
    let mut hdr = csum_hdr(34, 16);
    if payload_len > 1448 {
        hdr[1] = GSO_TCPV4;
        hdr[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
        hdr[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
    }
    (hdr, frame)
}

#[test]
fn a_bulk_guest_to_host_stream_with_host_traffic_never_stalls_the_rings() {
    if skip() {
        return;
    }
    let mut h = Harness::start(2048);
    // EVENT_IDX is negotiated (the whole offer is accepted), as Linux does.
    assert_ne!(h.info.features & (1 << 29), 0);
    // The host answers: small frames into the guest all along (ACK-like), plus the kernel's
    // own resets to the segments below (nobody listens on the port).
    let (stop, acker) = ack_like_traffic(&h.ns);
    // Every transmit slot holds a frame: 64 KiB TSO frames, every fourth a full-size plain one.
    let lens = tso_frames_in_every_slot(&h);
    let (tap_rx_before, _) = tap_counters(&h.ns);
    let start = Instant::now();
    let (mut sent, mut sent_bytes, mut done, mut received) = (0u64, 0u64, 0u64, 0u64);
    let (mut last_progress, mut last_rx) = (Instant::now(), Instant::now());
    let mut failure = None;
    while start.elapsed() < Duration::from_secs(5) {
        // Transmit into every free slot, as fast as the ring allows; notify as Linux does.
        while let Some(slot) = h.tx_free.pop() {
            let (len, frame_len) = lens[usize::from(slot)];
            let head = h.tx.add_chain_at(
                &h.ram,
                slot * 2,
                &[Buf::out(TX_BUFS + u64::from(slot) * TX_SLOT, len)],
            );
            h.tx.publish(&h.ram, head);
            sent += 1;
            sent_bytes += frame_len;
        }
        h.tx.notify(&h.ram);
        // Wait for an interrupt of either queue; none for 2 s with chains outstanding is a
        // stall.
        let mut fds = [
            nix::poll::PollFd::new(h.tx.call.as_fd(), nix::poll::PollFlags::POLLIN),
            nix::poll::PollFd::new(h.rx.call.as_fd(), nix::poll::PollFlags::POLLIN),
        ];
        let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(2000u16)).expect("poll");
        let _ = h.tx.call.read();
        let _ = h.rx.call.read();
        // Receive: take what came, post the buffers again. Each queue is drained until a
        // look finds nothing new, which leaves `used_event` at what was seen: the next
        // completion must interrupt (what Linux's `virtqueue_enable_cb_prepare` does).
        while let Ok(used) = h.rx.wait_some(&h.ram, Duration::ZERO) {
            for u in used {
                received += 1;
                h.post_rx(u.id as u16);
            }
            h.rx.notify(&h.ram);
            last_rx = Instant::now();
        }
        if last_rx.elapsed() > Duration::from_secs(2) {
            failure = Some(format!(
                "receive stalled for {:?} while the host sends: {}",
                last_rx.elapsed(),
                ring_state(&h)
            ));
            break;
        }
        let before = h.tx_free.len();
        while let Ok(used) = h.tx.wait_some(&h.ram, Duration::ZERO) {
            for u in used {
                h.tx_free.push(u.id as u16 / 2);
                done += 1;
            }
        }
        let progressed = h.tx_free.len() > before;
        // The device raises the interrupt just after publishing: a moment's grace.
        if progressed && ready == 0 && !signalled_within(&h.tx.call, 100) {
            failure = Some(format!(
                "transmit completions came without an interrupt: {}",
                ring_state(&h)
            ));
            break;
        }
        if progressed {
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(2) {
            failure = Some(format!(
                "transmit stalled for {:?} (interrupt seen: {}): {}",
                last_progress.elapsed(),
                ready > 0,
                ring_state(&h)
            ));
            break;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let host_sent = acker.join().expect("acker");
    // The frames reached the host: what the tap took in grew by what was completed.
    std::thread::sleep(Duration::from_millis(200));
    let (tap_rx_after, _) = tap_counters(&h.ns);
    eprintln!(
        "guest->host: {done} of {sent} frames completed in {elapsed:.2}s ({:.0} MB/s), \
         {received} receive buffers used for {host_sent} host datagrams",
        sent_bytes as f64 / elapsed / 1e6
    );
    if let Some(f) = failure {
        panic!("{f}; log:\n{}", h.log_text());
    }
    assert!(done > 1000, "only {done} frames completed");
    assert!(received > 100, "only {received} frames received");
    assert!(
        tap_rx_after - tap_rx_before >= sent_bytes / 2,
        "the tap took {} bytes of {sent_bytes} sent",
        tap_rx_after - tap_rx_before
    );
    assert!(h.alive(), "log:\n{}", h.log_text());
}

/// The guest's side of one TCP connection to the namespace's kernel, just enough of it for a
/// bulk send: handshake, segments within the window as TSO frames, go-back-N on a timeout.
struct GuestTcp {
    port: u16,
    host_port: u16,
    /// First unacknowledged and next sequence numbers.
    una: u32,
    nxt: u32,
    /// The host's receive window in bytes (scaled).
    window: u32,
    wscale: u8,
    /// The host's next sequence number (what the guest acknowledges).
    rcv_nxt: u32,
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
const TCP_RST: u8 = 0x04;
const TCP_FIN: u8 = 0x01;
/// Segment size the guest announces and cuts TSO frames into.
const GUEST_MSS: u16 = 1460;
/// The bytes of every segment's payload.
static TCP_FILL: [u8; 65_536] = [0x5a; 65_536];

impl GuestTcp {
    /// A TCP frame with `payload_len` bytes of data; the checksum is left to the host
    /// (`NEEDS_CSUM`), and a frame over one segment is a TSO frame.
    fn frame(
        &self,
        seq: u32,
        flags: u8,
        options: &[u8],
        payload_len: usize,
    ) -> ([u8; HDR], Vec<u8>) {
        let hdr_len = 20 + options.len();
        let mut tcp = self.port.to_be_bytes().to_vec();
        tcp.extend_from_slice(&self.host_port.to_be_bytes());
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&self.rcv_nxt.to_be_bytes());
        tcp.push(((hdr_len / 4) as u8) << 4);
        tcp.push(flags);
        tcp.extend_from_slice(&0xffffu16.to_be_bytes()); // the guest's window
        let tcp_len = (hdr_len + payload_len) as u32;
        // The pseudo-header sum, uncomplemented, as a driver leaves it for the offload.
        let mut pseudo = GUEST_IP.to_vec();
        pseudo.extend_from_slice(&HOST_IP);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&tcp_len.to_be_bytes()[2..]);
        let partial = !checksum(&pseudo, 0);
        tcp.extend_from_slice(&partial.to_be_bytes());
        tcp.extend_from_slice(&[0, 0]); // urgent
        tcp.extend_from_slice(options);
        // A copy, not a byte loop: the driver must outrun the device even unoptimised.
        tcp.extend_from_slice(&TCP_FILL[..payload_len.min(TCP_FILL.len())]);
        let frame = eth(HOST_MAC, 0x0800, &ipv4(6, &tcp));
        let mut hdr = csum_hdr(34, 16);
        if payload_len > usize::from(GUEST_MSS) {
            hdr[1] = GSO_TCPV4;
            hdr[2..4].copy_from_slice(&((34 + hdr_len) as u16).to_le_bytes());
            hdr[4..6].copy_from_slice(&GUEST_MSS.to_le_bytes());
        }
        (hdr, frame)
    }

    /// Opens the connection: SYN with MSS 1460 and window scale 7, the SYN-ACK, the ACK.
    fn connect(h: &mut Harness, port: u16, host_port: u16) -> GuestTcp {
        let mut c = GuestTcp {
            port,
            host_port,
            una: 1000,
            nxt: 1000,
            window: 0,
            wscale: 0,
            rcv_nxt: 0,
        };
        let (hdr, syn) = c.frame(c.nxt, TCP_SYN, &[2, 4, 0x05, 0xb4, 1, 3, 3, 7], 0);
        h.send(hdr, &syn);
        let synack = h
            .recv_matching(WAIT, |f| {
                c.parse(&f.data).is_some_and(|s| s.0 & TCP_SYN != 0)
            })
            .unwrap_or_else(|| panic!("no SYN-ACK; log:\n{}", h.log_text()));
        let (_, host_seq, ack, _, options) = c.parse(&synack.data).expect("segment");
        assert_eq!(ack, c.nxt + 1);
        // The host's window scale option: kind 3, length 3, shift.
        let mut i = 0;
        while i + 2 < options.len() {
            match options[i] {
                0 => break,
                1 => i += 1,
                3 => {
                    c.wscale = options[i + 2];
                    i += 3;
                }
                _ => i += usize::from(options[i + 1].max(2)),
            }
        }
        c.una = c.nxt + 1;
        c.nxt = c.una;
        c.rcv_nxt = host_seq.wrapping_add(1);
        c.window = 65_535;
        let (hdr, ackf) = c.frame(c.nxt, TCP_ACK, &[], 0);
        h.send(hdr, &ackf);
        c
    }

    /// A segment from the host to this connection: (flags, seq, ack, window field, options).
    fn parse(&self, f: &[u8]) -> Option<(u8, u32, u32, u16, Vec<u8>)> {
        if f.len() < 54 || f[12..14] != [0x08, 0x00] || f[23] != 6 {
            return None;
        }
        let ihl = usize::from(f[14] & 0x0f) * 4;
        let t = f.get(14 + ihl..)?;
        if t.len() < 20
            || t[0..2] != self.host_port.to_be_bytes()
            || t[2..4] != self.port.to_be_bytes()
        {
            return None;
        }
        let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let off = usize::from(t[12] >> 4) * 4;
        let options = t.get(20..off).unwrap_or_default().to_vec();
        Some((
            t[13],
            be32(&t[4..8]),
            be32(&t[8..12]),
            u16::from_be_bytes([t[14], t[15]]),
            options,
        ))
    }
}

#[test]
fn a_guest_to_host_tcp_stream_with_tso_keeps_flowing() {
    if skip() {
        return;
    }
    let mut h = Harness::start(2048);
    assert_ne!(h.info.features & (1 << 29), 0, "EVENT_IDX offered");
    let listener =
        h.ns.run(|| std::net::TcpListener::bind("198.18.0.1:5012").expect("listen"));
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        while let Ok(n) = std::io::Read::read(&mut s, &mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    });
    let mut c = GuestTcp::connect(&mut h, 40_001, 5012);
    let start_seq = c.una;

    // Bulk: segments of up to 63 KiB while the window allows, ACKs read as they come.
    let start = Instant::now();
    let mut last_progress = Instant::now();
    let mut retransmits = 0u32;
    let mut failure = None;
    while start.elapsed() < Duration::from_secs(6) {
        loop {
            let in_flight = c.nxt.wrapping_sub(c.una);
            let room = c.window.saturating_sub(in_flight).min(63_000) as usize;
            if room < usize::from(GUEST_MSS) || h.tx_free.is_empty() {
                break;
            }
            let (hdr, seg) = c.frame(c.nxt, TCP_ACK | TCP_PSH, &[], room);
            h.send(hdr, &seg);
            c.nxt = c.nxt.wrapping_add(room as u32);
        }
        // Transmit completions, as the guest's tx interrupt would free them.
        while let Ok(used) = h.tx.wait_some(&h.ram, Duration::ZERO) {
            for u in used {
                h.tx_free.push(u.id as u16 / 2);
            }
        }
        while let Some(f) = h.recv(Duration::from_millis(50)) {
            let Some((flags, _, ack, win, _)) = c.parse(&f.data) else {
                continue;
            };
            assert_eq!(flags & TCP_RST, 0, "the host reset the connection");
            if ack.wrapping_sub(c.una).cast_signed() > 0
                && ack.wrapping_sub(c.nxt).cast_signed() <= 0
            {
                c.una = ack;
                last_progress = Instant::now();
            }
            c.window = u32::from(win) << c.wscale;
        }
        if c.una != c.nxt && last_progress.elapsed() > Duration::from_millis(500) {
            // Lost on the way (a full tap backlog): send again from the first unacknowledged.
            retransmits += 1;
            c.nxt = c.una;
        }
        if last_progress.elapsed() > Duration::from_secs(3) {
            failure = Some(format!(
                "no acknowledgement for {:?}: {} bytes in flight, window {}; {}",
                last_progress.elapsed(),
                c.nxt.wrapping_sub(c.una),
                c.window,
                ring_state(&h)
            ));
            break;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let acked = u64::from(c.una.wrapping_sub(start_seq));
    // Close: FIN after the last byte sent, then the reader sees the end of the stream.
    let (hdr, fin) = c.frame(c.nxt, TCP_ACK | TCP_FIN, &[], 0);
    h.send(hdr, &fin);
    eprintln!(
        "guest->host TCP: {acked} bytes acknowledged in {elapsed:.2}s ({:.1} MB/s), {retransmits} \
         go-back-N rounds",
        acked as f64 / elapsed / 1e6
    );
    if let Some(f) = failure {
        panic!("{f}; log:\n{}", h.log_text());
    }
    let read = reader.join().expect("reader");
    assert!(acked > 20 << 20, "only {acked} bytes acknowledged");
    assert!(
        read >= acked,
        "the host read {read} of {acked} acknowledged bytes"
    );
}

// --- Multi-queue --------------------------------------------------------------------------

const MQ_PAIRS: u16 = 2;
const MQ_QSIZE: u16 = 128;
const MQ_RX_LEN: u32 = 2048;
const MQ_CTRL_BUF: u64 = 0x80_0000;
const MQ_TX_BUF: u64 = 0x90_0000;
const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
const VIRTIO_NET_F_MQ: u64 = 1 << 22;

/// A dev-net with two queue pairs on a two-queue tap, and a control queue; the test plays
/// the guest's driver (and the runner).
struct MqRig {
    ns: NetNs,
    running: Option<spawn::Running>,
    runner: Channel,
    ram: GuestRam,
    log: tempfile::NamedTempFile,
    info: DeviceInfo,
    /// rx0, tx0, rx1, tx1, ctrl.
    queues: Vec<SplitQueue>,
    /// The tap's queues, kept as the supervisor keeps them for a restarted dev-net.
    taps: Vec<OwnedFd>,
}

impl MqRig {
    fn rx_base(pair: u16, i: u16) -> u64 {
        0x10_0000 + u64::from(pair) * 0x20_0000 + u64::from(i) * u64::from(MQ_RX_LEN)
    }

    fn start() -> MqRig {
        let ns = NetNs::new();
        let ram = GuestRam::new(RAM).expect("guest RAM");
        let taps = ns.tap_queues(usize::from(MQ_PAIRS));
        let Spawned {
            running,
            runner,
            log,
            info,
        } = spawn_dev_net(&ram, clone_fds(&taps), 96);
        let queues = (0..5u64)
            .map(|q| SplitQueue::new(&ram, 0x1_0000 + q * 0x1_0000, MQ_QSIZE).expect("queue"))
            .collect();
        MqRig {
            ns,
            running: Some(running),
            runner,
            ram,
            log,
            info,
            queues,
            taps,
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Posts every receive buffer, then activates.
    fn activate(&mut self) {
        for pair in 0..MQ_PAIRS {
            for i in 0..MQ_QSIZE {
                self.post_rx(pair, i);
            }
        }
        self.send_activate();
    }

    /// `Activate` with every queue as it stands in guest memory.
    fn send_activate(&mut self) {
        let (msg, fds) = activation(self.info.features, (0..).zip(&self.queues));
        self.runner.send(&msg, &fds).expect("activate");
        let reply = self
            .runner
            .recv_timeout::<FromDevice>(WAIT)
            .expect("reply")
            .msg;
        assert_eq!(reply, FromDevice::Activated, "log:\n{}", self.log_text());
        for pair in 0..MQ_PAIRS {
            self.queues[usize::from(pair) * 2].kick();
        }
    }

    /// Kills dev-net and starts a new one on the same guest RAM, rings and tap queues, as the
    /// supervisor and the runner do after a crash: the runner's `ResumeQueuePairs` (if
    /// `resume`) and the same `Activate`.
    fn restart(&mut self, resume: Option<u16>) {
        if let Some(mut r) = self.running.take() {
            r.process.kill().expect("kill dev-net");
            r.process.wait().expect("reap dev-net");
        }
        let Spawned {
            running,
            runner,
            log,
            info,
        } = spawn_dev_net(&self.ram, clone_fds(&self.taps), 96);
        assert_eq!(info, self.info, "the same device comes back");
        (self.running, self.runner, self.log) = (Some(running), runner, log);
        if let Some(pairs) = resume {
            self.runner
                .send(&ToDevice::ResumeQueuePairs { pairs }, &[])
                .expect("resume");
        }
        self.send_activate();
    }

    fn post_rx(&mut self, pair: u16, i: u16) {
        let addr = Self::rx_base(pair, i);
        let q = &mut self.queues[usize::from(pair) * 2];
        let head = q.add_chain_at(&self.ram, i, &[Buf::input(addr, MQ_RX_LEN)]);
        q.publish(&self.ram, head);
    }

    /// Sends one control command and returns the device's ack byte.
    fn ctrl(&mut self, command: &[u8]) -> u8 {
        let ack_at = MQ_CTRL_BUF + 0x100;
        self.ram.write(MQ_CTRL_BUF, command);
        self.ram.write(ack_at, &[0xee]);
        let len = command.len() as u32;
        let q = &mut self.queues[4];
        q.submit(
            &self.ram,
            &[Buf::out(MQ_CTRL_BUF, len), Buf::input(ack_at, 1)],
        );
        let used = q
            .wait_some(&self.ram, WAIT)
            .unwrap_or_else(|e| panic!("control queue: {e}; log:\n{}", self.log_text()));
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].len, 1, "the ack byte is written");
        self.ram.read_u8(ack_at)
    }

    /// Collects the UDP datagrams to port `port` that arrive on each pair within `wait`,
    /// as (pair, first payload byte); buffers are reposted.
    fn udp_by_pair(&mut self, port: u16, want: usize, wait: Duration) -> Vec<(u16, u8)> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        while got.len() < want && Instant::now() < deadline {
            for pair in 0..MQ_PAIRS {
                let q = usize::from(pair) * 2;
                let used = self.queues[q]
                    .wait_some(&self.ram, Duration::from_millis(50))
                    .unwrap_or_default();
                for u in &used {
                    let f = self
                        .ram
                        .read(Self::rx_base(pair, u.id as u16), u.len as usize);
                    let d = &f[HDR..];
                    if d.len() > 42
                        && d[12..14] == [8, 0]
                        && d[23] == 17
                        && d[36..38] == port.to_be_bytes()
                    {
                        got.push((pair, d[42]));
                    }
                    self.post_rx(pair, u.id as u16);
                }
                self.queues[q].kick();
            }
        }
        got
    }

    /// Sends `count` datagrams from as many sockets (so as many flows) to the guest.
    fn send_flows(&self, port: u16, count: u8) {
        self.ns.run(move || {
            for n in 0..count {
                let s = UdpSocket::bind("198.18.0.1:0").expect("bind");
                s.send_to(&[n; 64], ("198.18.0.2", port)).expect("send");
            }
        });
    }

    /// Pings the namespace from transmit queue `pair`; true when the reply arrives on any
    /// receive queue.
    fn ping_from(&mut self, pair: u16, seq: u16) -> bool {
        let mut content = plain().to_vec();
        content.extend_from_slice(&icmp_echo(0x77, seq, b"multi-queue", true));
        self.ram.write(MQ_TX_BUF, &content);
        let q = &mut self.queues[usize::from(pair) * 2 + 1];
        q.submit(&self.ram, &[Buf::out(MQ_TX_BUF, content.len() as u32)]);
        let back = q.wait_some(&self.ram, WAIT).unwrap_or_default();
        assert_eq!(back.len(), 1, "tx{pair} chain comes back");
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            for p in 0..MQ_PAIRS {
                let q = usize::from(p) * 2;
                let used = self.queues[q]
                    .wait_some(&self.ram, Duration::from_millis(50))
                    .unwrap_or_default();
                let mut found = false;
                for u in &used {
                    let f = self.ram.read(Self::rx_base(p, u.id as u16), u.len as usize);
                    found |= is_echo_reply(&f[HDR..], 0x77, seq);
                    self.post_rx(p, u.id as u16);
                }
                self.queues[q].kick();
                if found {
                    return true;
                }
            }
        }
        false
    }
}

fn clone_fds(fds: &[OwnedFd]) -> Vec<OwnedFd> {
    fds.iter()
        .map(|f| f.try_clone().expect("dup tap fd"))
        .collect()
}

impl Drop for MqRig {
    fn drop(&mut self) {
        if let Some(mut r) = self.running.take() {
            let _ = r.process.kill();
            let _ = r.process.wait();
        }
    }
}

#[test]
fn multiqueue_pairs_each_carry_frames_and_vq_pairs_set_is_checked() {
    if skip() {
        return;
    }
    let mut rig = MqRig::start();
    // Arrange: the offer of a two-pair device (§5.1.2, §5.1.4).
    assert_eq!(rig.info.queues, 5, "rx0 tx0 rx1 tx1 ctrl");
    assert_ne!(rig.info.features & VIRTIO_NET_F_MQ, 0);
    assert_ne!(rig.info.features & VIRTIO_NET_F_CTRL_VQ, 0);
    assert_eq!(
        rig.info.config[8..10],
        MQ_PAIRS.to_le_bytes(),
        "max_virtqueue_pairs"
    );
    rig.activate();

    // Until VQ_PAIRS_SET only pair 0 receives, whichever tap queue a flow lands on.
    rig.send_flows(9001, 24);
    let before = rig.udp_by_pair(9001, 24, Duration::from_secs(5));
    assert_eq!(before.len(), 24, "every datagram arrives: {before:?}");
    assert!(
        before.iter().all(|&(p, _)| p == 0),
        "only rx0 before VQ_PAIRS_SET: {before:?}"
    );

    // Hostile and unsupported commands are refused; the device goes on.
    for bad in [
        &[4u8, 0, 0, 0][..], // 0 pairs
        &[4, 0, 3, 0],       // above max_virtqueue_pairs
        &[4, 0, 0xff, 0xff], // far above
        &[4, 0, 2],          // data cut short
        &[4, 1, 2, 0],       // RSS config, not offered
        &[9, 9, 9, 9],       // unknown class
        &[],                 // no header at all
    ] {
        assert_eq!(rig.ctrl(bad), 1, "VIRTIO_NET_ERR for {bad:?}");
    }
    // Act: enable both pairs.
    assert_eq!(rig.ctrl(&[4, 0, 2, 0]), 0, "VIRTIO_NET_OK for 2 pairs");

    // Assert: flows spread over both receive queues (the tap hashes flows over its queues;
    // 48 flows all on one of two queues has odds 2^-47), and both transmit queues work.
    rig.send_flows(9002, 48);
    let after = rig.udp_by_pair(9002, 48, Duration::from_secs(5));
    assert_eq!(after.len(), 48, "every datagram arrives: {after:?}");
    for pair in 0..MQ_PAIRS {
        assert!(
            after.iter().any(|&(p, _)| p == pair),
            "rx{pair} got none: {after:?}"
        );
    }
    assert!(
        rig.ping_from(0, 1),
        "echo through tx0; log:\n{}",
        rig.log_text()
    );
    assert!(
        rig.ping_from(1, 2),
        "echo through tx1; log:\n{}",
        rig.log_text()
    );

    // Back to one pair: rx1 gets nothing again.
    assert_eq!(rig.ctrl(&[4, 0, 1, 0]), 0, "VIRTIO_NET_OK for 1 pair");
    rig.send_flows(9003, 24);
    let one = rig.udp_by_pair(9003, 24, Duration::from_secs(5));
    assert_eq!(one.len(), 24, "every datagram arrives: {one:?}");
    assert!(one.iter().all(|&(p, _)| p == 0), "only rx0 again: {one:?}");
    let log = rig.log_text();
    assert!(log.contains("queue pairs enabled"), "log:\n{log}");
    assert!(
        rig.running
            .as_mut()
            .expect("running")
            .process
            .try_wait()
            .expect("wait")
            .is_none(),
        "dev-net still runs; log:\n{log}"
    );
}

/// The count the driver set survives a dev-net restart: dev-net reports `VQ_PAIRS_SET` to the
/// runner, and a new process told the count (`ResumeQueuePairs`) before its `Activate`
/// receives on both pairs with no control command, while one not told receives on pair 0.
#[test]
fn a_restarted_dev_net_told_the_drivers_pair_count_receives_on_every_pair() {
    if skip() {
        return;
    }
    let mut rig = MqRig::start();
    rig.activate();
    assert_eq!(rig.ctrl(&[4, 0, 2, 0]), 0, "VIRTIO_NET_OK for 2 pairs");
    let report = rig
        .runner
        .recv_timeout::<FromDevice>(WAIT)
        .unwrap_or_else(|e| panic!("report: {e}; log:\n{}", rig.log_text()))
        .msg;
    assert_eq!(report, FromDevice::QueuePairs { pairs: 2 });

    // Not told: everything arrives, all of it on pair 0.
    rig.restart(None);
    rig.send_flows(9201, 24);
    let untold = rig.udp_by_pair(9201, 24, Duration::from_secs(5));
    assert_eq!(untold.len(), 24, "every datagram arrives: {untold:?}");
    assert!(
        untold.iter().all(|&(p, _)| p == 0),
        "only rx0 without the count: {untold:?}"
    );

    // Told: flows spread over both receive queues with no control command (48 flows all on
    // one of two tap queues has odds 2^-47).
    rig.restart(Some(2));
    rig.send_flows(9202, 48);
    let resumed = rig.udp_by_pair(9202, 48, Duration::from_secs(5));
    assert_eq!(resumed.len(), 48, "every datagram arrives: {resumed:?}");
    for pair in 0..MQ_PAIRS {
        assert!(
            resumed.iter().any(|&(p, _)| p == pair),
            "rx{pair} got none: {resumed:?}; log:\n{}",
            rig.log_text()
        );
    }
    let log = rig.log_text();
    assert!(log.contains("queue pairs enabled (resumed)"), "log:\n{log}");
    // Resuming reports nothing: the runner's count stands.
    assert!(
        rig.runner
            .recv_timeout::<FromDevice>(Duration::from_millis(200))
            .is_err(),
        "no message after Activated"
    );
    // A count beyond the offer is refused before anything is resumed.
    rig.runner
        .send(&ToDevice::ResumeQueuePairs { pairs: 3 }, &[])
        .expect("send");
    assert!(
        matches!(
            rig.runner
                .recv_timeout::<FromDevice>(WAIT)
                .expect("reply")
                .msg,
            FromDevice::NeedsReset { .. }
        ),
        "3 of 2 pairs refused"
    );
}

/// Host → guest UDP frames per second with one queue pair enabled against two, on the same
/// two-queue device: eight flows from two sender threads, the test's driver collecting both
/// receive rings. A measurement (printed), checked only for progress: on a machine of two
/// cores shared by the senders, the kernel's tap, dev-net's workers and this driver, it
/// says what a second pair buys when the CPUs are already busy.
#[test]
fn multiqueue_throughput_one_pair_against_two() {
    if skip() {
        return;
    }
    let mut rig = MqRig::start();
    rig.activate();
    let mut rates = Vec::new();
    for pairs in [1u8, 2] {
        assert_eq!(rig.ctrl(&[4, 0, pairs, 0]), 0, "VQ_PAIRS_SET {pairs}");
        let port = 9100 + u16::from(pairs);
        let socks: Vec<UdpSocket> = rig.ns.run(|| {
            (0..8)
                .map(|_| UdpSocket::bind("198.18.0.1:0").expect("bind"))
                .collect()
        });
        let secs = 2.0;
        let senders: Vec<_> = socks
            .chunks(4)
            .map(|c| {
                let c: Vec<UdpSocket> = c.iter().map(|s| s.try_clone().expect("clone")).collect();
                std::thread::spawn(move || {
                    let buf = [0x42u8; 1472];
                    let end = Instant::now() + Duration::from_secs_f64(secs);
                    let mut n = 0u64;
                    while Instant::now() < end {
                        for s in &c {
                            if s.send_to(&buf, ("198.18.0.2", port)).is_ok() {
                                n += 1;
                            }
                        }
                    }
                    n
                })
            })
            .collect();
        let start = Instant::now();
        let mut per_pair = [0u64; 2];
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_millis(500) {
            let mut any = false;
            // Only the enabled rings: waiting on an idle one would throttle this driver.
            for pair in 0..u16::from(pairs) {
                let q = usize::from(pair) * 2;
                let used = rig.queues[q]
                    .wait_some(&rig.ram, Duration::from_millis(20))
                    .unwrap_or_default();
                for u in &used {
                    if u.len as usize == HDR + 14 + 20 + 8 + 1472 {
                        per_pair[usize::from(pair)] += 1;
                    }
                    rig.post_rx(pair, u.id as u16);
                }
                any |= !used.is_empty();
                rig.queues[q].kick();
            }
            if any || start.elapsed().as_secs_f64() < secs {
                quiet_since = Instant::now();
            }
        }
        let sent: u64 = senders.into_iter().map(|t| t.join().expect("sender")).sum();
        let elapsed = start.elapsed().as_secs_f64() - 0.5;
        let got = per_pair[0] + per_pair[1];
        let rate = got as f64 / elapsed;
        eprintln!(
            "MEASURE dev_net mq pairs={pairs} host_to_guest_frames_per_s={rate:.0} mb_per_s={:.1} got={got} of sent={sent} per_pair={per_pair:?}",
            rate * 1514.0 / 1e6
        );
        assert!(got > 1000, "pairs={pairs}: only {got} frames");
        rates.push(rate);
    }
    eprintln!(
        "MEASURE dev_net mq two_pairs_over_one={:.2}",
        rates[1] / rates[0]
    );
}
