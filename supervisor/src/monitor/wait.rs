//! `graphics_wait`: the guest boots only once a VNC client connects (bhyve's `wait` option of
//! its framebuffer; vm-bhyve's `graphics_wait="auto"` means during `vm install` only).
//!
//! The supervisor has bound the VNC port; before the first boot it polls that listener for a
//! pending connection without accepting it: the client waits in the listen backlog and the
//! boot's dev-fb, which shares the listening socket, accepts it. Meanwhile the control socket
//! answers `vm info` (no processes yet, the VNC address), `vm stop` and `vm poweroff` end the
//! run before the guest ever ran, and a signal ends it too.

#![forbid(unsafe_code)]

use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signalfd::SignalFd;
use proto::channel::{Channel, ChannelKind};
use proto::control::{Reply, Request, VmStatus};

use crate::control_socket::{self, EXCHANGE_TIMEOUT};

/// How the wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waited {
    /// A VNC client is connecting: boot.
    Client,
    /// `vm stop`, `vm poweroff` or a signal: end the run without booting. The text says which.
    Stopped(String),
}

/// Waits for a connection on `vnc`, serving `control` and watching `signals` meanwhile.
pub fn wait_for_viewer(
    vnc: &TcpListener,
    vnc_endpoint: &str,
    control: &OwnedFd,
    signals: &SignalFd,
) -> Result<Waited, Errno> {
    let since = Instant::now();
    loop {
        let (client, request, signal) = {
            let mut fds = [
                PollFd::new(vnc.as_fd(), PollFlags::POLLIN),
                PollFd::new(control.as_fd(), PollFlags::POLLIN),
                PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
            let ready = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]), ready(&fds[2]))
        };
        if signal {
            let name = signals
                .read_signal()
                .ok()
                .flatten()
                .and_then(|s| i32::try_from(s.ssi_signo).ok())
                .and_then(|n| nix::sys::signal::Signal::try_from(n).ok())
                .map_or("a signal", nix::sys::signal::Signal::as_str);
            return Ok(Waited::Stopped(format!("{name} received")));
        }
        if client {
            return Ok(Waited::Client);
        }
        if request {
            for _ in 0..16 {
                match control_socket::accept(control) {
                    Ok(Some(channel)) => {
                        if let Some(stopped) = serve(&channel, vnc_endpoint, since) {
                            return Ok(Waited::Stopped(stopped));
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a control connection failed");
                        break;
                    }
                }
            }
        }
    }
}

/// One control request while waiting; `Some` when it ends the run.
fn serve(channel: &Channel, vnc_endpoint: &str, since: Instant) -> Option<String> {
    if channel
        .handshake_timeout(ChannelKind::Control, EXCHANGE_TIMEOUT)
        .is_err()
    {
        return None;
    }
    let request = match channel
        .recv_timeout::<Request>(EXCHANGE_TIMEOUT)
        .and_then(|r| r.expect_fds(0))
    {
        Ok((request, _)) => request,
        Err(e) => {
            let _ = channel.send(&Reply::error(&format!("bad request: {e}")), &[]);
            return None;
        }
    };
    let (reply, stopped) = match reply_to(&request, vnc_endpoint, since) {
        Ok(reply) => (reply, None),
        Err(stopped) => (Reply::Ok, Some(stopped)),
    };
    let _ = channel.send(&reply, &[]);
    stopped
}

/// The reply to `request` while no guest runs, or why the run ends.
fn reply_to(request: &Request, vnc_endpoint: &str, since: Instant) -> Result<Reply, String> {
    match request {
        Request::Status => Ok(Reply::Status(VmStatus {
            pid: std::process::id(),
            uptime_secs: since.elapsed().as_secs(),
            processes: Vec::new(),
            vnc: Some(vnc_endpoint.to_owned()),
        })),
        Request::Stop { .. } => Err("stop requested".to_owned()),
        Request::Poweroff => Err("poweroff requested".to_owned()),
        Request::Reset | Request::Restart | Request::ConsoleAttach => Ok(Reply::error(&format!(
            "the guest has not booted: it waits for a VNC client on {vnc_endpoint} (graphics_wait)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn while_waiting_status_names_the_vnc_address_and_stop_ends_the_run() {
        let since = Instant::now();
        let Ok(Reply::Status(status)) = reply_to(&Request::Status, "127.0.0.1:5900", since) else {
            panic!("status");
        };
        assert_eq!(status.vnc.as_deref(), Some("127.0.0.1:5900"));
        assert!(status.processes.is_empty());
        assert_eq!(
            reply_to(&Request::Stop { timeout_secs: 5 }, "x", since),
            Err("stop requested".to_owned())
        );
        assert_eq!(
            reply_to(&Request::Poweroff, "x", since),
            Err("poweroff requested".to_owned())
        );
        assert!(matches!(
            reply_to(&Request::Reset, "x", since),
            Ok(Reply::Error { .. })
        ));
    }

    #[test]
    fn a_pending_connection_ends_the_wait_without_being_accepted() {
        let vnc = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = vnc.local_addr().expect("addr");
        let dir = tempfile::tempdir().expect("tempdir");
        let control = control_socket::listen_at(dir.path()).expect("control");
        let mut mask = nix::sys::signal::SigSet::empty();
        mask.add(nix::sys::signal::Signal::SIGUSR2);
        let signals = SignalFd::new(&mask).expect("signalfd");
        let client = std::net::TcpStream::connect(addr).expect("connect");
        let waited = wait_for_viewer(&vnc, "x", &control, &signals).expect("wait");
        assert_eq!(waited, Waited::Client);
        // Still in the backlog for dev-fb to accept.
        vnc.set_nonblocking(true).expect("nonblocking");
        let (accepted, _) = vnc.accept().expect("pending connection");
        assert_eq!(
            accepted.peer_addr().expect("peer"),
            client.local_addr().expect("local")
        );
    }
}
