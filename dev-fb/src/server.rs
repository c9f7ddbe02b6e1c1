//! The VNC server's event loop: one thread, `poll(2)` over the control channel, the listening
//! socket, every client and the input devices' descriptors (their runner channels and queue
//! kicks), all non-blocking.
//!
//! Why one thread: all clients read the same framebuffer and share one change scan, the work
//! per client is small next to the scan, and a single thread needs no locks and no `clone` in
//! the seccomp policy. No client can stall the loop: sockets are non-blocking, each client's
//! queued output is bounded ([`Server::queue_limit`]; a client whose queue overflows is
//! dropped), reads per wake-up are bounded, and a client that never finishes its handshake is
//! dropped after [`HANDSHAKE_TIMEOUT`].
//!
//! Scanning: while at least one client waits for an incremental update the framebuffer is
//! scanned ([`TileGrid::scan`]) every [`SCAN_FAST`] (30 Hz) for [`QUIET_AFTER`] after a change or
//! a client's key or pointer event, then every [`SCAN_SLOW`] until the screen has been quiet for
//! [`IDLE_AFTER`], then every [`SCAN_IDLE`]. Input brings the next scan forward to at most
//! [`SCAN_FAST`] away, so typing and pointing on a still screen are answered at the fast rate.
//! A change the guest makes on its own after a quiet spell (a clock, a log line) reaches the
//! client at most [`SCAN_IDLE`] later (half that on average; [`SCAN_SLOW`] within a few seconds
//! of activity), and the rest of the change at the fast rate. With no client, or none waiting,
//! `poll` sleeps without a timeout, so an unwatched display costs no CPU.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use proto::channel::{Channel, ChannelError};
use proto::display::{DisplaySetup, Mode, SharePolicy, ToDisplay};

use crate::framebuffer::{FrameSource, Screen, TileGrid};
use crate::input::{InputEvent, InputSink};
use crate::message::MAX_BUFFERED_MESSAGE;
use crate::session::{Context, Event, Session};

/// Most clients at once; more connections are accepted and closed at once.
pub const MAX_CLIENTS: usize = 16;
/// How long a client may take from connecting to finishing its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Scan interval after a recent change or input.
pub const SCAN_FAST: Duration = Duration::from_millis(33);
/// Scan interval once the screen has been quiet for [`QUIET_AFTER`].
pub const SCAN_SLOW: Duration = Duration::from_millis(200);
/// Scan interval once the screen has been quiet for [`IDLE_AFTER`].
pub const SCAN_IDLE: Duration = Duration::from_secs(1);
/// How long after a change or input the fast rate holds.
pub const QUIET_AFTER: Duration = Duration::from_secs(1);
/// How long after a change or input the slow rate holds before the idle one.
pub const IDLE_AFTER: Duration = Duration::from_secs(3);
/// Bytes read from one client per wake-up, so a flooding client cannot starve the others.
const READ_BUDGET: usize = 64 * 1024;
/// Buffer capacity a client keeps between updates.
const IDLE_BUFFER: usize = 64 * 1024;
/// Output a client may have queued beyond two whole frames before it is dropped.
const QUEUE_SLACK: usize = 4 << 20;

/// Why the server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("polling failed")]
    Poll(#[source] nix::Error),
    #[error("the control channel failed")]
    Control(#[source] ChannelError),
}

/// One connected client.
#[derive(Debug)]
struct Client {
    stream: TcpStream,
    peer: SocketAddr,
    session: Session,
    inbuf: Vec<u8>,
    /// Bytes of `session.out` already written.
    written: usize,
    /// When the handshake must be done by.
    deadline: Option<Instant>,
    /// Set when the client is to be dropped, with the reason.
    closing: Option<String>,
}

impl Client {
    fn queued(&self) -> usize {
        self.session.out.len().saturating_sub(self.written)
    }

    fn close(&mut self, reason: impl Into<String>) {
        if self.closing.is_none() {
            self.closing = Some(reason.into());
        }
    }

    /// Writes queued output until the socket would block.
    fn flush(&mut self) {
        while self.queued() > 0 && self.closing.is_none() {
            let pending = self.session.out.get(self.written..).unwrap_or_default();
            match self.stream.write(pending) {
                Ok(0) => self.close("connection closed"),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => self.close(format!("write failed: {e}")),
            }
        }
        if self.queued() == 0 {
            self.session.out.clear();
            // A full frame can leave megabytes of capacity behind; an idle client keeps little.
            self.session.out.shrink_to(IDLE_BUFFER);
            self.written = 0;
        }
    }
}

/// The VNC server over one framebuffer.
pub struct Server<'a, S: InputSink> {
    fb: &'a dyn FrameSource,
    setup: DisplaySetup,
    name: String,
    mode: Mode,
    listener: TcpListener,
    clients: Vec<Client>,
    grid: TileGrid,
    input: S,
    next_scan: Instant,
    /// The last change seen or client input.
    active_at: Instant,
}

impl<S: InputSink> std::fmt::Debug for Server<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("clients", &self.clients.len())
            .finish_non_exhaustive()
    }
}

impl<'a, S: InputSink> Server<'a, S> {
    /// A server for the validated `setup`, reading pixels from `fb` (at least
    /// `setup.framebuffer_bytes` long) and accepting on `listener`.
    pub fn new(
        fb: &'a dyn FrameSource,
        setup: DisplaySetup,
        name: String,
        listener: TcpListener,
        input: S,
    ) -> Server<'a, S> {
        let now = Instant::now();
        Server {
            fb,
            mode: setup.initial_mode(),
            setup,
            name,
            listener,
            clients: Vec::new(),
            grid: TileGrid::new(),
            input,
            next_scan: now,
            active_at: now,
        }
    }

    /// The input sink (for tests and the virtio-input devices).
    pub fn input(&mut self) -> &mut S {
        &mut self.input
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Most bytes one client may have queued: two raw frames of the largest mode at 32 bpp,
    /// plus slack for pseudo-rectangles and compression overhead.
    pub fn queue_limit(&self) -> usize {
        let frame = u64::from(self.setup.max_width) * u64::from(self.setup.max_height) * 4;
        usize::try_from(frame.saturating_mul(2))
            .unwrap_or(usize::MAX)
            .saturating_add(QUEUE_SLACK)
    }

    /// Applies a new mode from the guest if it fits; clients are told with their next update.
    pub fn set_mode(&mut self, mode: Mode) {
        if let Err(e) = self.setup.check_mode(&mode) {
            tracing::warn!(error = %e, "refusing a display mode");
            return;
        }
        tracing::info!(
            width = mode.width,
            height = mode.height,
            bpp = mode.bpp,
            "display mode"
        );
        self.mode = mode;
        self.grid.reset();
        let size = self.size();
        for c in &mut self.clients {
            c.session.mode_changed(size);
        }
    }

    fn size(&self) -> (u16, u16) {
        (
            u16::try_from(self.mode.width).unwrap_or(u16::MAX),
            u16::try_from(self.mode.height).unwrap_or(u16::MAX),
        )
    }

    /// Serves until `control` (the supervisor's bootstrap channel) is closed by its peer.
    /// Mode changes come on `display` (the runner's bochs display; no handshake, runner →
    /// dev-fb only) and, for tests without a runner, on `control`.
    pub fn serve(
        &mut self,
        control: &Channel,
        display: Option<&Channel>,
    ) -> Result<(), ServerError> {
        if let Err(e) = self.listener.set_nonblocking(true) {
            tracing::warn!(error = %e, "could not make the listener non-blocking");
        }
        let mut display = display;
        loop {
            let timeout = self.poll_timeout(Instant::now());
            let (display_ready, control_ready, listener_ready, ready, input_ready) = {
                let input_fds = self.input.poll_fds();
                let inputs = input_fds.len();
                let mut fds = Vec::with_capacity(self.clients.len() + 3 + inputs);
                // The display channel's slot always exists (a closed one polls nothing).
                let display_flags = if display.is_some() {
                    PollFlags::POLLIN
                } else {
                    PollFlags::empty()
                };
                fds.push(PollFd::new(
                    display.map_or(control.as_fd(), |d| d.as_fd()),
                    display_flags,
                ));
                fds.push(PollFd::new(control.as_fd(), PollFlags::POLLIN));
                fds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
                for c in &self.clients {
                    let mut ev = PollFlags::POLLIN;
                    if c.queued() > 0 {
                        ev |= PollFlags::POLLOUT;
                    }
                    fds.push(PollFd::new(c.stream.as_fd(), ev));
                }
                // The input devices' descriptors come last.
                fds.extend(
                    input_fds
                        .into_iter()
                        .map(|fd| PollFd::new(fd, PollFlags::POLLIN)),
                );
                match poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(ServerError::Poll(e)),
                }
                let rev = |f: &PollFd<'_>| f.revents().unwrap_or(PollFlags::empty());
                let mut it = fds.iter().map(rev);
                let display_ready = it.next().unwrap_or(PollFlags::empty());
                let control_ready = it.next().unwrap_or(PollFlags::empty());
                let listener_ready = it.next().unwrap_or(PollFlags::empty());
                let mut ready = it.collect::<Vec<_>>();
                let input_ready: Vec<bool> = ready
                    .split_off(ready.len().saturating_sub(inputs))
                    .into_iter()
                    .map(|r| !r.is_empty())
                    .collect();
                (
                    display_ready,
                    control_ready,
                    listener_ready,
                    ready,
                    input_ready,
                )
            };
            // Before anything else: the input sink's descriptors are as it listed them.
            self.input.poll_ready(&input_ready);
            if let Some(channel) = display
                && !display_ready.is_empty()
                && !self.control(channel)?
            {
                // The runner is gone (the guest ended or is rebooting); the picture stays.
                tracing::info!("the runner closed the display channel");
                display = None;
            }
            if !control_ready.is_empty() && !self.control(control)? {
                tracing::info!("supervisor closed the channel; exiting");
                return Ok(());
            }
            if !listener_ready.is_empty() {
                self.accept();
            }
            let mut events = Vec::new();
            for (i, rev) in ready.into_iter().enumerate() {
                self.service(i, rev, &mut events);
            }
            self.handle_events(&events);
            self.updates(Instant::now());
            self.reap();
        }
    }

    /// Reads one control message; `false` when the peer hung up.
    fn control(&mut self, control: &Channel) -> Result<bool, ServerError> {
        match control.recv::<ToDisplay>() {
            Ok(received) => match received.msg {
                ToDisplay::SetMode(mode) => self.set_mode(mode),
            },
            Err(ChannelError::Closed) => return Ok(false),
            Err(e @ (ChannelError::Recv(_) | ChannelError::Send(_))) => {
                return Err(ServerError::Control(e));
            }
            Err(e) => tracing::warn!(error = %e, "ignoring a malformed control message"),
        }
        Ok(true)
    }

    /// How long `poll` may sleep: until the next scan if a client waits for an update, the
    /// nearest handshake deadline, or forever.
    fn poll_timeout(&self, now: Instant) -> PollTimeout {
        let mut wake: Option<Instant> = None;
        let mut earliest = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        for c in &self.clients {
            if c.session.update_due_now() && c.queued() < self.queue_limit() {
                earliest(now);
            } else if c.session.wants_update() {
                earliest(self.next_scan);
            }
            if let Some(d) = c.deadline {
                earliest(d);
            }
        }
        match wake {
            None => PollTimeout::NONE,
            Some(t) => {
                let ms = t.saturating_duration_since(now).as_millis();
                // Round up so that a wake-up is never early by a fraction of a millisecond.
                let ms = u16::try_from(ms.saturating_add(1)).unwrap_or(u16::MAX);
                PollTimeout::from(ms)
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    if self.clients.len() >= MAX_CLIENTS {
                        tracing::warn!(%peer, "too many VNC clients; refusing one");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!(%peer, error = %e, "could not make a client non-blocking");
                        continue;
                    }
                    // Small updates (a cursor's worth) should not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    tracing::info!(%peer, "VNC client connected");
                    let mut client = Client {
                        stream,
                        peer,
                        session: Session::new(),
                        inbuf: Vec::new(),
                        written: 0,
                        deadline: Instant::now().checked_add(HANDSHAKE_TIMEOUT),
                        closing: None,
                    };
                    client.flush();
                    self.clients.push(client);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // ECONNABORTED, EMFILE and the like: this connection is lost, not the server.
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            }
        }
    }

    /// Handles poll results for client `i`.
    fn service(&mut self, i: usize, rev: PollFlags, events: &mut Vec<Event>) {
        let size = self.size();
        let Some(c) = self.clients.get_mut(i) else {
            return;
        };
        if rev.intersects(PollFlags::POLLOUT) {
            c.flush();
        }
        if rev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            let mut ctx = Context {
                password: self.setup.password.as_deref().map(str::as_bytes),
                name: &self.name,
                size,
                input: &mut self.input,
            };
            let mut client_events = Vec::new();
            read_client(c, &mut ctx, &mut client_events);
            events.extend_from_slice(&client_events);
            if client_events.contains(&Event::WantsExclusive)
                && self.setup.share == SharePolicy::AllowExclusive
            {
                let peer = c.peer;
                for (j, other) in self.clients.iter_mut().enumerate() {
                    if j != i {
                        other.close(format!("{peer} asked for exclusive access"));
                    }
                }
            }
            if let Some(c) = self.clients.get_mut(i) {
                c.flush();
                if c.session.is_ready() {
                    c.deadline = None;
                }
            }
        }
    }

    fn handle_events(&mut self, events: &[Event]) {
        if events.contains(&Event::Input) {
            let now = Instant::now();
            self.active_at = now;
            self.next_scan = self.next_scan.min(now + SCAN_FAST);
        }
    }

    /// The scan interval for a screen last active at `active_at`.
    fn scan_interval(active_at: Instant, now: Instant) -> Duration {
        let quiet = now.saturating_duration_since(active_at);
        if quiet < QUIET_AFTER {
            SCAN_FAST
        } else if quiet < IDLE_AFTER {
            SCAN_SLOW
        } else {
            SCAN_IDLE
        }
    }

    /// Scans the framebuffer if due and sends the updates clients are owed.
    fn updates(&mut self, now: Instant) {
        let limit = self.queue_limit();
        let waiting = self
            .clients
            .iter()
            .any(|c| c.closing.is_none() && c.session.wants_update());
        if !waiting {
            return;
        }
        let Some(screen) = Screen::new(self.fb, self.mode) else {
            tracing::error!(mode = ?self.mode, "the display mode does not fit the framebuffer");
            return;
        };
        // Scan before any update goes out, not only on the clock: an update reads the live
        // framebuffer, so the grid's hashes must be at least as new as what the client is
        // sent, or a later change back to the hashed picture would go unseen.
        let sending = self
            .clients
            .iter()
            .any(|c| c.closing.is_none() && c.session.update_due_now());
        if now >= self.next_scan || sending {
            let changed = self.grid.scan(&screen);
            if changed.iter().any(Option::is_some) {
                self.active_at = now;
            }
            let (cols, rows) = self.grid.dims();
            for c in &mut self.clients {
                c.session.mark_changed(&changed, cols, rows);
            }
            self.next_scan = now + Self::scan_interval(self.active_at, now);
        }
        let tiles = self.grid.dims();
        for c in &mut self.clients {
            if c.closing.is_some() || !c.session.wants_update() {
                continue;
            }
            match c.session.update(&screen, tiles) {
                Ok(false) => {}
                Ok(true) => {
                    if c.queued() > limit {
                        let queued = c.queued();
                        c.close(format!(
                            "output queue full ({queued} bytes): the client is not reading"
                        ));
                    } else {
                        c.flush();
                    }
                }
                Err(e) => c.close(format!("update failed: {e}")),
            }
        }
    }

    /// Lets go of what closing clients hold down in the guest, except keys another client
    /// still holds.
    fn release_closing(&mut self) {
        let mut releases = Vec::new();
        for c in self.clients.iter_mut().filter(|c| c.closing.is_some()) {
            releases.extend(c.session.release_held());
        }
        for event in releases {
            let other_holds = match event {
                InputEvent::Key { code, .. } => self
                    .clients
                    .iter()
                    .any(|c| c.closing.is_none() && c.session.holds_key(code)),
                InputEvent::Pointer { .. } => false,
            };
            if !other_holds {
                tracing::debug!(?event, "released for a client that went");
                self.input.deliver(event);
            }
        }
    }

    /// Drops clients that are closing or past their handshake deadline.
    fn reap(&mut self) {
        let now = Instant::now();
        for c in &mut self.clients {
            if c.deadline.is_some_and(|d| now >= d) {
                c.close("handshake timed out");
            }
        }
        self.release_closing();
        self.clients.retain_mut(|c| match &c.closing {
            None => true,
            Some(reason) => {
                // One last try to deliver a refusal reason already queued.
                let pending = c.session.out.get(c.written..).unwrap_or_default();
                if !pending.is_empty() && pending.len() < 4096 {
                    let _ = c.stream.write(pending);
                }
                tracing::info!(peer = %c.peer, %reason, "VNC client disconnected");
                false
            }
        });
    }
}

/// Reads what the client sent (at most [`READ_BUDGET`]) and runs it through its session.
fn read_client(c: &mut Client, ctx: &mut Context<'_>, events: &mut Vec<Event>) {
    let mut chunk = [0u8; 16 * 1024];
    let mut budget = READ_BUDGET;
    while budget > 0 && c.closing.is_none() {
        let n = match c.stream.read(&mut chunk) {
            Ok(0) => {
                c.close("client hung up");
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                c.close(format!("read failed: {e}"));
                return;
            }
        };
        budget = budget.saturating_sub(n);
        c.inbuf
            .extend_from_slice(chunk.get(..n).unwrap_or_default());
        match c.session.receive(&c.inbuf, ctx, events) {
            Ok(used) => {
                c.inbuf.drain(..used.min(c.inbuf.len()));
                // Every message that must be whole fits MAX_BUFFERED_MESSAGE; anything longer
                // that the session did not consume is not RFB.
                if c.inbuf.len() > MAX_BUFFERED_MESSAGE {
                    c.close("message too long");
                }
            }
            Err(e) => {
                c.close(format!("protocol error: {}", error_chain(&e)));
            }
        }
    }
}

use child::error_chain;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::InputQueue;

    fn server(fb: &Vec<u8>) -> Server<'_, InputQueue> {
        let setup = DisplaySetup {
            width: 64,
            height: 64,
            max_width: 64,
            max_height: 64,
            framebuffer_bytes: 64 * 64 * 4,
            password: None,
            share: SharePolicy::AllowExclusive,
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        Server::new(fb, setup, "t".into(), listener, InputQueue::default())
    }

    #[test]
    fn the_scan_interval_eases_from_fast_to_slow_to_idle_as_the_screen_stays_quiet() {
        let t = Instant::now();
        let at = |d: Duration| Server::<InputQueue>::scan_interval(t, t + d);
        assert_eq!(at(Duration::ZERO), SCAN_FAST);
        assert_eq!(
            at(QUIET_AFTER.saturating_sub(Duration::from_millis(1))),
            SCAN_FAST
        );
        assert_eq!(at(QUIET_AFTER), SCAN_SLOW);
        assert_eq!(
            at(IDLE_AFTER.saturating_sub(Duration::from_millis(1))),
            SCAN_SLOW
        );
        assert_eq!(at(IDLE_AFTER), SCAN_IDLE);
        assert_eq!(at(Duration::from_hours(1)), SCAN_IDLE);
    }

    #[test]
    fn client_input_on_an_idle_screen_brings_the_next_scan_forward() {
        let fb = vec![0u8; 64 * 64 * 4];
        let mut s = server(&fb);
        let long_ago = Instant::now();
        s.active_at = long_ago;
        s.next_scan = long_ago + Duration::from_mins(1);
        let before = Instant::now();
        s.handle_events(&[Event::Input]);
        assert!(
            s.next_scan <= Instant::now() + SCAN_FAST,
            "fast again at once"
        );
        assert!(s.active_at >= before, "input counts as activity");
        let soon = s.next_scan;
        s.handle_events(&[Event::WantsExclusive]);
        assert_eq!(s.next_scan, soon, "other events leave the clock alone");
    }
}
