//! Capability mode for capvm's processes, Linux backend.
//!
//! After [`enter`] a process can use only the descriptors it already holds: it cannot open a
//! path, create or connect a network socket, run a program, start a process, signal or trace
//! another process, or change its mounts, namespaces or privileges. What it does with its held
//! descriptors is limited by its seccomp policy, which is data: [`BASE_POLICY`] for everyone
//! plus each process's own reviewed `seccomp.policy` (see [`policy`] for the format).
//!
//! **Trusts:** the caller, for the profile (which descriptors to keep, the extra policy).
//! **May touch:** only the calling process: its descriptors, namespaces, mounts, limits,
//! credentials and filters. Nothing outside it changes; the mounts it makes live in its own
//! mount namespace.
//!
//! # What `enter` does, in order
//!
//! 0. **Prepare**, changing nothing: check the profile (uid and gid not 0, the descriptor
//!    ceiling above every kept number, no process-creating call allowed without `threads`),
//!    check the process is single-threaded, merge and compile the policy, probe Landlock, find
//!    the last capability. An error here leaves the process as it was.
//! 1. **Close descriptors**: every descriptor not in [`Profile::keep_fds`] is closed
//!    (`close_range`). Stdio numbers 0–2 not kept are pointed at `/dev/null` instead, so that
//!    a descriptor received later never lands on number 2 and a panic message never reaches a
//!    disk image. Done first, while `/dev/null` can still be opened, and so nothing inherited
//!    by accident (a log file, a directory) survives into the sandbox.
//! 2. **Namespaces**: `unshare` the mount, IPC, UTS, cgroup and network namespaces (the network
//!    one unless [`Profile::keep_net_admin`]). The new network namespace holds only a down
//!    loopback, so even a socket call that slipped through reaches nothing. A PID namespace is
//!    not used: `unshare(CLONE_NEWPID)` only affects children, and a sandboxed process has none.
//!    It therefore sees host pids, but `kill`, `ptrace`, `pidfd_*` and `process_vm_*` are not
//!    allowed and Landlock scopes signals to its own domain.
//! 3. **Empty root**: mounts become private (`MS_REC|MS_PRIVATE` on `/`), a 4 KiB read-only,
//!    `noexec,nosuid,nodev` tmpfs is mounted and made the root with `pivot_root(".", ".")`, the
//!    old root is detached (`MNT_DETACH`) and the working directory is `/`. `enter` checks the
//!    new root is an empty tmpfs. Needs `CAP_SYS_ADMIN`, so it comes before step 5.
//! 4. **Limits**, soft and hard: `RLIMIT_CORE` 0, `RLIMIT_NOFILE` [`Profile::max_fds`], and
//!    without threads `RLIMIT_NPROC` 0.
//! 5. **Privileges**: every capability leaves the bounding set (but `CAP_NET_ADMIN` for
//!    `netcfg`), the ambient set is cleared, supplementary groups are emptied, then
//!    `setresgid` and `setresuid` to the profile's ids (default [`nobody`]), then `capset`
//!    leaves the effective, permitted and inheritable sets empty (or exactly `CAP_NET_ADMIN`).
//!    The order matters: dropping the bounding set needs `CAP_SETPCAP` and the id changes
//!    need `CAP_SETGID`/`CAP_SETUID`, all of which the uid change then removes. Every result
//!    is read back (`getresuid`, `getgroups`, `capget`, `PR_CAPBSET_READ`,
//!    `PR_CAP_AMBIENT_IS_SET`) and a mismatch is an error.
//! 6. **`PR_SET_NO_NEW_PRIVS`** (required by Landlock and seccomp for an unprivileged process)
//!    and `PR_SET_DUMPABLE` 0 (no core files; processes of the same uid cannot trace it or read
//!    its `/proc` entries).
//! 7. **Landlock**: a ruleset that handles every file-system right of the kernel's Landlock ABI
//!    and grants none, so every path access is denied even where seccomp would let a call
//!    through (an `io_uring` open, say); TCP bind and connect too (ABI 4+), and as scopes,
//!    abstract UNIX sockets and signals outside the domain (ABI 6+). Without Landlock this is
//!    an error unless [`Weaken::allow_missing_landlock`].
//! 8. **seccomp-bpf** last, because its allow-list forbids the calls of all earlier steps:
//!    installed on all threads (TSYNC); calls no rule matches kill the process
//!    (`SECCOMP_RET_KILL_PROCESS`, seen by the parent as `SIGSYS`).
//!
//! Nothing is silently skipped: a step the kernel refuses is an [`Error`] naming the step,
//! unless the profile explicitly gives it up in [`Weaken`]. An error after step 0 leaves the
//! process half-restricted; the caller must treat it as fatal and exit.
//!
//! # Descriptors
//!
//! `enter` closes descriptors other Rust objects may still own. Forget (`into_raw_fd`) or drop
//! every descriptor not in `keep_fds` before calling it: dropping one afterwards would close
//! whatever later took its number.
//!
//! # Threads
//!
//! Namespaces, credentials and Landlock apply per thread, so `enter` must run while the process
//! has exactly one thread ([`Error::NotSingleThreaded`] otherwise). A profile with
//! [`Profile::threads`] may start threads afterwards: it adds [`THREADS_POLICY`], which allows
//! `clone` only with `CLONE_THREAD|CLONE_VM|CLONE_SIGHAND` and no namespace flag, while
//! `clone3` fails with `ENOSYS` so that glibc falls back to `clone`. Every such thread inherits
//! the whole sandbox. `RLIMIT_NPROC` counts threads per uid across processes, so it cannot be
//! 0 for such a profile and is left alone; what forbids new processes is then the `clone` rule.
//! Without `threads`, `clone`, `fork` and `vfork` kill the process and `RLIMIT_NPROC` is 0.
//!
//! # The `netcfg` profile
//!
//! With [`Profile::keep_net_admin`] the process stays in the host's network namespace and keeps
//! `CAP_NET_ADMIN` (effective and permitted; the bounding set holds nothing else). It still
//! switches to the profile's unprivileged uid: `PR_SET_KEEPCAPS` carries the permitted set
//! across `setresuid`, `capset` trims it to `CAP_NET_ADMIN`, and `PR_SET_KEEPCAPS` is cleared
//! again. Everything else (empty root, Landlock, seccomp) is as for any profile.
//!
//! # `io_uring`
//!
//! `io_uring` operations (open, connect, ...) run in the kernel without passing seccomp, so
//! `io_uring_setup` is in no shipped policy and kills. A process that needs a ring allows it in
//! its own policy and must create the ring with `IORING_SETUP_R_DISABLED` and register
//! `IORING_REGISTER_RESTRICTIONS` before enabling it; Landlock and the namespaces still apply
//! to what the ring does.
//!
//! # Compared with FreeBSD's `cap_enter()`
//!
//! Capsicum's capability mode is one kernel flag checked wherever a system call would resolve a
//! global name; this backend approximates it with four mechanisms (namespaces and an empty
//! root, dropped credentials, Landlock, seccomp). What a process sees:
//!
//! | | `cap_enter()` | this backend |
//! |---|---|---|
//! | paths (`open`, `openat`, `stat`, `mkdir`, ...) | `ECAPMODE` | `EACCES` ([`ECAPMODE`]); Landlock denies any that get through |
//! | `openat` below a held directory fd | allowed with `CAP_LOOKUP`, no `..` escape | always `EACCES`: no directory capabilities |
//! | `socket`, `bind`, `connect` | `socket` allowed; `bind`/`connect` `ECAPMODE` | all `EACCES`; new network namespace; Landlock denies TCP bind/connect |
//! | `sendto` with an address | `ECAPMODE` | `EACCES`; but `sendmsg`'s address lies in memory seccomp cannot read (see below) |
//! | `execve`, `execveat` | `ECAPMODE` (only `fexecve`) | `EACCES`, `fexecve` too |
//! | `fork`, `pdfork` | allowed | kill; threads only with [`Profile::threads`] |
//! | `kill` | only the process itself | `kill` kills; `tgkill` only to its own pid |
//! | `ptrace`, `mount`, `unshare`, `setuid`, `reboot`, ... | `ECAPMODE` or `EPERM` | kill (not in any allow-list) |
//! | other calls | every call Capsicum does not list as global is allowed | only the allow-list; anything else kills |
//! | per-descriptor rights (`cap_rights_limit`, `cap_ioctls_limit`, `cap_fcntls_limit`) | narrow each fd (a disk to read/write/seek/fsync) | none: Linux has no per-fd rights. Each allowed call and ioctl is allowed on every held fd; the supervisor narrows what it can by the open mode (`O_RDONLY`) and memfd seals |
//! | credentials | unchanged | unprivileged uid/gid, no groups, no capabilities |
//! | `/proc`, `sysctl` | some read-only sysctls | nothing mounted, no `sysctl` |
//! | errors | one code, `ECAPMODE`, for every denied call | `EACCES` for the path and socket calls a library may try, `ENOSYS` for `statx`/`clone3` (so libraries fall back), kill for everything else |
//!
//! Like `cap_enter()` the restriction is irrevocable and inherited by every thread (and would be
//! by every child, were there any).
//!
//! # Known gaps
//!
//! - `sendmsg` with a destination address on a held *unconnected* datagram socket is allowed:
//!   seccomp cannot read `msghdr`. In a new network namespace nothing is reachable; a process
//!   handed an unconnected host-namespace socket could send datagrams (Landlock covers only TCP).
//!   So the supervisor hands out connected sockets and listeners only, never an unconnected
//!   datagram socket.
//! - `newfstatat(fd, path, AT_EMPTY_PATH)` is allowed because glibc's `fstat` uses it; with a
//!   non-empty `path` it looks up a name below `fd` or the (empty) root, revealing metadata
//!   only. No process holds a directory descriptor.
//! - All profiles default to the same uid (`nobody`); seccomp (no `kill`, `ptrace`,
//!   `process_vm_*`), Landlock's signal scope and non-dumpability keep them apart, and the
//!   supervisor may give each process its own uid with [`Profile::user`].
//! - `x86_64` only: the policy's system call numbers and the filter's architecture check are
//!   `x86_64`'s; a call made through another ABI (x32, `int 0x80`) kills.
//! - `enter` needs root's `CAP_SYS_ADMIN`, `CAP_SETUID`, `CAP_SETGID` and `CAP_SETPCAP`:
//!   the supervisor starts every child as root.

mod fds;
mod filter;
mod landlock_rules;
mod limits;
mod namespace;
pub mod policy;
mod privileges;
mod profile;
mod sys;
mod syscalls;

use std::io;

pub use filter::FilterError;
pub use policy::{BASE_POLICY, Policy, PolicyError, THREADS_POLICY};
pub use privileges::CAP_NET_ADMIN;
pub use profile::{DEFAULT_MAX_FDS, Profile, Weaken, nobody};

use filter::Filters;

/// The error number of the Capsicum-like calls (paths, sockets, exec) in capability mode:
/// `EACCES`, the code Landlock also returns. FreeBSD returns `ECAPMODE` (94).
pub const ECAPMODE: i32 = libc::EACCES;

/// Why [`enter`] (or [`check`]) failed. Each variant names the step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("profile {profile:?} is invalid: {reason}")]
    InvalidProfile { profile: String, reason: String },
    #[error("the process has {threads} threads; capability mode must be entered before any start")]
    NotSingleThreaded { threads: u64 },
    #[error("counting the process's threads")]
    CountThreads(#[source] io::Error),
    #[error("the seccomp policy is invalid")]
    Policy(#[from] PolicyError),
    #[error("compiling the seccomp policy")]
    CompileFilter(#[from] FilterError),
    #[error("closing descriptors: {op}")]
    CloseFds {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("unsharing namespaces")]
    Unshare(#[source] io::Error),
    #[error("pivoting to an empty root: {op}")]
    PivotRoot {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("setting {resource}")]
    Rlimit {
        resource: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("dropping privileges: {op}")]
    DropPrivileges {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("setting no_new_privs and non-dumpable")]
    NoNewPrivs(#[source] io::Error),
    #[error("Landlock is unavailable; Weaken::allow_missing_landlock would accept that")]
    LandlockUnavailable(#[source] io::Error),
    #[error("applying the Landlock ruleset: {op}")]
    Landlock {
        op: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("installing the seccomp filter")]
    Seccomp(#[source] seccompiler::Error),
}

/// Enters capability mode as `profile` describes. See the crate documentation for the steps.
///
/// Call it while the process is single-threaded, after it has every descriptor it will keep and
/// before it reads any untrusted byte. On error the process may be half-restricted: exit.
pub fn enter(profile: &Profile) -> Result<(), Error> {
    let prepared = prepare(profile)?;
    count_threads_is_one()?;

    fds::close_all_except(&profile.keep_fds)?;
    if profile.weaken.no_namespaces {
        tracing::warn!(profile = %profile.name, "namespaces and empty root skipped as the profile allows");
    } else {
        namespace::unshare_namespaces(profile.keep_net_admin)?;
        namespace::pivot_to_empty_root()?;
    }
    limits::apply(profile)?;
    privileges::drop_privileges(profile, prepared.last_cap)?;
    privileges::no_new_privs()?;
    landlock_rules::restrict(&prepared.landlock)?;
    prepared.filters.install().map_err(Error::Seccomp)?;

    tracing::info!(
        profile = %profile.name,
        uid = profile.uid,
        filters = prepared.filters.count(),
        bpf_instructions = prepared.filters.instructions(),
        "entered capability mode"
    );
    Ok(())
}

/// Runs [`enter`]'s preparation (profile checks, policy merge and compilation, Landlock probe)
/// without changing anything: for a process crate's unit test of its profile and policy file.
pub fn check(profile: &Profile) -> Result<(), Error> {
    prepare(profile).map(drop)
}

/// The policy `enter` installs for `profile`: base, threads (if enabled) and the profile's own.
pub fn effective_policy(profile: &Profile) -> Result<Policy, Error> {
    let mut policy = Policy::base()?;
    if profile.threads {
        policy.extend(&Policy::threads()?)?;
    }
    policy.extend(&profile.policy)?;
    Ok(policy)
}

struct Prepared {
    filters: Filters,
    landlock: landlock_rules::Plan,
    last_cap: u32,
}

fn prepare(profile: &Profile) -> Result<Prepared, Error> {
    validate(profile)?;
    let policy = effective_policy(profile)?;
    let filters = Filters::compile(&policy, std::process::id())?;
    let landlock = landlock_rules::plan(profile.weaken.allow_missing_landlock)?;
    let last_cap = privileges::last_cap()?;
    Ok(Prepared {
        filters,
        landlock,
        last_cap,
    })
}

fn validate(profile: &Profile) -> Result<(), Error> {
    let invalid = |reason: String| Error::InvalidProfile {
        profile: profile.name.clone(),
        reason,
    };
    if profile.uid == 0 || profile.gid == 0 {
        return Err(invalid(format!(
            "uid {} / gid {}: capability mode never runs as root",
            profile.uid, profile.gid
        )));
    }
    if let Some(fd) = profile.keep_fds.iter().find(|fd| **fd < 0) {
        return Err(invalid(format!("kept descriptor {fd} is negative")));
    }
    let highest = profile.keep_fds.iter().copied().max().unwrap_or(0).max(2);
    if profile.max_fds <= u64::try_from(highest).unwrap_or(u64::MAX) {
        return Err(invalid(format!(
            "max_fds {} does not exceed the highest kept descriptor {highest}",
            profile.max_fds
        )));
    }
    let process_call = ["clone", "clone3", "fork", "vfork"]
        .into_iter()
        .find(|call| profile.policy.allows(call));
    if let (false, Some(call)) = (profile.threads, process_call) {
        return Err(invalid(format!(
            "the policy allows `{call}` but the profile has no threads"
        )));
    }
    Ok(())
}

/// Namespaces, credentials and Landlock would only cover the calling thread.
fn count_threads_is_one() -> Result<(), Error> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(Error::CountThreads)?;
    let threads = status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .ok_or_else(|| {
            Error::CountThreads(io::Error::other("no Threads: line in /proc/self/status"))
        })?;
    if threads == 1 {
        Ok(())
    } else {
        Err(Error::NotSingleThreaded { threads })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        Profile::new("test", Policy::empty())
    }

    #[test]
    fn default_profile_passes_check() {
        check(&profile()).unwrap();
    }

    #[test]
    fn root_uid_is_an_invalid_profile() {
        let result = check(&profile().user(0, 65534));

        assert!(
            matches!(result, Err(Error::InvalidProfile { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn root_gid_is_an_invalid_profile() {
        let result = check(&profile().user(65534, 0));

        assert!(
            matches!(result, Err(Error::InvalidProfile { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn negative_kept_descriptor_is_an_invalid_profile() {
        let result = check(&profile().keep_fd(-1));

        assert!(
            matches!(result, Err(Error::InvalidProfile { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn fd_ceiling_at_a_kept_descriptor_is_an_invalid_profile() {
        let result = check(&profile().keep_fd(10).max_fds(10));

        assert!(
            matches!(result, Err(Error::InvalidProfile { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn clone_without_threads_is_an_invalid_profile() {
        let policy = Policy::parse("clone # sneaky\n").unwrap();

        let result = check(&Profile::new("test", policy));

        assert!(
            matches!(result, Err(Error::InvalidProfile { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn effective_policy_adds_threads_rules_only_with_threads() {
        let without = effective_policy(&profile()).unwrap();
        let with = effective_policy(&profile().threads(true)).unwrap();

        assert!(!without.allows("clone"));
        assert!(with.allows("clone"));
        assert!(with.allows("read"));
    }

    #[test]
    fn profile_policy_extends_the_base() {
        let policy = Policy::parse("ioctl arg1 == 0xAE01 # KVM_CREATE_VM\n").unwrap();

        let effective = effective_policy(&Profile::new("vcpu", policy)).unwrap();

        assert!(effective.allows("ioctl"));
        assert!(effective.len() > Policy::base().unwrap().len());
    }

    #[test]
    fn conflicting_errno_between_base_and_profile_is_a_policy_error() {
        let policy = Policy::parse("openat => errno EPERM # other code\n").unwrap();

        let result = check(&Profile::new("test", policy));

        assert!(
            matches!(
                result,
                Err(Error::Policy(PolicyError::ConflictingErrno { line: 1, .. }))
            ),
            "{result:?}"
        );
    }
}
