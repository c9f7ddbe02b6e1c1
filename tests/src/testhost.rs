//! Where a guest can run, and the test host for machines whose KVM cannot
//! run ordinary guests.
//!
//! `tests/testhost.sh` is the single implementation of both: the verdict
//! (probe the kit on `/dev/kvm` once, cached per host kernel) and the test
//! host's QEMU command line and exchange protocol (`tests/kit/testhost-init.sh`).
//! This module drives it: [`verdict`] asks, [`TestHost::boot`] keeps one test
//! host running (`testhost.sh --serve`) and [`TestHost::run`] runs commands in
//! it one after another, streaming their output and returning their exit status
//! as the guest reported it.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::kit::{self, Kit, KitError};

/// How many lines of the test host's console an error carries.
const TAIL_LINES: usize = 60;

/// A test host whose heartbeat (every 5 s) is older than this hung: seen
/// under TCG with nested SVM, where a vCPU can stop taking interrupts.
const HEARTBEAT_LIMIT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot run {script}")]
    Spawn {
        script: PathBuf,
        source: std::io::Error,
    },
    #[error("{script} --verdict failed ({status}): {stderr}")]
    Verdict {
        script: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("unknown verdict {0:?}")]
    UnknownVerdict(String),
    #[error(transparent)]
    Kit(#[from] KitError),
    #[error("cannot create the exchange dir")]
    Xchg(#[source] std::io::Error),
    #[error("cannot use {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot submit command {n} ({status}): {stderr}")]
    Submit {
        n: u32,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("the test host did not come up within {timeout:?}; console:\n{tail}")]
    BootTimeout { timeout: Duration, tail: String },
    #[error("the test host died{during}; console:\n{tail}")]
    Died { during: String, tail: String },
    #[error("command {n} did not finish within {timeout:?}; console:\n{tail}")]
    Timeout {
        n: u32,
        timeout: Duration,
        tail: String,
    },
    #[error("command {n} reported an unreadable status {text:?}")]
    BadStatus { n: u32, text: String },
}

/// How guests run on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The host's `/dev/kvm` runs ordinary guests.
    Direct,
    /// Only inside the test host (e.g. the host's KVM is PVM).
    TestHost,
    /// No `/dev/kvm` at all.
    NoKvm,
}

impl Verdict {
    /// Parses `testhost.sh --verdict`'s answer.
    pub fn parse(word: &str) -> Result<Verdict, HostError> {
        match word.trim() {
            "direct" => Ok(Verdict::Direct),
            "testhost" => Ok(Verdict::TestHost),
            "none" => Ok(Verdict::NoKvm),
            other => Err(HostError::UnknownVerdict(other.to_owned())),
        }
    }
}

/// `tests/testhost.sh`.
pub fn script() -> PathBuf {
    kit::tests_dir().join("testhost.sh")
}

/// Asks `testhost.sh --verdict`; the second value is its reason.
pub fn verdict() -> Result<(Verdict, String), HostError> {
    let script = script();
    let out = Command::new(&script)
        .arg("--verdict")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| HostError::Spawn {
            script: script.clone(),
            source,
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if !out.status.success() {
        return Err(HostError::Verdict {
            script,
            status: out.status,
            stderr,
        });
    }
    let verdict = Verdict::parse(&String::from_utf8_lossy(&out.stdout))?;
    let reason = stderr
        .lines()
        .filter(|l| !l.starts_with("kit: "))
        .collect::<Vec<_>>()
        .join("; ");
    Ok((verdict, reason))
}

/// One command's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOutcome {
    pub status: i32,
    pub elapsed: Duration,
}

/// A running test host.
#[derive(Debug)]
pub struct TestHost {
    child: Child,
    /// Held open while we live: the script kills QEMU on its EOF.
    stdin: Option<ChildStdin>,
    next: u32,
    pub kit: Kit,
    /// From the start of QEMU to the test host's ready file, host clock.
    pub boot_wall: Duration,
    /// The test host's uptime when it got ready.
    pub boot_uptime_s: f64,
    // Last: removed after the child is gone.
    xchg: tempfile::TempDir,
}

impl TestHost {
    /// Boots a test host and waits until it takes commands.
    pub fn boot(timeout: Duration) -> Result<TestHost, HostError> {
        let kit = Kit::locate()?;
        let xchg = tempfile::Builder::new()
            .prefix("capvm-testhost.")
            .tempdir()
            .map_err(HostError::Xchg)?;
        let script = script();
        let log_path = xchg.path().join("serve.log");
        let log = File::create(&log_path).map_err(|source| HostError::Io {
            path: log_path.clone(),
            source,
        })?;
        let start = Instant::now();
        let mut child = Command::new(&script)
            .arg("--serve")
            .arg(xchg.path())
            .env("CAPVM_KIT_DIR", &kit.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|source| HostError::Spawn { script, source })?;
        let stdin = child.stdin.take();
        let mut host = TestHost {
            child,
            stdin,
            next: 1,
            kit,
            boot_wall: Duration::ZERO,
            boot_uptime_s: 0.0,
            xchg,
        };
        let ready = host.xchg.path().join("ready");
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                host.boot_wall = start.elapsed();
                host.boot_uptime_s = text.trim().parse().unwrap_or(0.0);
                return Ok(host);
            }
            if host.has_exited() {
                return Err(HostError::Died {
                    during: " while booting".into(),
                    tail: host.console_tail(),
                });
            }
            if start.elapsed() > timeout {
                return Err(HostError::BootTimeout {
                    timeout,
                    tail: host.console_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The exchange dir (console.log, each command's files).
    pub fn xchg(&self) -> &Path {
        self.xchg.path()
    }

    /// The last lines of the test host's console and of the script's stderr.
    pub fn console_tail(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.xchg.path().join(name)).unwrap_or_default();
        let console = read("console.log");
        let lines: Vec<&str> = console.lines().collect();
        let from = lines.len().saturating_sub(TAIL_LINES);
        let mut tail = lines.get(from..).unwrap_or_default().join("\n");
        let serve = read("serve.log");
        if !serve.trim().is_empty() {
            tail.push_str("\n--- testhost.sh ---\n");
            tail.push_str(serve.trim());
        }
        if let Ok(error) = std::fs::read_to_string(self.xchg.path().join("error")) {
            tail.push_str("\n--- reported error ---\n");
            tail.push_str(error.trim());
        }
        tail
    }

    fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Runs `argv` in the test host, in `cwd` (seen at the same path inside),
    /// with `envs` added, copying its stdout and stderr to ours as it runs.
    /// Commands run one at a time; an error other than a non-zero status
    /// leaves the test host unusable.
    pub fn run<S: AsRef<OsStr>>(
        &mut self,
        argv: &[S],
        envs: &[(&str, &OsStr)],
        cwd: &Path,
        timeout: Duration,
    ) -> Result<RunOutcome, HostError> {
        let n = self.next;
        self.next = self.next.saturating_add(1);
        let script = script();
        let out = Command::new(&script)
            .arg("--submit")
            .arg(self.xchg.path())
            .arg(n.to_string())
            .args(argv)
            .envs(envs.iter().copied())
            .current_dir(cwd)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| HostError::Spawn { script, source })?;
        if !out.status.success() {
            return Err(HostError::Submit {
                n,
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).into(),
            });
        }
        let start = Instant::now();
        let dir = self.xchg.path().to_owned();
        let mut stdout = Follow::new(dir.join(format!("{n}.out")));
        let mut stderr = Follow::new(dir.join(format!("{n}.err")));
        let status_path = dir.join(format!("{n}.status"));
        loop {
            // Read the status first: output written before it is then complete.
            let status = std::fs::read_to_string(&status_path).ok();
            stdout.copy_to(&mut std::io::stdout());
            stderr.copy_to(&mut std::io::stderr());
            if let Some(text) = status {
                let status = text.trim().parse().map_err(|_| HostError::BadStatus {
                    n,
                    text: text.clone(),
                })?;
                return Ok(RunOutcome {
                    status,
                    elapsed: start.elapsed(),
                });
            }
            if self.has_exited() {
                return Err(HostError::Died {
                    during: format!(" during command {n}"),
                    tail: self.console_tail(),
                });
            }
            if let Some(silent) = self.heartbeat_age()
                && silent > HEARTBEAT_LIMIT
            {
                self.kill();
                return Err(HostError::Died {
                    during: format!(
                        " (hung: no heartbeat for {}s) during command {n}",
                        silent.as_secs()
                    ),
                    tail: self.console_tail(),
                });
            }
            if start.elapsed() > timeout {
                return Err(HostError::Timeout {
                    n,
                    timeout,
                    tail: self.console_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// How long ago the test host last wrote its heartbeat.
    fn heartbeat_age(&self) -> Option<Duration> {
        let meta = std::fs::metadata(self.xchg.path().join("heartbeat")).ok()?;
        meta.modified().ok()?.elapsed().ok()
    }

    fn kill(&mut self) {
        self.stdin = None;
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }

    /// Asks the test host to power off and waits for it (killing it after
    /// `timeout`).
    pub fn shutdown(mut self, timeout: Duration) {
        self.stop(timeout);
    }

    fn stop(&mut self, timeout: Duration) {
        let _ = std::fs::write(self.xchg.path().join("stop"), b"");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.has_exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill();
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if !self.has_exited() {
            self.stop(Duration::from_secs(20));
        }
    }
}

/// Follows a file another process appends to.
struct Follow {
    path: PathBuf,
    file: Option<File>,
    buf: Vec<u8>,
}

impl Follow {
    fn new(path: PathBuf) -> Follow {
        Follow {
            path,
            file: None,
            buf: vec![0; 64 * 1024],
        }
    }

    /// Copies what was appended since the last call.
    fn copy_to(&mut self, out: &mut dyn std::io::Write) {
        if self.file.is_none() {
            self.file = File::open(&self.path).ok();
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        loop {
            match file.read(&mut self.buf) {
                Ok(0) | Err(_) => break,
                Ok(len) => {
                    let _ = out.write_all(self.buf.get(..len).unwrap_or_default());
                }
            }
        }
        let _ = out.flush();
        // A file truncated under us (the guest's `>`) restarts from its start.
        if let (Ok(pos), Ok(meta)) = (file.stream_position(), file.metadata())
            && meta.len() < pos
        {
            let _ = file.seek(SeekFrom::Start(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::io::Write as _;

    #[test]
    fn verdict_words_parse_and_others_are_errors() {
        assert_eq!(Verdict::parse("direct\n").ok(), Some(Verdict::Direct));
        assert_eq!(Verdict::parse("testhost").ok(), Some(Verdict::TestHost));
        assert_eq!(Verdict::parse("none").ok(), Some(Verdict::NoKvm));
        assert!(Verdict::parse("maybe").is_err());
    }

    #[test]
    fn submitted_command_keeps_every_argument_intact() {
        let xchg = tempfile::tempdir().expect("tempdir");
        let args: Vec<OsString> = ["it's", "a  b", "$HOME", "`id`", "new\nline", ""]
            .iter()
            .map(OsString::from)
            .collect();
        let mut argv: Vec<OsString> = vec!["printf".into(), "[%s]\\n".into()];
        argv.extend(args.iter().cloned());

        let submit = |n: &str, argv: &[OsString]| {
            let out = Command::new(script())
                .arg("--submit")
                .arg(xchg.path())
                .arg(n)
                .args(argv)
                .env("CAPVM_EXAMPLE", "x y'z")
                .env("UNRELATED_SECRET", "not passed")
                .current_dir(xchg.path())
                .output()
                .expect("testhost.sh runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Command::new("sh")
                .arg(xchg.path().join(format!("{n}.cmd")))
                .output()
                .expect("sh runs")
        };

        let ran = submit("1", &argv);
        let env = submit("2", &["env".into()]);

        assert_eq!(
            String::from_utf8_lossy(&ran.stdout),
            "[it's]\n[a  b]\n[$HOME]\n[`id`]\n[new\nline]\n[]\n"
        );
        let env = String::from_utf8_lossy(&env.stdout);
        assert!(env.lines().any(|l| l == "CAPVM_EXAMPLE=x y'z"), "{env}");
        assert!(env.lines().any(|l| l == "CAPVM_IN_TESTHOST=1"), "{env}");
        assert!(!env.contains("UNRELATED_SECRET"), "{env}");
    }

    #[test]
    fn follow_copies_only_what_was_appended() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("1.out");
        let mut follow = Follow::new(path.clone());
        let mut seen = Vec::new();

        follow.copy_to(&mut seen);
        std::fs::write(&path, b"one\n").expect("write");
        follow.copy_to(&mut seen);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open")
            .write_all(b"two\n")
            .expect("append");
        follow.copy_to(&mut seen);

        assert_eq!(seen, b"one\ntwo\n");
    }
}
