//! The guest kit's console markers (protocol: `tests/kit/init.sh`).
//!
//! A marker is `CAPVM-KIT: <word> <fields>` at the end of a console line; the
//! text before it, if any, is output of a command that did not end its last
//! line.

use std::fmt;

/// The prefix every kit marker starts with.
pub const PREFIX: &str = "CAPVM-KIT: ";

/// One parsed marker.
#[derive(Debug, Clone, PartialEq)]
pub enum Marker {
    /// `/init` is up: modules loaded, about to act on the command line.
    Ready(Ready),
    /// Something went wrong but the kit carries on (e.g. a module failed).
    Warn(String),
    /// The outcome of one built-in check (`kit-test`).
    TestResult {
        name: String,
        ok: bool,
        detail: String,
    },
    /// The exit status of `capvm.action=run` / `test`.
    Exit(i32),
    /// The agent starts command `id`.
    Begin(String),
    /// The agent finished command `id` with `status`.
    End {
        id: String,
        status: i32,
    },
    /// The kit is about to power off, reboot or halt the guest.
    Poweroff,
    Reboot,
    Halt,
    /// The ACPI power button was pressed; a clean poweroff follows.
    PowerButton,
}

/// The fields of the ready marker.
#[derive(Debug, Clone, PartialEq)]
pub struct Ready {
    /// The guest's uptime in seconds when `/init` got there.
    pub uptime_s: f64,
    pub kernel: String,
    pub cpus: u32,
}

/// A line that starts like a marker but does not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("malformed kit marker {text:?}: {why}")]
pub struct MarkerError {
    pub text: String,
    pub why: &'static str,
}

/// Finds a marker in a console line: returns the output before it and the
/// parsed marker, or `None` for a line without one.
pub fn find(line: &str) -> Option<(&str, Result<Marker, MarkerError>)> {
    let at = line.find(PREFIX)?;
    let before = line.get(..at)?;
    let text = line.get(at.checked_add(PREFIX.len())?..)?.trim_end();
    Some((before, parse(text)))
}

/// Parses the text after [`PREFIX`].
pub fn parse(text: &str) -> Result<Marker, MarkerError> {
    let err = |why| MarkerError {
        text: text.to_owned(),
        why,
    };
    let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
    match word {
        "ready" => {
            let uptime = field(rest, "uptime").ok_or_else(|| err("no uptime="))?;
            let uptime_s = uptime
                .parse::<f64>()
                .map_err(|_| err("uptime is not a number"))?;
            let kernel = field(rest, "kernel").unwrap_or_default().to_owned();
            let cpus = field(rest, "cpus")
                .map(str::parse::<u32>)
                .transpose()
                .map_err(|_| err("cpus is not a number"))?
                .unwrap_or(0);
            Ok(Marker::Ready(Ready {
                uptime_s,
                kernel,
                cpus,
            }))
        }
        "warn" => Ok(Marker::Warn(rest.to_owned())),
        "result" => {
            let mut parts = rest.splitn(3, ' ');
            let name = parts
                .next()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| err("no test name"))?;
            let ok = match parts.next() {
                Some("ok") => true,
                Some("fail") => false,
                _ => return Err(err("result is neither ok nor fail")),
            };
            let detail = parts.next().unwrap_or_default().to_owned();
            Ok(Marker::TestResult {
                name: name.to_owned(),
                ok,
                detail,
            })
        }
        "exit" => rest
            .trim()
            .parse()
            .map(Marker::Exit)
            .map_err(|_| err("exit status is not a number")),
        "begin" => {
            let id = rest.trim();
            if id.is_empty() {
                return Err(err("no command id"));
            }
            Ok(Marker::Begin(id.to_owned()))
        }
        "end" => {
            let (id, status) = rest.split_once(' ').ok_or_else(|| err("no exit="))?;
            let status = status
                .trim()
                .strip_prefix("exit=")
                .ok_or_else(|| err("no exit="))?
                .parse()
                .map_err(|_| err("exit status is not a number"))?;
            Ok(Marker::End {
                id: id.to_owned(),
                status,
            })
        }
        "poweroff" => Ok(Marker::Poweroff),
        "reboot" => Ok(Marker::Reboot),
        "halt" => Ok(Marker::Halt),
        "power-button" => Ok(Marker::PowerButton),
        _ => Err(err("unknown marker")),
    }
}

/// The value of `key=value` among space-separated fields.
fn field<'a>(fields: &'a str, key: &str) -> Option<&'a str> {
    fields
        .split(' ')
        .find_map(|f| f.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
}

impl fmt::Display for Marker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PREFIX)?;
        match self {
            Marker::Ready(r) => write!(
                f,
                "ready uptime={} kernel={} cpus={}",
                r.uptime_s, r.kernel, r.cpus
            ),
            Marker::Warn(text) => write!(f, "warn {text}"),
            Marker::TestResult { name, ok, detail } => {
                write!(
                    f,
                    "result {name} {} {detail}",
                    if *ok { "ok" } else { "fail" }
                )
            }
            Marker::Exit(status) => write!(f, "exit {status}"),
            Marker::Begin(id) => write!(f, "begin {id}"),
            Marker::End { id, status } => write!(f, "end {id} exit={status}"),
            Marker::Poweroff => f.write_str("poweroff"),
            Marker::Reboot => f.write_str("reboot"),
            Marker::Halt => f.write_str("halt"),
            Marker::PowerButton => f.write_str("power-button"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_parses_uptime_kernel_and_cpus() {
        let line = "CAPVM-KIT: ready uptime=10.55 kernel=6.1.0-56-amd64 cpus=2\r";

        let (before, marker) = find(line).expect("a marker");

        assert_eq!(before, "");
        assert_eq!(
            marker,
            Ok(Marker::Ready(Ready {
                uptime_s: 10.55,
                kernel: "6.1.0-56-amd64".into(),
                cpus: 2
            }))
        );
    }

    #[test]
    fn marker_after_unterminated_output_keeps_the_output() {
        let (before, marker) = find("no newlineCAPVM-KIT: end 7 exit=3").expect("a marker");

        assert_eq!(before, "no newline");
        assert_eq!(
            marker,
            Ok(Marker::End {
                id: "7".into(),
                status: 3
            })
        );
    }

    #[test]
    fn result_line_keeps_detail_with_spaces() {
        let marker = parse("result blk ok dev=vda sectors=2048 sha256=ab");

        assert_eq!(
            marker,
            Ok(Marker::TestResult {
                name: "blk".into(),
                ok: true,
                detail: "dev=vda sectors=2048 sha256=ab".into()
            })
        );
    }

    #[test]
    fn line_without_prefix_is_not_a_marker() {
        assert!(find("[    1.0] Linux version 6.1").is_none());
    }

    #[test]
    fn malformed_markers_are_errors_not_panics() {
        for text in [
            "ready",
            "ready uptime=x",
            "exit",
            "exit -",
            "end 3",
            "end 3 exit=",
            "result x maybe",
            "bogus",
            "",
        ] {
            assert!(parse(text).is_err(), "{text:?} parsed");
        }
    }

    #[test]
    fn display_round_trips_through_parse() {
        let markers = [
            Marker::Exit(-1),
            Marker::Begin("a-1".into()),
            Marker::End {
                id: "a-1".into(),
                status: 0,
            },
            Marker::TestResult {
                name: "net".into(),
                ok: false,
                detail: "no ethernet link".into(),
            },
            Marker::Warn("insmod x: y".into()),
            Marker::Poweroff,
        ];

        for marker in markers {
            let line = marker.to_string();
            assert_eq!(find(&line).map(|(_, m)| m), Some(Ok(marker)), "{line}");
        }
    }
}
