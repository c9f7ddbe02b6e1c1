//! What a process asks of capability mode: [`Profile`], [`Weaken`], and [`nobody`].

use std::os::fd::RawFd;

use crate::policy::Policy;

/// Everything [`crate::enter`] needs to know about one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// For logs and errors (`"dev-blk"`).
    pub name: String,
    /// Descriptors that survive; every other one is closed. Stdio numbers 0–2 not listed here
    /// are pointed at `/dev/null`, so a later descriptor never takes a stdio number.
    pub keep_fds: Vec<RawFd>,
    /// The unprivileged user to become. Never 0.
    pub uid: u32,
    /// The unprivileged group to become. Never 0.
    pub gid: u32,
    /// `RLIMIT_NOFILE`, soft and hard: no descriptor number at or above it can be created,
    /// which also bounds how many an `SCM_RIGHTS` message can deliver.
    pub max_fds: u64,
    /// The process's own seccomp rules, added to the base policy (and to the threads policy
    /// when `threads` is set). Usually `Policy::parse(include_str!("seccomp.policy"))`.
    pub policy: Policy,
    /// The process may start threads after `enter` (never processes).
    pub threads: bool,
    /// For `netcfg`: stay in the host's network namespace and keep `CAP_NET_ADMIN`.
    pub keep_net_admin: bool,
    /// Protections the caller explicitly gives up. Default: none.
    pub weaken: Weaken,
}

/// Protections a profile may explicitly do without. Each one `enter` would otherwise treat as an
/// error when the kernel cannot provide it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Weaken {
    /// Go on without Landlock on a kernel that lacks it (then only the empty root, the dropped
    /// privileges and seccomp keep the process off the file system).
    pub allow_missing_landlock: bool,
    /// Skip the namespaces and the empty root (for environments that forbid `unshare`):
    /// Landlock and seccomp still deny paths and sockets, but the network namespace is the host's
    /// and the mount tree stays visible to calls seccomp lets through.
    pub no_namespaces: bool,
}

/// Default `RLIMIT_NOFILE`: enough for a multi-queue device's eventfds and a few channels.
pub const DEFAULT_MAX_FDS: u64 = 256;

impl Profile {
    /// A profile with `policy` as the process's extra rules, running as [`nobody`], keeping no
    /// descriptors, no threads, nothing weakened.
    pub fn new(name: impl Into<String>, policy: Policy) -> Profile {
        let (uid, gid) = nobody();
        Profile {
            name: name.into(),
            keep_fds: Vec::new(),
            uid,
            gid,
            max_fds: DEFAULT_MAX_FDS,
            policy,
            threads: false,
            keep_net_admin: false,
            weaken: Weaken::default(),
        }
    }

    /// Keeps one more descriptor.
    #[must_use]
    pub fn keep_fd(mut self, fd: RawFd) -> Profile {
        self.keep_fds.push(fd);
        self
    }

    /// Keeps these descriptors too.
    #[must_use]
    pub fn keep_fds(mut self, fds: impl IntoIterator<Item = RawFd>) -> Profile {
        self.keep_fds.extend(fds);
        self
    }

    /// Runs as `uid`/`gid` instead of `nobody`.
    #[must_use]
    pub fn user(mut self, uid: u32, gid: u32) -> Profile {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// Sets the descriptor ceiling.
    #[must_use]
    pub fn max_fds(mut self, max_fds: u64) -> Profile {
        self.max_fds = max_fds;
        self
    }

    /// Allows (or not) threads after `enter`.
    #[must_use]
    pub fn threads(mut self, threads: bool) -> Profile {
        self.threads = threads;
        self
    }

    /// The `netcfg` profile: host network namespace, `CAP_NET_ADMIN` kept.
    #[must_use]
    pub fn keep_net_admin(mut self, keep: bool) -> Profile {
        self.keep_net_admin = keep;
        self
    }

    /// Gives up the named protections.
    #[must_use]
    pub fn weaken(mut self, weaken: Weaken) -> Profile {
        self.weaken = weaken;
        self
    }
}

/// The `nobody` user and `nogroup` (or `nobody`) group from `/etc/passwd` and `/etc/group`,
/// falling back to 65534 for whichever is missing. Call it before [`crate::enter`]: afterwards
/// there are no files to read.
pub fn nobody() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let uid = id_of(&passwd, "nobody").unwrap_or(NOBODY_FALLBACK);
    let gid = id_of(&group, "nogroup")
        .or_else(|| id_of(&group, "nobody"))
        .unwrap_or(NOBODY_FALLBACK);
    (uid, gid)
}

const NOBODY_FALLBACK: u32 = 65534;

/// The third field of the `name:` line of a passwd or group file.
fn id_of(file: &str, name: &str) -> Option<u32> {
    file.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        fields.nth(1)?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_of_finds_the_named_entry() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/sbin/nologin\n";

        assert_eq!(id_of(passwd, "nobody"), Some(65534));
        assert_eq!(id_of(passwd, "root"), Some(0));
    }

    #[test]
    fn id_of_ignores_prefix_matches_and_malformed_lines() {
        let group = "nogroupx:x:1:\nnogroup\nnogroup:x:notanumber:\n";

        assert_eq!(id_of(group, "nogroup"), None);
    }

    #[test]
    fn id_of_missing_name_is_none() {
        assert_eq!(id_of("", "nobody"), None);
    }

    #[test]
    fn nobody_is_never_root() {
        let (uid, gid) = nobody();

        assert_ne!(uid, 0);
        assert_ne!(gid, 0);
    }

    #[test]
    fn builder_sets_fields() {
        let profile = Profile::new("dev-x", Policy::empty())
            .keep_fd(3)
            .keep_fds([5, 6])
            .user(1000, 1001)
            .max_fds(32)
            .threads(true)
            .keep_net_admin(true)
            .weaken(Weaken {
                allow_missing_landlock: true,
                no_namespaces: false,
            });

        assert_eq!(profile.keep_fds, vec![3, 5, 6]);
        assert_eq!((profile.uid, profile.gid), (1000, 1001));
        assert_eq!(profile.max_fds, 32);
        assert!(profile.threads && profile.keep_net_admin);
        assert!(profile.weaken.allow_missing_landlock);
    }
}
