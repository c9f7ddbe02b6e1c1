//! `vm console NAME`: the guest's COM1 on this terminal (or on a pipe, for scripts).
//!
//! The supervisor hands over a stream socket, first replaying what the guest printed since
//! it started, then live output. Typed bytes go to the guest. `~.` at the start of a line
//! detaches (as `cu` and `ssh` do); `~~` sends one `~`. On a terminal, raw mode is on while
//! attached. When stdin is not a terminal its end of file stops the sending only: output is
//! still printed until the console closes, which happens when the guest ends.

#![forbid(unsafe_code)]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::termios::{SetArg, Termios, cfmakeraw, tcgetattr, tcsetattr};
use proto::control::Request;

use crate::control_socket::{self, ControlSocketError};
use crate::monitor::viewers::write_all_blocking;

/// Why the console session failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error(transparent)]
    Control(#[from] ControlSocketError),
    #[error("the supervisor sent no console descriptor")]
    NoDescriptor,
    #[error("console I/O failed")]
    Io(#[source] nix::Error),
}

/// Puts a terminal in raw mode until dropped.
#[derive(Debug)]
pub struct RawMode {
    fd: OwnedFd,
    saved: Termios,
}

impl RawMode {
    /// Raw mode on `fd` if it is a terminal; `None` if it is not (or cannot be changed).
    pub fn enable(fd: BorrowedFd<'_>) -> Option<RawMode> {
        let saved = tcgetattr(fd).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(fd, SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode {
            fd: fd.try_clone_to_owned().ok()?,
            saved,
        })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = tcsetattr(self.fd.as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// Finds `~.` at the start of a line in typed input.
#[derive(Debug, Clone)]
pub struct EscapeScanner {
    at_line_start: bool,
    saw_tilde: bool,
}

impl Default for EscapeScanner {
    fn default() -> Self {
        EscapeScanner {
            at_line_start: true,
            saw_tilde: false,
        }
    }
}

impl EscapeScanner {
    /// The bytes to send for `input`, and whether `~.` asked to detach (bytes after it are
    /// dropped).
    pub fn scan(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.saw_tilde {
                self.saw_tilde = false;
                match b {
                    b'.' => return (out, true),
                    b'~' => out.push(b'~'),
                    other => out.extend([b'~', other]),
                }
            } else if self.at_line_start && b == b'~' {
                self.saw_tilde = true;
                continue;
            } else {
                out.push(b);
            }
            self.at_line_start = matches!(b, b'\r' | b'\n');
        }
        (out, false)
    }
}

/// Attaches to the console of the guest in `guest_dir` and copies between it and stdio until
/// the user detaches or the console closes.
pub fn attach(guest_dir: &Path, name: &str) -> Result<(), ConsoleError> {
    let (_, fds) = control_socket::request(guest_dir, &Request::ConsoleAttach)?;
    let console = fds.into_iter().next().ok_or(ConsoleError::NoDescriptor)?;
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let raw = RawMode::enable(stdin.as_fd());
    if raw.is_some() {
        let note = format!("Connected to {name} (type ~. to detach)\r\n");
        let _ = write_all_blocking(std::io::stderr().as_fd(), note.as_bytes());
    }
    let result = copy(console.as_fd(), stdin.as_fd(), stdout.as_fd());
    drop(raw);
    result
}

fn copy(
    console: BorrowedFd<'_>,
    stdin: BorrowedFd<'_>,
    stdout: BorrowedFd<'_>,
) -> Result<(), ConsoleError> {
    let mut scanner = EscapeScanner::default();
    let mut stdin_open = true;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let mut fds = vec![PollFd::new(console, PollFlags::POLLIN)];
        if stdin_open {
            fds.push(PollFd::new(stdin, PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(ConsoleError::Io(e)),
        }
        let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
        let console_ready = fds.first().is_some_and(ready);
        let stdin_ready = fds.get(1).is_some_and(ready);
        drop(fds);
        if console_ready {
            match nix::unistd::read(console, &mut buf) {
                Ok(0) | Err(Errno::ECONNRESET) => return Ok(()),
                Ok(n) => write_all_blocking(stdout, buf.get(..n).unwrap_or_default())
                    .map_err(ConsoleError::Io)?,
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(e) => return Err(ConsoleError::Io(e)),
            }
        }
        if stdin_ready {
            match nix::unistd::read(stdin, &mut buf) {
                Ok(0) => stdin_open = false,
                Ok(n) => {
                    let (send, detach) = scanner.scan(buf.get(..n).unwrap_or_default());
                    match write_all_blocking(console, &send) {
                        Ok(()) => {}
                        Err(Errno::EPIPE | Errno::ECONNRESET) => return Ok(()),
                        Err(e) => return Err(ConsoleError::Io(e)),
                    }
                    if detach {
                        return Ok(());
                    }
                }
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(_) => stdin_open = false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tilde_dot_at_line_start_detaches() {
        let mut s = EscapeScanner::default();
        assert_eq!(s.scan(b"ls\n~."), (b"ls\n".to_vec(), true));
    }

    #[test]
    fn tilde_dot_at_the_very_start_detaches() {
        let mut s = EscapeScanner::default();
        assert_eq!(s.scan(b"~.more"), (Vec::new(), true));
    }

    #[test]
    fn tilde_inside_a_line_is_sent() {
        let mut s = EscapeScanner::default();
        assert_eq!(s.scan(b"cd ~.x\n"), (b"cd ~.x\n".to_vec(), false));
    }

    #[test]
    fn escape_split_across_reads_still_detaches() {
        let mut s = EscapeScanner::default();
        assert_eq!(s.scan(b"a\r~"), (b"a\r".to_vec(), false));
        assert_eq!(s.scan(b"."), (Vec::new(), true));
    }

    #[test]
    fn double_tilde_sends_one_and_other_bytes_pass() {
        let mut s = EscapeScanner::default();
        assert_eq!(s.scan(b"~~.\n~x"), (b"~.\n~x".to_vec(), false));
    }
}
