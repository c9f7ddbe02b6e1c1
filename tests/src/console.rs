//! A guest's console as lines: a thread reads the VMM's output, logs every
//! line to a file and hands it over; the reader waits with deadlines.

use std::fs::File;
use std::io::{BufRead as _, BufReader, Read, Write as _};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// How many lines of the console an error message carries.
pub const TAIL_LINES: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot create console log {path}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the console reader thread")]
    Thread(#[source] std::io::Error),
}

/// Why a wait ended without the line it waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEnd {
    /// The deadline passed.
    Timeout,
    /// The console closed (the VMM exited).
    Closed,
}

/// The lines of one console, as they arrive.
#[derive(Debug)]
pub struct Console {
    rx: Receiver<String>,
    seen: Vec<String>,
    log: PathBuf,
    closed: bool,
}

impl Console {
    /// Starts reading `source` (e.g. a child's stdout) into `log`.
    pub fn start(source: impl Read + Send + 'static, log: &Path) -> Result<Console, ConsoleError> {
        let mut file = File::create(log).map_err(|source| ConsoleError::Log {
            path: log.to_owned(),
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                let mut reader = BufReader::new(source);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match reader.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let _ = file.write_all(&buf);
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
                    if tx.send(line).is_err() {
                        break;
                    }
                }
                let _ = file.flush();
            })
            .map_err(ConsoleError::Thread)?;
        Ok(Console {
            rx,
            seen: Vec::new(),
            log: log.to_owned(),
            closed: false,
        })
    }

    /// The next line, waiting until `deadline`.
    pub fn next_line(&mut self, deadline: Instant) -> Result<&str, WaitEnd> {
        if self.closed {
            return Err(WaitEnd::Closed);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(line) => {
                self.seen.push(line);
                Ok(self.seen.last().map_or("", String::as_str))
            }
            Err(RecvTimeoutError::Timeout) => Err(WaitEnd::Timeout),
            Err(RecvTimeoutError::Disconnected) => {
                self.closed = true;
                Err(WaitEnd::Closed)
            }
        }
    }

    /// Reads lines until `matches` returns `Some`, or `timeout` passes.
    pub fn wait_for<T>(
        &mut self,
        timeout: Duration,
        mut matches: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, WaitEnd> {
        let deadline = Instant::now() + timeout;
        loop {
            let line = self.next_line(deadline)?;
            if let Some(found) = matches(line) {
                return Ok(found);
            }
        }
    }

    /// Every line read so far.
    pub fn lines(&self) -> &[String] {
        &self.seen
    }

    /// The last `n` lines read so far, one per line.
    pub fn tail(&self, n: usize) -> String {
        let from = self.seen.len().saturating_sub(n);
        self.seen.get(from..).unwrap_or_default().join("\n")
    }

    /// The file every console byte goes to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the source reached its end.
    pub fn is_closed(&self) -> bool {
        self.closed
    }
}

/// Copies `source` into the file `path` on a thread of its own, until EOF.
pub fn drain_to_file(
    mut source: impl Read + Send + 'static,
    path: &Path,
) -> Result<(), ConsoleError> {
    let mut file = File::create(path).map_err(|source| ConsoleError::Log {
        path: path.to_owned(),
        source,
    })?;
    thread::Builder::new()
        .name("drain".into())
        .spawn(move || {
            let _ = std::io::copy(&mut source, &mut file);
        })
        .map(drop)
        .map_err(ConsoleError::Thread)
}

/// One agent command of a console input volume test and the line it must answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeCommand {
    /// A shell command carrying `payload_len` letters that differ per command and position.
    pub command: String,
    /// `answer-<i> len=<payload_len> sum=<sum of the payload's bytes>`, as the guest's `sh`,
    /// `od` and `awk` compute it from what arrived.
    pub answer: String,
}

/// Command `i` of a run that pushes kilobytes of input through the guest's serial console:
/// each command's line carries `payload_len` bytes the guest cannot guess and must echo back
/// in a checksum, so a lost, doubled or reordered byte shows.
pub fn volume_command(i: usize, payload_len: usize) -> VolumeCommand {
    let payload: String = (0..payload_len)
        .map(|j| {
            let letter = i.wrapping_mul(7).wrapping_add(j.wrapping_mul(13)) % 26;
            char::from(b'a' + u8::try_from(letter).unwrap_or(0))
        })
        .collect();
    let sum: u64 = payload.bytes().map(u64::from).sum();
    VolumeCommand {
        command: format!(
            "p={payload}; echo answer-{i} len=${{#p}} sum=$(printf %s \"$p\" | od -An -tu1 -v \
             | awk '{{for (k = 1; k <= NF; k++) t += $k}} END {{print t}}')"
        ),
        answer: format!("answer-{i} len={payload_len} sum={sum}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_commands_differ_per_index_and_answer_their_payload_sum() {
        let a = volume_command(0, 3);
        let b = volume_command(1, 3);

        // Letters (7i + 13j) mod 26: i=0 gives 0, 13, 0 ("ana"); i=1 gives 7, 20, 7 ("huh").
        assert!(a.command.starts_with("p=ana; "), "{}", a.command);
        assert!(b.command.starts_with("p=huh; "), "{}", b.command);
        assert_eq!(a.answer, format!("answer-0 len=3 sum={}", 97 + 110 + 97));
        assert_eq!(b.answer, format!("answer-1 len=3 sum={}", 104 + 117 + 104));
    }

    #[test]
    fn lines_arrive_without_carriage_returns_and_are_logged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("console.log");
        let mut console = Console::start(&b"one\r\ntwo\nthree"[..], &log).expect("starts");

        let found = console.wait_for(Duration::from_secs(5), |l| (l == "three").then_some(()));
        let end = console
            .next_line(Instant::now() + Duration::from_secs(5))
            .map(str::to_owned);

        assert_eq!(found, Ok(()));
        assert_eq!(console.lines(), ["one", "two", "three"]);
        assert_eq!(end, Err(WaitEnd::Closed));
        assert_eq!(std::fs::read(&log).expect("log"), b"one\r\ntwo\nthree");
    }

    #[test]
    fn wait_times_out_on_a_silent_source() {
        let mut sleeper = std::process::Command::new("sleep")
            .arg("5")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sleep runs");
        let silent = sleeper.stdout.take().expect("stdout");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut console = Console::start(silent, &dir.path().join("log")).expect("starts");

        let start = Instant::now();
        let found = console.wait_for(Duration::from_millis(200), |_| Some(()));

        let _ = sleeper.kill();
        let _ = sleeper.wait();

        assert_eq!(found, Err(WaitEnd::Timeout));
        assert!(start.elapsed() >= Duration::from_millis(200));
    }

    #[test]
    fn tail_keeps_only_the_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut console =
            Console::start(&b"a\nb\nc\n"[..], &dir.path().join("log")).expect("starts");
        let _ = console.wait_for(Duration::from_secs(5), |l| (l == "c").then_some(()));

        assert_eq!(console.tail(2), "b\nc");
    }
}
