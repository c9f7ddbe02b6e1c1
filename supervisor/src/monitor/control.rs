//! The control socket side of the supervisor: one request per connection (see
//! [`proto::control`]), answered from the run loop.

#![forbid(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use proto::channel::{Channel, ChannelKind};
use proto::control::{ProcessInfo, Reply, Request, VmStatus};

use super::viewers::Viewer;
use super::{Intent, Monitor, runner};
use crate::control_socket::{self, EXCHANGE_TIMEOUT};

impl Monitor<'_> {
    /// Serves every pending control connection.
    pub(super) fn accept_clients(&mut self) {
        for _ in 0..16 {
            match control_socket::accept(&self.listener) {
                Ok(Some(channel)) => self.serve(&channel),
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a control connection failed");
                    return;
                }
            }
        }
    }

    /// One control connection: handshake, one request, one reply.
    fn serve(&mut self, channel: &Channel) {
        if channel
            .handshake_timeout(ChannelKind::Control, EXCHANGE_TIMEOUT)
            .is_err()
        {
            return;
        }
        let request = match channel
            .recv_timeout::<Request>(EXCHANGE_TIMEOUT)
            .and_then(|r| r.expect_fds(0))
        {
            Ok((request, _)) => request,
            Err(e) => {
                let _ = channel.send(&Reply::error(&format!("bad request: {e}")), &[]);
                return;
            }
        };
        if let Err(e) = request.validate() {
            let _ = channel.send(&Reply::error(&e.to_string()), &[]);
            return;
        }
        let (reply, fd) = self.handle(&request);
        let sent = match &fd {
            Some(fd) => channel.send(&reply, &[fd.as_fd()]),
            None => channel.send(&reply, &[]),
        };
        if let Err(e) = sent {
            tracing::info!(error = %e, "a control client left before its reply");
        }
    }

    fn handle(&mut self, request: &Request) -> (Reply, Option<OwnedFd>) {
        match *request {
            Request::Status => (Reply::Status(self.status()), None),
            Request::Stop { timeout_secs } => {
                self.log.line("stop requested, sending ACPI shutdown");
                self.press_power_button(timeout_secs, false);
                (Reply::Ok, None)
            }
            Request::Restart => {
                self.log.line("restart requested, sending ACPI shutdown");
                self.press_power_button(self.cfg.plan.stop_timeout, true);
                (Reply::Ok, None)
            }
            Request::Reset => {
                self.log.line("reset requested");
                self.intent = Intent::Reset;
                self.kill_runner();
                (Reply::Ok, None)
            }
            Request::Poweroff => {
                self.log.line("poweroff requested");
                self.intent = Intent::Poweroff;
                self.kill_runner();
                (Reply::Ok, None)
            }
            Request::ConsoleAttach => match self.attach_viewer() {
                Ok(fd) => (Reply::Ok, Some(fd)),
                Err(e) => (Reply::error(&format!("attaching failed: {e}")), None),
            },
        }
    }

    /// A new viewer: its end of a fresh socketpair, primed with the ring's contents.
    fn attach_viewer(&mut self) -> nix::Result<OwnedFd> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let mut viewer = Viewer::socket(ours);
        viewer.write_output(&self.console.ring.contents());
        self.console.viewers.push(viewer);
        Ok(theirs)
    }

    fn status(&self) -> VmStatus {
        let pid = self.runner.pid();
        let mut processes = vec![ProcessInfo {
            role: "vcpu-runner".to_owned(),
            pid,
            rss_kib: runner::rss_kib(pid),
            restarts: self.restarts,
        }];
        // A device that is dead (waiting for its restart, or failed) shows pid 0.
        for device in &self.runner.devices {
            let alive = device.status.is_none();
            let pid = if alive { device.pid() } else { 0 };
            processes.push(ProcessInfo {
                role: if device.failed {
                    format!("{}:failed", device.name)
                } else {
                    device.name.clone()
                },
                pid,
                rss_kib: if alive { runner::rss_kib(pid) } else { 0 },
                restarts: device.restarts,
            });
        }
        if let Some(dev_fb) = &self.runner.display {
            let mut role = self
                .graphics
                .as_ref()
                .map_or_else(|| "dev-fb".to_owned(), |g| g.console.role());
            if dev_fb.failed {
                role.push_str(":failed");
            }
            let alive = dev_fb.status.is_none();
            let pid = if alive { dev_fb.pid() } else { 0 };
            processes.push(ProcessInfo {
                role,
                pid,
                rss_kib: if alive { runner::rss_kib(pid) } else { 0 },
                restarts: dev_fb.restarts,
            });
        }
        VmStatus {
            pid: std::process::id(),
            uptime_secs: self.started_at.elapsed().as_secs(),
            processes,
            vnc: self.graphics.as_ref().map(|g| g.console.endpoint()),
        }
    }
}
