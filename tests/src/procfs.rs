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

/// Pids of every live descendant of `root` (children, their children, ...), lowest first.
pub fn descendants(root: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parents: Vec<(u32, u32)> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| alive(pid))
        .filter_map(|pid| Some((pid, field(pid, "PPid")?.parse().ok()?)))
        .collect();
    let mut found = Vec::new();
    let mut todo = vec![root];
    while let Some(parent) = todo.pop() {
        for &(pid, ppid) in &parents {
            if ppid == parent && !found.contains(&pid) {
                found.push(pid);
                todo.push(pid);
            }
        }
    }
    found.sort_unstable();
    found
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

    #[test]
    fn a_spawned_grandchild_is_a_descendant_and_gone_after_it_ends() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        let me = std::process::id();
        let sh = child.id();
        // Other tests of this binary spawn children too: wait for this one's grandchild.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let found = loop {
            let spawned = !children_named(sh, "sleep").is_empty();
            let found = descendants(me);
            let ready = spawned && found.contains(&sh);
            if ready || std::time::Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(found.contains(&sh), "{found:?} lacks sh {sh}");
        let sleep = children_named(sh, "sleep");
        assert_eq!(sleep.len(), 1, "sleep under sh: {sleep:?}");
        assert!(found.contains(&sleep[0]), "{found:?} lacks sleep");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(sleep[0]).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        );
        child.wait().unwrap();
        assert!(!descendants(me).contains(&sh));
    }
}
