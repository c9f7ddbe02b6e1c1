//! Console viewers: every `vm console` attached to the guest (a socket each), and the
//! terminal of `vm start -f`.
//!
//! Output to a socket viewer never blocks the supervisor: what the socket does not take at
//! once waits in a bounded queue, and a viewer that falls further behind is disconnected.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv, send};

/// Most output queued for one slow socket viewer before it is dropped.
pub const MAX_VIEWER_BACKLOG: usize = 1024 * 1024;
/// Most keyboard input queued for the guest; more is dropped.
pub const MAX_INPUT_BACKLOG: usize = 64 * 1024;

/// Where a viewer's bytes come from and go to.
#[derive(Debug)]
enum Ends {
    /// A `vm console` socket, both directions, never blocking.
    Socket(OwnedFd),
    /// `vm start -f`: stdin (until EOF) and stdout, written blocking.
    Terminal {
        input: Option<OwnedFd>,
        output: OwnedFd,
    },
}

/// One attached console.
#[derive(Debug)]
pub struct Viewer {
    ends: Ends,
    backlog: VecDeque<u8>,
    /// The input side reached end of file; output continues.
    input_done: bool,
    /// The viewer is gone (an error writing or a hang-up).
    closed: bool,
}

/// What reading a viewer's input gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    Data(Vec<u8>),
    Nothing,
    Eof,
}

impl Viewer {
    /// A `vm console` socket.
    pub fn socket(fd: OwnedFd) -> Viewer {
        Viewer {
            ends: Ends::Socket(fd),
            backlog: VecDeque::new(),
            input_done: false,
            closed: false,
        }
    }

    /// The foreground terminal.
    pub fn terminal(input: OwnedFd, output: OwnedFd) -> Viewer {
        Viewer {
            ends: Ends::Terminal {
                input: Some(input),
                output,
            },
            backlog: VecDeque::new(),
            input_done: false,
            closed: false,
        }
    }

    /// The descriptor to poll for input, while input is open.
    pub fn input_fd(&self) -> Option<BorrowedFd<'_>> {
        if self.input_done || self.closed {
            return None;
        }
        match &self.ends {
            Ends::Socket(fd) => Some(fd.as_fd()),
            Ends::Terminal { input, .. } => input.as_ref().map(AsFd::as_fd),
        }
    }

    /// The descriptor to poll for writability, while output is queued.
    pub fn output_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.ends {
            Ends::Socket(fd) if !self.backlog.is_empty() && !self.closed => Some(fd.as_fd()),
            _ => None,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Reads what the viewer typed.
    pub fn read_input(&mut self) -> Input {
        let mut buf = [0u8; 4096];
        let result = match &mut self.ends {
            Ends::Socket(fd) => recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT),
            Ends::Terminal {
                input: Some(fd), ..
            } => nix::unistd::read(fd.as_fd(), &mut buf),
            Ends::Terminal { input: None, .. } => return Input::Nothing,
        };
        match result {
            Ok(0) => {
                self.input_done = true;
                if let Ends::Terminal { input, .. } = &mut self.ends {
                    *input = None;
                }
                Input::Eof
            }
            Ok(n) => Input::Data(buf.get(..n).unwrap_or_default().to_vec()),
            Err(Errno::EAGAIN | Errno::EINTR) => Input::Nothing,
            Err(_) => {
                self.input_done = true;
                if matches!(self.ends, Ends::Socket(_)) {
                    self.closed = true;
                }
                Input::Eof
            }
        }
    }

    /// Sends guest output to the viewer.
    pub fn write_output(&mut self, data: &[u8]) {
        if self.closed {
            return;
        }
        match &self.ends {
            Ends::Terminal { output, .. } => {
                if write_all_blocking(output.as_fd(), data).is_err() {
                    self.closed = true;
                }
            }
            Ends::Socket(_) => {
                if self.backlog.len().saturating_add(data.len()) > MAX_VIEWER_BACKLOG {
                    tracing::info!("dropping a console viewer that fell behind");
                    self.closed = true;
                    return;
                }
                self.backlog.extend(data);
                self.flush();
            }
        }
    }

    /// Writes as much queued output as the socket takes now.
    pub fn flush(&mut self) {
        let Ends::Socket(fd) = &self.ends else {
            return;
        };
        while !self.backlog.is_empty() && !self.closed {
            let (front, _) = self.backlog.as_slices();
            match send(
                fd.as_raw_fd(),
                front,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(n) => {
                    self.backlog.drain(..n.min(self.backlog.len()));
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return,
                Err(_) => self.closed = true,
            }
        }
    }
}

/// Writes all of `data` to a blocking descriptor.
pub fn write_all_blocking(fd: BorrowedFd<'_>, mut data: &[u8]) -> nix::Result<()> {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(0) => return Err(Errno::EPIPE),
            Ok(n) => data = data.get(n..).unwrap_or_default(),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;
    use std::io::Read;

    #[test]
    fn socket_viewer_gets_output_and_sends_input() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut viewer = Viewer::socket(OwnedFd::from(ours));
        let mut theirs = theirs;

        viewer.write_output(b"login: ");
        let mut got = [0u8; 7];
        theirs.read_exact(&mut got).unwrap();
        std::io::Write::write_all(&mut theirs, b"root\n").unwrap();
        let input = viewer.read_input();

        assert_eq!(&got, b"login: ");
        assert_eq!(input, Input::Data(b"root\n".to_vec()));
    }

    #[test]
    fn a_viewer_that_never_reads_is_dropped_not_waited_for() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let mut viewer = Viewer::socket(OwnedFd::from(ours));
        let chunk = vec![b'x'; 64 * 1024];

        for _ in 0..64 {
            viewer.write_output(&chunk);
        }

        assert!(viewer.is_closed());
    }

    #[test]
    fn a_hung_up_viewer_is_closed() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut viewer = Viewer::socket(OwnedFd::from(ours));
        drop(theirs);

        assert_eq!(viewer.read_input(), Input::Eof);
        viewer.write_output(b"anyone?");

        assert!(viewer.is_closed());
    }
}
