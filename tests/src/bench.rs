//! What the guest-level benchmarks (`src/bin/bench_*.rs`) share.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};

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

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
