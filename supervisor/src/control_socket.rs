//! A running guest's control socket, `GUEST_DIR/run/control.sock`: the per-VM supervisor
//! listens on it, the `vm` command connects to it.
//!
//! It is a `SOCK_SEQPACKET` unix socket in a `0700` directory (the socket itself `0600`), so
//! only root reaches it. Each connection carries a [`ChannelKind::Control`] handshake, one
//! [`Request`] and one [`Reply`] (see [`proto::control`]).
//!
//! A unix socket path is limited to about 100 bytes; a guest directory deeper than that is
//! reached through `/proc/self/fd/N/control.sock`, `N` being an `O_PATH` descriptor of the
//! `run` directory.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, accept4, bind, connect, listen, socket,
};
use proto::channel::{Channel, ChannelError, ChannelKind};
use proto::control::{ControlError, Reply, Request};

/// The directory in a guest's directory holding its run-time files.
pub const RUN_DIR: &str = "run";
/// The control socket's name in [`RUN_DIR`].
pub const CONTROL_SOCKET: &str = "control.sock";
/// How long the supervisor waits for a client's handshake or request (a client that
/// connected and says nothing must not hold the supervisor's loop).
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client waits for the supervisor's handshake and reply. The supervisor serves
/// its socket from the same loop that starts a rebooting guest's new runner (up to the
/// runner's start limit), so this is longer: measured in the emulated test host, 5 s was
/// once too short right after a `vm reset`.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest socket path used directly.
const MAX_DIRECT_PATH: usize = 100;

/// Why the control socket could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ControlSocketError {
    #[error("{op} {path} failed")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the guest's supervisor does not answer on {0}")]
    NotListening(PathBuf),
    #[error("talking to the guest's supervisor failed")]
    Channel(#[from] ChannelError),
    #[error("the supervisor's reply is malformed")]
    BadReply(#[from] ControlError),
    #[error("{0}")]
    Refused(String),
}

/// `GUEST_DIR/run/control.sock`.
pub fn socket_path(guest_dir: &Path) -> PathBuf {
    guest_dir.join(RUN_DIR).join(CONTROL_SOCKET)
}

/// Runs `op` with an address for `run_dir/name` that fits in a `sockaddr_un`.
fn with_address<T>(
    run_dir: &Path,
    name: &str,
    op: impl FnOnce(&UnixAddr) -> nix::Result<T>,
) -> io::Result<T> {
    let direct = run_dir.join(name);
    if direct.as_os_str().len() <= MAX_DIRECT_PATH {
        let addr = UnixAddr::new(&direct)?;
        return op(&addr).map_err(io::Error::from);
    }
    let dir = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(run_dir)?;
    let short = format!("/proc/self/fd/{}/{name}", dir.as_raw_fd());
    let addr = UnixAddr::new(short.as_str())?;
    let result = op(&addr).map_err(io::Error::from);
    drop(dir);
    result
}

/// The supervisor's listening socket. Creates `GUEST_DIR/run` (`0700`) and replaces a stale
/// socket left by a supervisor that died: call only while holding the guest's run lock.
pub fn listen_at(guest_dir: &Path) -> Result<OwnedFd, ControlSocketError> {
    let run_dir = guest_dir.join(RUN_DIR);
    let io_err = |op, path: &Path| {
        let path = path.to_owned();
        move |source| ControlSocketError::Io { op, path, source }
    };
    match fs::DirBuilder::new().mode(0o700).create(&run_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("creating", &run_dir)(e)),
    }
    fs::set_permissions(&run_dir, fs::Permissions::from_mode(0o700))
        .map_err(io_err("securing", &run_dir))?;
    let path = socket_path(guest_dir);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("removing the stale", &path)(e)),
    }
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| io_err("creating a socket for", &path)(e.into()))?;
    with_address(&run_dir, CONTROL_SOCKET, |addr| {
        bind(sock.as_raw_fd(), addr)
    })
    .map_err(io_err("binding", &path))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
        .map_err(io_err("securing", &path))?;
    listen(&sock, Backlog::new(16).unwrap_or(Backlog::MAXCONN))
        .map_err(|e| io_err("listening on", &path)(e.into()))?;
    Ok(sock)
}

/// Accepts one pending connection; `None` if there is none (the listener is non-blocking).
pub fn accept(listener: &OwnedFd) -> io::Result<Option<Channel>> {
    match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        Ok(fd) => Ok(Some(Channel::from_fd(unsafe { OwnedFd::from_raw_fd(fd) }))),
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::ECONNABORTED) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Connects to the supervisor of the guest in `guest_dir` and completes the handshake.
pub fn connect_to(guest_dir: &Path) -> Result<Channel, ControlSocketError> {
    let path = socket_path(guest_dir);
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| ControlSocketError::Io {
        op: "creating a socket for",
        path: path.clone(),
        source: e.into(),
    })?;
    with_address(&guest_dir.join(RUN_DIR), CONTROL_SOCKET, |addr| {
        connect(sock.as_raw_fd(), addr)
    })
    .map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ControlSocketError::NotListening(path.clone())
        }
        _ => ControlSocketError::Io {
            op: "connecting to",
            path: path.clone(),
            source: e,
        },
    })?;
    let channel = Channel::from_fd(sock);
    channel.handshake_timeout(ChannelKind::Control, CLIENT_TIMEOUT)?;
    Ok(channel)
}

/// Sends `request` to the guest's supervisor and returns its reply and the fds it carries.
/// A [`Reply::Error`] becomes [`ControlSocketError::Refused`].
pub fn request(
    guest_dir: &Path,
    request: &Request,
) -> Result<(Reply, Vec<OwnedFd>), ControlSocketError> {
    let channel = connect_to(guest_dir)?;
    channel.send(request, &[])?;
    let received = channel.recv_timeout::<Reply>(CLIENT_TIMEOUT)?;
    received.msg.validate()?;
    match received.msg {
        Reply::Error { message } => Err(ControlSocketError::Refused(message)),
        Reply::Ok => {
            let (reply, fds) = received.expect_fds(request.reply_fds())?;
            Ok((reply, fds))
        }
        Reply::Status(_) => Ok(received.expect_fds(0)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_guest_directory_still_gets_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("d".repeat(120));
        fs::create_dir(&deep).unwrap();
        let listener = listen_at(&deep).unwrap();
        let server = std::thread::spawn(move || {
            loop {
                if let Some(ch) = accept(&listener).unwrap() {
                    ch.set_nonblocking(false).unwrap();
                    ch.handshake(ChannelKind::Control).unwrap();
                    let req = ch.recv::<Request>().unwrap().msg;
                    assert_eq!(req, Request::Status);
                    ch.send(&Reply::error("no status here"), &[]).unwrap();
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });

        let result = request(&deep, &Request::Status);

        server.join().unwrap();
        match result {
            Err(ControlSocketError::Refused(m)) => assert_eq!(m, "no status here"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_socket_is_not_listening() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            connect_to(dir.path()),
            Err(ControlSocketError::NotListening(_))
        ));
    }

    #[test]
    fn a_stale_socket_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let first = listen_at(dir.path()).unwrap();
        drop(first);
        assert!(matches!(
            connect_to(dir.path()),
            Err(ControlSocketError::NotListening(_))
        ));
        let _second = listen_at(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(RUN_DIR))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
