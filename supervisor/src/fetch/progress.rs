//! Progress on stderr: an indicatif bar on a terminal, otherwise a line per 10 % when the total is
//! known (nothing when it is not), or nothing at all when the caller did not ask.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

const BAR_TEMPLATE: &str = "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}";
const SPINNER_TEMPLATE: &str = "{msg} {spinner} {bytes} {bytes_per_sec}";

#[derive(Debug)]
pub(super) enum Progress {
    Off,
    Bar(ProgressBar),
    Lines {
        name: String,
        total: u64,
        /// Tenths of `total` already reported.
        reported: u64,
    },
}

impl Progress {
    pub(super) fn start(name: &str, total: Option<u64>, wanted: bool) -> Self {
        if !wanted {
            return Progress::Off;
        }
        if std::io::stderr().is_terminal() {
            let template = if total.is_some() {
                BAR_TEMPLATE
            } else {
                SPINNER_TEMPLATE
            };
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(name.to_owned());
            return Progress::Bar(bar);
        }
        match total {
            Some(total) if total > 0 => Progress::Lines {
                name: name.to_owned(),
                total,
                reported: 0,
            },
            _ => Progress::Off,
        }
    }

    /// `received` is the running count of bytes taken from the source.
    pub(super) fn advance(&mut self, received: u64) {
        match self {
            Progress::Off => {}
            Progress::Bar(bar) => bar.set_position(received),
            Progress::Lines {
                name,
                total,
                reported,
            } => {
                let tenths = tenths(received, *total);
                if tenths > *reported {
                    *reported = tenths;
                    eprintln!(
                        "{name}: {}% ({received} of {total} bytes)",
                        tenths.saturating_mul(10)
                    );
                }
            }
        }
    }

    pub(super) fn finish(self, ok: bool) {
        if let Progress::Bar(bar) = self {
            if ok {
                bar.finish();
            } else {
                bar.abandon();
            }
        }
    }
}

/// How many whole tenths of `total` `received` is, at most 10.
fn tenths(received: u64, total: u64) -> u64 {
    let scaled = u128::from(received).saturating_mul(10) / u128::from(total.max(1));
    u64::try_from(scaled.min(10)).unwrap_or(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenths_round_down_and_cap_at_ten() {
        assert_eq!(tenths(0, 1000), 0);
        assert_eq!(tenths(99, 1000), 0);
        assert_eq!(tenths(100, 1000), 1);
        assert_eq!(tenths(999, 1000), 9);
        assert_eq!(tenths(1000, 1000), 10);
        assert_eq!(tenths(5000, 1000), 10);
        assert_eq!(tenths(u64::MAX, u64::MAX), 10);
    }

    #[test]
    fn lines_mode_reports_each_tenth_once() {
        let mut progress = Progress::Lines {
            name: "x".into(),
            total: 100,
            reported: 0,
        };

        progress.advance(35);
        progress.advance(36);

        assert!(matches!(progress, Progress::Lines { reported: 3, .. }));
    }

    #[test]
    fn progress_not_wanted_is_off() {
        assert!(matches!(
            Progress::start("x", Some(10), false),
            Progress::Off
        ));
    }
}
