//! What the guest-level benchmarks (`src/bin/bench_*.rs`) share.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, ensure};

/// A bench's exit: success, or its error printed as `<bench>: <error>` and failure.
pub fn exit_code(bench: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{bench}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The median of `v` (the mean of the middle two for an even count); `None` when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let upper = *v.get(v.len() / 2)?;
    if v.len().is_multiple_of(2) {
        let lower = *v.get(v.len() / 2 - 1)?;
        Some(f64::midpoint(lower, upper))
    } else {
        Some(upper)
    }
}

/// The kit image with the benchmark programs (`KIT_PACKAGES_INITRD` of the kit's `kit.env`,
/// see tests/kit/README.md).
pub fn packages_initrd(kit_dir: &Path) -> anyhow::Result<PathBuf> {
    let env = kit_dir.join("kit.env");
    let text = fs::read_to_string(&env).with_context(|| format!("reading {}", env.display()))?;
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("KIT_PACKAGES_INITRD="))
        .with_context(|| format!("{} names no KIT_PACKAGES_INITRD", env.display()))?;
    let path = PathBuf::from(path);
    ensure!(path.is_file(), "{} does not exist", path.display());
    Ok(path)
}

/// Tries per guest and run: nested guests sometimes die for reasons of the test host
/// (tests/README.md), so one more attempt before the run counts as failed.
pub const ATTEMPTS: u32 = 2;

/// Runs `measure` until it succeeds, at most [`ATTEMPTS`] times, printing
/// `RETRY <bench> vmm=<vmm> run=<run> attempt=<n>: <error>` for each failure but the last and
/// `FAILED ...` for the last; `None` when every attempt failed.
pub fn with_attempts<T>(
    bench: &str,
    vmm: &str,
    run: usize,
    mut measure: impl FnMut() -> anyhow::Result<T>,
) -> Option<T> {
    for attempt in 1..=ATTEMPTS {
        match measure() {
            Ok(v) => return Some(v),
            Err(e) if attempt < ATTEMPTS => {
                println!("RETRY {bench} vmm={vmm} run={run} attempt={attempt}: {e:#}");
            }
            Err(e) => println!("FAILED {bench} vmm={vmm} run={run}: {e:#}"),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{ATTEMPTS, median, with_attempts};

    #[test]
    fn attempts_stop_at_the_first_success_and_give_up_after_the_last_failure() {
        let mut calls = 0;
        let got = with_attempts("t", "v", 1, || {
            calls += 1;
            anyhow::ensure!(calls >= 2, "died");
            Ok(calls)
        });
        assert_eq!((got, calls), (Some(2), 2));
        let mut calls = 0;
        let got: Option<()> = with_attempts("t", "v", 1, || {
            calls += 1;
            anyhow::bail!("died")
        });
        assert_eq!((got, calls), (None, ATTEMPTS));
    }

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
