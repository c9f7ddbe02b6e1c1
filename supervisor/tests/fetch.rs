//! `supervisor::fetch` against real servers on 127.0.0.1: Python's `http.server` (also wrapped in
//! TLS), pyftpdlib, and small scripted servers written here for the misbehaviour real servers do
//! not show on demand (short bodies, trickling, redirect loops, hostile FTP replies). Interrupts
//! and the `CAPVM_CA_FILE` trust anchor are tested in a child process: this test binary re-run
//! with `CHILD_ENV` set, so signals and environment stay out of the parallel tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use supervisor::fetch::{FetchError, FtpError, MAX_REDIRECTS, Options, download};

const PLAIN: Options = Options {
    decompress: false,
    progress: false,
};
const DECOMPRESS: Options = Options {
    decompress: true,
    progress: false,
};

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// Deterministic incompressible bytes (xorshift64).
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn xz(data: &[u8]) -> Vec<u8> {
    let mut encoder = xz2::write::XzEncoder::new(Vec::new(), 1);
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// The names in `dir`, hidden ones included, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn have_python_module(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A server process this test started; killed and reaped on drop.
struct Served {
    child: Child,
    port: u16,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `command(port)` on a free port and waits until it accepts; retries on another port if
/// the server dies (another test may have taken the port in between).
fn serve(mut command: impl FnMut(u16) -> Command) -> Served {
    for _ in 0..5 {
        let port = free_port();
        let child = command(port)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start the server");
        let mut served = Served { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if served.child.try_wait().unwrap().is_some() {
                break;
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return served;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = served.child.kill();
    }
    panic!("server did not come up");
}

fn http_server(dir: &Path) -> Served {
    let dir = dir.to_owned();
    serve(move |port| {
        let mut command = Command::new("python3");
        command
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .arg("--directory")
            .arg(&dir);
        command
    })
}

/// A hand-written HTTP server: for each connection, reads the request head and hands the
/// stream to `respond`. Returns the port and the number of requests seen.
fn raw_http_server(
    respond: impl Fn(&mut TcpStream) + Send + Sync + 'static,
) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&requests);
    let respond = Arc::new(respond);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let respond = Arc::clone(&respond);
            seen.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                respond(&mut stream);
            });
        }
    });
    (port, requests)
}

/// A scripted FTP server; see `serve_fake_ftp` for the dialogue.
#[derive(Clone)]
struct FakeFtp {
    greeting: Vec<u8>,
    epsv: bool,
    payload: Vec<u8>,
    size: u64,
    final_reply: &'static str,
    /// After the first KiB, hold both connections open without sending more.
    stall: bool,
}

impl FakeFtp {
    fn new(payload: Vec<u8>) -> Self {
        FakeFtp {
            greeting: b"220-fake ftp\r\n220 ready\r\n".to_vec(),
            epsv: true,
            size: payload.len() as u64,
            payload,
            final_reply: "226 transfer complete",
            stall: false,
        }
    }

    /// Starts serving one client; returns the port and the log of received command lines.
    fn start(self) -> (u16, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let server_log = Arc::clone(&log);
        thread::spawn(move || {
            if let Ok((control, _)) = listener.accept() {
                let _ = serve_fake_ftp(control, &self, &server_log);
            }
        });
        (port, log)
    }
}

fn serve_fake_ftp(
    mut control: TcpStream,
    script: &FakeFtp,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    control.write_all(&script.greeting)?;
    let mut reader = BufReader::new(control.try_clone()?);
    let mut data_listener: Option<TcpListener> = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim_end().to_owned();
        log.lock().unwrap().push(line.clone());
        let command = line.split(' ').next().unwrap_or_default();
        let reply = match command {
            "USER" => "331 password please".to_owned(),
            "PASS" => "230 logged in".to_owned(),
            "TYPE" => "200 type set".to_owned(),
            "CWD" => "250 directory changed".to_owned(),
            "SIZE" => format!("213 {}", script.size),
            "EPSV" if script.epsv => {
                let listener = TcpListener::bind("127.0.0.1:0")?;
                let port = listener.local_addr()?.port();
                data_listener = Some(listener);
                format!("229 Entering Extended Passive Mode (|||{port}|)")
            }
            "PASV" => {
                let listener = TcpListener::bind("127.0.0.1:0")?;
                let port = listener.local_addr()?.port();
                data_listener = Some(listener);
                // Names an address the client must not use: only 127.0.0.1 listens.
                format!(
                    "227 Entering Passive Mode (198,18,0,1,{},{})",
                    port >> 8,
                    port & 0xff
                )
            }
            "RETR" => {
                control.write_all(b"150 opening data connection\r\n")?;
                let (mut data, _) = data_listener
                    .take()
                    .expect("RETR before EPSV/PASV")
                    .accept()?;
                if script.stall {
                    let first = script.payload.get(..1024).unwrap_or(&script.payload);
                    data.write_all(first)?;
                    // Hold on until the client goes away (or a minute passes).
                    control.set_read_timeout(Some(Duration::from_mins(1)))?;
                    let _ = reader.read_line(&mut String::new());
                    return Ok(());
                }
                data.write_all(&script.payload)?;
                drop(data);
                script.final_reply.to_owned()
            }
            "QUIT" => {
                control.write_all(b"221 bye\r\n")?;
                return Ok(());
            }
            _ => "502 not implemented".to_owned(),
        };
        control.write_all(format!("{reply}\r\n").as_bytes())?;
    }
}

// --- child process ------------------------------------------------------------------------------

/// "URL\nDIR\nFLAGS" for the child; FLAGS holds `d` (decompress) and/or `p` (progress).
const CHILD_ENV: &str = "CAPVM_FETCH_TEST_CHILD";
const CHILD_TEST: &str = "child_process_download";

/// The child half of the interrupt, progress and TLS tests: one download, reported as the exit
/// code (0 done, 130 interrupted, 1 any other error, printed to stderr).
#[test]
#[ignore = "the child process of other tests in this file; not meant to run on its own"]
fn child_process_download() {
    let spec = std::env::var(CHILD_ENV)
        .expect("this is the child half of the interrupt/progress/TLS tests; run those instead");
    let mut parts = spec.splitn(3, '\n');
    let (url, dir, flags) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap_or(""),
    );
    let opts = Options {
        decompress: flags.contains('d'),
        progress: flags.contains('p'),
    };
    let code = match download(url, Path::new(dir), &opts) {
        Ok(_) => 0,
        Err(FetchError::Interrupted) => 130,
        Err(e) => {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message = format!("{message}: {cause}");
                source = cause.source();
            }
            eprintln!("child error: {message}");
            1
        }
    };
    std::process::exit(code);
}

fn spawn_child(url: &str, dir: &Path, flags: &str, ca_file: Option<&Path>) -> Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            CHILD_TEST,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{url}\n{}\n{flags}", dir.display()))
        .env_remove("CAPVM_CA_FILE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(ca_file) = ca_file {
        command.env("CAPVM_CA_FILE", ca_file);
    }
    // The child must take SIGINT as a terminal's ^C reaches it (`interrupt`). A suite started
    // in the background of a non-interactive shell inherits SIGINT ignored, and the download
    // rightly keeps an ignored SIGINT ignored (as a background job does), so those tests would
    // wait for an exit that never comes.
    // SAFETY: between fork and exec the closure only calls sigaction, which is
    // async-signal-safe, and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            let default = nix::sys::signal::SigAction::new(
                nix::sys::signal::SigHandler::SigDfl,
                nix::sys::signal::SaFlags::empty(),
                nix::sys::signal::SigSet::empty(),
            );
            nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGINT, &default)
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    command.spawn().unwrap()
}

fn wait_with_timeout(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child did not exit within {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Exit status and stderr of a child run to its end.
fn run_child(url: &str, dir: &Path, flags: &str, ca_file: Option<&Path>) -> (ExitStatus, String) {
    let mut child = spawn_child(url, dir, flags, ca_file);
    let mut stderr = child.stderr.take().unwrap();
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = wait_with_timeout(&mut child, Duration::from_mins(2));
    (status, reader.join().unwrap())
}

/// Waits until the child's partial file holds data, i.e. the transfer is under way.
fn wait_for_partial_data(part: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        assert!(
            child.try_wait().unwrap().is_none(),
            "child exited before the transfer began"
        );
        if std::fs::metadata(part).is_ok_and(|m| m.len() > 0) {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("{} never received data", part.display());
}

fn interrupt(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

#[test]
fn http_download_of_random_file_is_byte_identical() {
    let root = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let data = pseudo_random(3 << 20, 1);
    std::fs::write(root.path().join("random.bin"), &data).unwrap();
    let server = http_server(root.path());

    let path = download(
        &format!("http://127.0.0.1:{}/random.bin", server.port),
        dest.path(),
        &PLAIN,
    )
    .unwrap();

    assert_eq!(path, dest.path().join("random.bin"));
    assert!(std::fs::read(&path).unwrap() == data, "content differs");
    assert_eq!(entries(dest.path()), ["random.bin"]);
}

#[test]
fn http_percent_encoded_name_is_decoded() {
    let root = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("my disk.iso"), b"iso").unwrap();
    let server = http_server(root.path());

    let path = download(
        &format!("http://127.0.0.1:{}/my%20disk.iso", server.port),
        dest.path(),
        &PLAIN,
    )
    .unwrap();

    assert_eq!(path, dest.path().join("my disk.iso"));
    assert_eq!(std::fs::read(&path).unwrap(), b"iso");
}

#[test]
fn http_404_fails_and_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let server = http_server(root.path());

    let result = download(
        &format!("http://127.0.0.1:{}/missing.iso", server.port),
        dest.path(),
        &PLAIN,
    );

    assert!(
        matches!(result, Err(FetchError::HttpStatus { code: 404, .. })),
        "{result:?}"
    );
    assert!(entries(dest.path()).is_empty());
}

#[test]
fn http_gz_with_decompress_stores_decompressed_bytes_without_suffix() {
    let root = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let data = pseudo_random(2 << 20, 2);
    std::fs::write(root.path().join("disk.img.gz"), gzip(&data)).unwrap();
    let server = http_server(root.path());

    let path = download(
        &format!("http://127.0.0.1:{}/disk.img.gz", server.port),
        dest.path(),
        &DECOMPRESS,
    )
    .unwrap();

    assert_eq!(path, dest.path().join("disk.img"));
    assert!(std::fs::read(&path).unwrap() == data, "content differs");
    assert_eq!(entries(dest.path()), ["disk.img"]);
}

#[test]
fn http_xz_with_decompress_stores_decompressed_bytes_without_suffix() {
    let root = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let data = pseudo_random(2 << 20, 3);
    std::fs::write(root.path().join("disk.raw.xz"), xz(&data)).unwrap();
    let server = http_server(root.path());

    let path = download(
        &format!("http://127.0.0.1:{}/disk.raw.xz", server.port),
        dest.path(),
        &DECOMPRESS,
    )
    .unwrap();

    assert_eq!(path, dest.path().join("disk.raw"));
    assert!(std::fs::read(&path).unwrap() == data, "content differs");
    assert_eq!(entries(dest.path()), ["disk.raw"]);
}

#[test]
fn http_xz_without_decompress_is_stored_as_is() {
    let root = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let packed = xz(&pseudo_random(100_000, 4));
    std::fs::write(root.path().join("disk.raw.xz"), &packed).unwrap();
    let server = http_server(root.path());

    let path = download(
        &format!("http://127.0.0.1:{}/disk.raw.xz", server.port),
        dest.path(),
        &PLAIN,
    )
    .unwrap();

    assert_eq!(path, dest.path().join("disk.raw.xz"));
    assert_eq!(std::fs::read(&path).unwrap(), packed);
}

#[test]
fn http_corrupt_xz_with_decompress_fails_and_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let mut packed = xz(&pseudo_random(1 << 20, 5));
    let middle = packed.len() / 2;
    for byte in &mut packed[middle..middle + 64] {
        *byte ^= 0x5a;
    }
    std::fs::write(root.path().join("broken.img.xz"), &packed).unwrap();
    let server = http_server(root.path());

    let result = download(
        &format!("http://127.0.0.1:{}/broken.img.xz", server.port),
        dest.path(),
        &DECOMPRESS,
    );

    assert!(
        matches!(result, Err(FetchError::Decompress(_))),
        "{result:?}"
    );
    assert!(entries(dest.path()).is_empty());
}

#[test]
fn http_body_shorter_than_content_length_fails_and_leaves_nothing() {
    let dest = tempfile::tempdir().unwrap();
    let (port, _) = raw_http_server(|stream| {
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n");
        let _ = stream.write_all(&[7u8; 5000]);
    });

    let result = download(
        &format!("http://127.0.0.1:{port}/short.iso"),
        dest.path(),
        &PLAIN,
    );

    assert!(
        matches!(
            result,
            Err(FetchError::Truncated {
                received: 5000,
                expected: 100_000
            })
        ),
        "{result:?}"
    );
    assert!(entries(dest.path()).is_empty());
}

#[test]
fn http_redirect_loop_stops_at_the_limit_and_leaves_nothing() {
    let dest = tempfile::tempdir().unwrap();
    let (port, requests) = raw_http_server(|stream| {
        let _ = stream.write_all(
            b"HTTP/1.1 302 Found\r\nLocation: /loop.iso\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    });

    let result = download(
        &format!("http://127.0.0.1:{port}/loop.iso"),
        dest.path(),
        &PLAIN,
    );

    assert!(
        matches!(&result, Err(FetchError::HttpRequest(t)) if t.kind() == ureq::ErrorKind::TooManyRedirects),
        "{result:?}"
    );
    let seen = requests.load(Ordering::SeqCst);
    assert!(seen <= MAX_REDIRECTS as usize + 1, "{seen} requests");
    assert!(entries(dest.path()).is_empty());
}

#[test]
fn existing_target_fails_and_keeps_original() {
    let root = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("x.iso"), b"new content").unwrap();
    std::fs::write(dest.path().join("x.iso"), b"original").unwrap();
    let server = http_server(root.path());

    let result = download(
        &format!("http://127.0.0.1:{}/x.iso", server.port),
        dest.path(),
        &PLAIN,
    );

    assert!(matches!(&result, Err(FetchError::Exists(p)) if p == &dest.path().join("x.iso")));
    assert_eq!(
        std::fs::read(dest.path().join("x.iso")).unwrap(),
        b"original"
    );
    assert_eq!(entries(dest.path()), ["x.iso"]);
}

#[test]
fn decompressed_name_that_exists_fails_before_the_transfer() {
    let dest = tempfile::tempdir().unwrap();
    std::fs::write(dest.path().join("disk.img"), b"original").unwrap();
    // Nothing listens on this URL: the check must come first.
    let result = download("http://127.0.0.1:9/disk.img.gz", dest.path(), &DECOMPRESS);

    assert!(matches!(result, Err(FetchError::Exists(_))), "{result:?}");
    assert_eq!(
        std::fs::read(dest.path().join("disk.img")).unwrap(),
        b"original"
    );
}

#[test]
fn unsupported_scheme_fails_and_leaves_nothing() {
    let dest = tempfile::tempdir().unwrap();

    let result = download("gopher://127.0.0.1/x.iso", dest.path(), &PLAIN);

    assert!(
        matches!(result, Err(FetchError::UnsupportedScheme(_))),
        "{result:?}"
    );
    assert!(entries(dest.path()).is_empty());
}

#[test]
fn progress_lines_reach_stderr_when_it_is_not_a_terminal() {
    let root = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("p.bin"), pseudo_random(1 << 20, 6)).unwrap();
    let server = http_server(root.path());

    let (status, stderr) = run_child(
        &format!("http://127.0.0.1:{}/p.bin", server.port),
        dest.path(),
        "p",
        None,
    );

    assert!(status.success(), "{status:?}: {stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("p.bin: "))
        .collect();
    assert!(lines.len() <= 10, "{lines:?}");
    assert!(
        lines.iter().any(|l| l.starts_with("p.bin: 10% (")),
        "{stderr}"
    );
    assert!(
        lines
            .last()
            .is_some_and(|l| l.starts_with("p.bin: 100% (1048576 of 1048576 bytes)")),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Interrupts
// ---------------------------------------------------------------------------------------------

#[test]
fn sigint_mid_http_transfer_exits_130_and_leaves_nothing() {
    let dest = tempfile::tempdir().unwrap();
    let (port, _) = raw_http_server(|stream| {
        let _ = stream.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\nConnection: close\r\n\r\n",
        );
        let chunk = [0x42u8; 4096];
        while stream.write_all(&chunk).is_ok() {
            thread::sleep(Duration::from_millis(20));
        }
    });
    let mut child = spawn_child(
        &format!("http://127.0.0.1:{port}/slow.iso"),
        dest.path(),
        "",
        None,
    );
    wait_for_partial_data(&dest.path().join(".slow.iso.part"), &mut child);

    interrupt(&mut child);
    let status = wait_with_timeout(&mut child, Duration::from_secs(20));

    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(
        entries(dest.path()).is_empty(),
        "{:?}",
        entries(dest.path())
    );
}

#[test]
fn sigint_while_ftp_server_stalls_exits_130_within_seconds_and_leaves_nothing() {
    let dest = tempfile::tempdir().unwrap();
    let mut script = FakeFtp::new(pseudo_random(100_000, 7));
    script.stall = true;
    let (port, _) = script.start();
    let mut child = spawn_child(
        &format!("ftp://127.0.0.1:{port}/stall.iso"),
        dest.path(),
        "",
        None,
    );
    wait_for_partial_data(&dest.path().join(".stall.iso.part"), &mut child);

    let sent = Instant::now();
    interrupt(&mut child);
    let status = wait_with_timeout(&mut child, Duration::from_secs(20));

    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "took {:?}",
        sent.elapsed()
    );
    assert!(
        entries(dest.path()).is_empty(),
        "{:?}",
        entries(dest.path())
    );
}

// ---------------------------------------------------------------------------------------------
// FTP
// ---------------------------------------------------------------------------------------------

fn pyftpdlib_server(dir: &Path) -> Option<Served> {
    if !have_python_module("pyftpdlib") {
        println!("SKIP: pyftpdlib is not installed (python3 -m pip install pyftpdlib)");
        return None;
    }
    let dir = dir.to_owned();
    Some(serve(move |port| {
        let mut command = Command::new("python3");
        command
            .args(["-m", "pyftpdlib", "-i", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .arg("-d")
            .arg(&dir);
        command
    }))
}

#[test]
fn ftp_download_from_pyftpdlib_is_byte_identical() {
    let root = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let data = pseudo_random(3 << 20, 8);
    std::fs::create_dir_all(root.path().join("pub/images")).unwrap();
    std::fs::write(root.path().join("pub/images/random.bin"), &data).unwrap();
    let Some(server) = pyftpdlib_server(root.path()) else {
        return;
    };

    let path = download(
        &format!("ftp://127.0.0.1:{}/pub/images/random.bin", server.port),
        dest.path(),
        &PLAIN,
    )
    .unwrap();

    assert_eq!(path, dest.path().join("random.bin"));
    assert!(std::fs::read(&path).unwrap() == data, "content differs");
    assert_eq!(entries(dest.path()), ["random.bin"]);
}

#[test]
fn ftp_xz_from_pyftpdlib_with_decompress_is_byte_identical() {
    let root = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let data = pseudo_random(1 << 20, 9);
    std::fs::write(root.path().join("cloud.img.xz"), xz(&data)).unwrap();
    let Some(server) = pyftpdlib_server(root.path()) else {
        return;
    };

    let path = download(
        &format!("ftp://127.0.0.1:{}/cloud.img.xz", server.port),
        dest.path(),
        &DECOMPRESS,
    )
    .unwrap();

    assert_eq!(path, dest.path().join("cloud.img"));
    assert!(std::fs::read(&path).unwrap() == data, "content differs");
}

#[test]
fn ftp_missing_file_on_pyftpdlib_fails_and_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let Some(server) = pyftpdlib_server(root.path()) else {
        return;
    };

    let result = download(
        &format!("ftp://127.0.0.1:{}/nothere.iso", server.port),
        dest.path(),
        &PLAIN,
    );

    assert!(
        matches!(
            result,
            Err(FetchError::Ftp(FtpError::Refused {
                command: "RETR",
                code: 550,
                ..
            }))
        ),
        "{result:?}"
    );
    assert!(entries(dest.path()).is_empty());
}

#[test]
fn ftp_pasv_address_is_ignored_and_credentials_are_sent_decoded() {
    let dest = tempfile::tempdir().unwrap();
    let data = pseudo_random(200_000, 10);
    let mut script = FakeFtp::new(data.clone());
    script.epsv = false;
    let (port, log) = script.start();

    let path = download(
        &format!("ftp://alice:s3cr%40t@127.0.0.1:{port}/pub/data.bin"),
        dest.path(),
        &PLAIN,
    )
    .unwrap();

    assert!(std::fs::read(&path).unwrap() == data, "content differs");
    let log = log.lock().unwrap().clone();
    let position = |line: &str| log.iter().position(|l| l == line);
    assert!(position("USER alice").is_some(), "{log:?}");
    assert!(position("PASS s3cr@t").is_some(), "{log:?}");
    assert!(position("TYPE I").is_some(), "{log:?}");
    assert!(position("CWD pub").is_some(), "{log:?}");
    assert!(position("EPSV") < position("PASV"), "{log:?}");
    assert!(position("PASV") < position("RETR data.bin"), "{log:?}");
}

#[test]
fn ftp_transfer_aborted_by_server_fails_and_leaves_nothing() {
    let dest = tempfile::tempdir().unwrap();
    let mut script = FakeFtp::new(pseudo_random(50_000, 11));
    script.final_reply = "426 connection closed; transfer aborted";
    let (port, _) = script.start();

    let result = download(
        &format!("ftp://127.0.0.1:{port}/aborted.iso"),
        dest.path(),
        &PLAIN,
    );

    assert!(
        matches!(
            result,
            Err(FetchError::Ftp(FtpError::Refused { code: 426, .. }))
        ),
        "{result:?}"
    );
    assert!(entries(dest.path()).is_empty());
}

#[test]
fn ftp_transfer_shorter_than_size_fails_and_leaves_nothing() {
    let dest = tempfile::tempdir().unwrap();
    let mut script = FakeFtp::new(pseudo_random(50_000, 12));
    script.size = 80_000;
    let (port, _) = script.start();

    let result = download(
        &format!("ftp://127.0.0.1:{port}/short.iso"),
        dest.path(),
        &PLAIN,
    );

    assert!(
        matches!(
            result,
            Err(FetchError::Truncated {
                received: 50_000,
                expected: 80_000
            })
        ),
        "{result:?}"
    );
    assert!(entries(dest.path()).is_empty());
}

#[test]
fn ftp_overlong_greeting_line_fails_and_leaves_nothing() {
    let dest = tempfile::tempdir().unwrap();
    let mut script = FakeFtp::new(Vec::new());
    script.greeting = [b"220 ".as_slice(), &vec![b'x'; 20_000], b"\r\n"].concat();
    let (port, _) = script.start();

    let result = download(
        &format!("ftp://127.0.0.1:{port}/x.iso"),
        dest.path(),
        &PLAIN,
    );

    assert!(
        matches!(result, Err(FetchError::Ftp(FtpError::LineTooLong))),
        "{result:?}"
    );
    assert!(entries(dest.path()).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Local copies
// ---------------------------------------------------------------------------------------------

#[test]
fn file_url_and_plain_path_copy_the_bytes() {
    let src = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let data = pseudo_random(300_000, 13);
    std::fs::write(src.path().join("a b.iso"), &data).unwrap();
    std::fs::write(src.path().join("c.iso"), &data).unwrap();

    let from_url = download(
        &format!("file://{}/a%20b.iso", src.path().display()),
        dest.path(),
        &PLAIN,
    )
    .unwrap();
    let from_path = download(
        src.path().join("c.iso").to_str().unwrap(),
        dest.path(),
        &PLAIN,
    )
    .unwrap();

    assert!(std::fs::read(from_url).unwrap() == data);
    assert!(std::fs::read(from_path).unwrap() == data);
    assert_eq!(entries(dest.path()), ["a b.iso", "c.iso"]);
}

#[test]
fn local_gz_with_decompress_is_decompressed() {
    let src = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let data = pseudo_random(300_000, 14);
    std::fs::write(src.path().join("d.img.gz"), gzip(&data)).unwrap();

    let path = download(
        src.path().join("d.img.gz").to_str().unwrap(),
        dest.path(),
        &DECOMPRESS,
    )
    .unwrap();

    assert_eq!(path, dest.path().join("d.img"));
    assert!(std::fs::read(path).unwrap() == data);
}

#[test]
fn local_directory_or_missing_file_fails_and_leaves_nothing() {
    let src = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    std::fs::create_dir(src.path().join("dir.iso")).unwrap();

    let directory = download(
        src.path().join("dir.iso").to_str().unwrap(),
        dest.path(),
        &PLAIN,
    );
    let missing = download(
        src.path().join("none.iso").to_str().unwrap(),
        dest.path(),
        &PLAIN,
    );

    assert!(
        matches!(directory, Err(FetchError::NotRegularFile(_))),
        "{directory:?}"
    );
    assert!(
        matches!(missing, Err(FetchError::OpenSource { .. })),
        "{missing:?}"
    );
    assert!(entries(dest.path()).is_empty());
}

#[test]
fn missing_destination_directory_is_an_error() {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("e.iso"), b"e").unwrap();

    let result = download(
        src.path().join("e.iso").to_str().unwrap(),
        &src.path().join("no-such-dir"),
        &PLAIN,
    );

    assert!(
        matches!(result, Err(FetchError::OpenDir { .. })),
        "{result:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// HTTPS with CAPVM_CA_FILE
// ---------------------------------------------------------------------------------------------

/// A throwaway CA and a leaf certificate for 127.0.0.1 signed by it.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
    fn leaf(&self) -> PathBuf {
        self.dir.path().join("leaf.pem")
    }
    fn key(&self) -> PathBuf {
        self.dir.path().join("leaf.key")
    }
}

fn make_pki() -> Option<Pki> {
    if Command::new("openssl").arg("version").output().is_err() {
        println!("SKIP: openssl is not installed");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
            &["-subj", "/CN=capvm test CA"],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "leaf.key",
                "-out",
                "leaf.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.path().join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    ]);
    Some(Pki { dir })
}

const HTTPS_SERVER: &str = "
import functools, http.server, ssl, sys
port, root, cert, key = sys.argv[1:5]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
server = http.server.ThreadingHTTPServer(('127.0.0.1', int(port)), handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
";

fn https_server(root: &Path, pki: &Pki) -> Served {
    let (root, leaf, key) = (root.to_owned(), pki.leaf(), pki.key());
    serve(move |port| {
        let mut command = Command::new("python3");
        command
            .args(["-c", HTTPS_SERVER])
            .arg(port.to_string())
            .arg(&root)
            .arg(&leaf)
            .arg(&key);
        command
    })
}

#[test]
fn https_with_ca_file_downloads_and_without_it_is_refused() {
    let Some(pki) = make_pki() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let trusted = tempfile::tempdir().unwrap();
    let untrusted = tempfile::tempdir().unwrap();
    let data = pseudo_random(500_000, 15);
    std::fs::write(root.path().join("secure.iso"), &data).unwrap();
    let server = https_server(root.path(), &pki);
    let url = format!("https://127.0.0.1:{}/secure.iso", server.port);

    let (with_ca, with_ca_stderr) = run_child(&url, trusted.path(), "", Some(&pki.ca()));
    let (without_ca, without_ca_stderr) = run_child(&url, untrusted.path(), "", None);

    assert!(with_ca.success(), "{with_ca:?}: {with_ca_stderr}");
    assert!(std::fs::read(trusted.path().join("secure.iso")).unwrap() == data);
    assert_eq!(without_ca.code(), Some(1), "{without_ca_stderr}");
    assert!(
        without_ca_stderr.contains("UnknownIssuer"),
        "{without_ca_stderr}"
    );
    assert!(entries(untrusted.path()).is_empty());
}
