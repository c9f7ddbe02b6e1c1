//! What the e2e tests read about capvm's processes from `/proc`: their fields, their
//! children, and their sandbox as seen from outside.

use std::fs;

use anyhow::{Context, ensure};

/// A field of `/proc/PID/status`, trimmed.
pub fn field(pid: u32, name: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    })
}

/// Whether `pid` is a process that has not ended (a zombie has).
pub fn alive(pid: u32) -> bool {
    field(pid, "State").is_some_and(|s| !s.starts_with('Z'))
}

/// Pids of the live processes named `comm` whose parent is `parent`, lowest first.
pub fn children_named(parent: u32, comm: &str) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            field(pid, "Name").as_deref() == Some(comm)
                && field(pid, "PPid").and_then(|p| p.parse().ok()) == Some(parent)
                && alive(pid)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// Checks a running child's sandbox from outside: `Seccomp: 2` (filter mode),
/// `NoNewPrivs: 1`, no effective capabilities, and no uid 0 (real, effective, saved, fs).
pub fn assert_sandboxed(pid: u32) -> anyhow::Result<()> {
    let get = |f| field(pid, f).with_context(|| format!("{f} of pid {pid}"));
    let seccomp = get("Seccomp")?;
    ensure!(seccomp == "2", "Seccomp of {pid}: {seccomp}");
    ensure!(get("NoNewPrivs")? == "1", "NoNewPrivs of {pid}");
    let caps = get("CapEff")?;
    ensure!(
        caps.trim_start_matches('0').is_empty(),
        "CapEff of {pid}: {caps}"
    );
    let uid = get("Uid")?;
    ensure!(
        uid.split_whitespace().all(|u| u != "0"),
        "uid of {pid}: {uid}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_fields_and_is_not_sandboxed() {
        let me = std::process::id();
        assert!(alive(me));
        assert_eq!(field(me, "Pid").as_deref(), Some(me.to_string().as_str()));
        assert_eq!(field(me, "NoSuchField"), None);
        // The test runner is not in capability mode (no seccomp filter).
        assert!(assert_sandboxed(me).is_err());
    }
}
