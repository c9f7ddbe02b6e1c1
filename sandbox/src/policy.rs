//! The seccomp policy text format: one reviewed rule per line, kept as data.
//!
//! ```text
//! # A comment line.
//! <syscall> [<condition> [&& <condition>]...] [=> errno <ERRNO>]  # why the call is needed
//!
//! <condition> := arg<N> <op> <value>          N in 0..=5, op one of == != < <= > >=
//!              | arg<N> & <mask> == <value>     masked equality
//! <value>     := 123 | -100 | 0x5421 | NAME | NAME|NAME|0x10 | $pid
//! ```
//!
//! - Every rule line must end in a non-empty `#` comment: the policy is reviewed line by line.
//! - A rule without `=> errno` allows the call; with it, the call fails with that error number
//!   and never reaches the kernel. Calls matched by no rule kill the process.
//! - Several lines for the same call are alternatives (any may match). If an allow line and an
//!   errno line both match a call, the errno wins. All errno lines for one call must name the
//!   same error number.
//! - Arguments are compared as full 64-bit values: a register with stray upper bits fails to
//!   match, which denies rather than allows.
//! - `NAME` is one of a small table of kernel constants ([`constant`]), so reviewers read
//!   `FIONBIO` rather than `0x5421`; ioctls may always be written by number.
//! - `$pid` is the process id, substituted when the filter is compiled in
//!   [`crate::enter`] (a process never changes its pid afterwards: it cannot fork).

use std::fmt;

use crate::syscalls::SYSCALLS;

/// A parsed seccomp policy: the rules of one or more policy files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

/// One policy line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    /// System call name as written.
    pub(crate) name: &'static str,
    /// `x86_64` system call number.
    pub(crate) nr: i64,
    /// All must hold (empty: the call matches whatever its arguments).
    pub(crate) conditions: Vec<Condition>,
    pub(crate) action: Action,
    /// 1-based line in its policy file, for errors when policies are merged.
    pub(crate) line: usize,
}

impl Rule {
    /// The same rule, wherever it was written.
    fn same_as(&self, other: &Rule) -> bool {
        self.nr == other.nr && self.conditions == other.conditions && self.action == other.action
    }
}

/// A comparison of one system call argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Condition {
    pub(crate) arg: u8,
    pub(crate) op: Op,
    pub(crate) value: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// `arg & mask == value`.
    MaskedEq(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Value {
    Literal(u64),
    /// The calling process's id, known only in `enter`.
    Pid,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Allow,
    /// Fail the call with this error number (the Capsicum-like class).
    Errno(u32),
}

/// Why a policy text was rejected. Every variant names its 1-based line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("line {line}: a rule needs a `# comment` saying why the call is allowed")]
    MissingComment { line: usize },
    #[error("line {line}: unknown system call `{name}`")]
    UnknownSyscall { line: usize, name: String },
    #[error("line {line}: {message}")]
    Syntax { line: usize, message: String },
    #[error("line {line}: `{token}` is not a number or a known constant")]
    BadValue { line: usize, token: String },
    #[error("line {line}: unknown error number `{name}`")]
    UnknownErrno { line: usize, name: String },
    #[error("line {line}: `{name}` already fails with another error number")]
    ConflictingErrno { line: usize, name: String },
}

impl Policy {
    /// A policy with no rules (a profile that needs nothing beyond the base policy).
    pub fn empty() -> Policy {
        Policy::default()
    }

    /// Parses one policy file. See the module documentation for the format.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let mut policy = Policy::default();
        for (index, raw) in text.lines().enumerate() {
            let line = index.saturating_add(1);
            if let Some(rule) = parse_line(raw, line)? {
                policy.push(rule)?;
            }
        }
        Ok(policy)
    }

    /// The reviewed base policy every profile includes (`sandbox/base.policy`): what Rust std,
    /// glibc, the allocator, `tracing` to a held descriptor and `proto`'s messages on held
    /// sockets need, plus the Capsicum-like calls that fail with [`crate::ECAPMODE`].
    pub fn base() -> Result<Policy, PolicyError> {
        Policy::parse(BASE_POLICY)
    }

    /// The extra rules a profile with `threads: true` gets (`sandbox/threads.policy`):
    /// thread-only `clone` and what glibc's thread start and exit call.
    pub fn threads() -> Result<Policy, PolicyError> {
        Policy::parse(THREADS_POLICY)
    }

    /// Adds every rule of `other` to this policy. A conflict names the line in `other`.
    pub fn extend(&mut self, other: &Policy) -> Result<(), PolicyError> {
        for rule in &other.rules {
            self.push(rule.clone())?;
        }
        Ok(())
    }

    /// Whether any rule (allow or errno) names the system call `name`.
    pub fn mentions(&self, name: &str) -> bool {
        self.rules.iter().any(|rule| rule.name == name)
    }

    /// Whether any rule allows the system call `name` (under some arguments).
    pub fn allows(&self, name: &str) -> bool {
        self.rules
            .iter()
            .any(|rule| rule.name == name && rule.action == Action::Allow)
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether the policy has no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub(crate) fn rules(&self) -> &[Rule] {
        &self.rules
    }

    fn push(&mut self, rule: Rule) -> Result<(), PolicyError> {
        if let Action::Errno(errno) = rule.action {
            let conflict = self.rules.iter().any(|other| {
                other.nr == rule.nr && matches!(other.action, Action::Errno(e) if e != errno)
            });
            if conflict {
                return Err(PolicyError::ConflictingErrno {
                    line: rule.line,
                    name: rule.name.to_owned(),
                });
            }
        }
        if !self.rules.iter().any(|other| other.same_as(&rule)) {
            self.rules.push(rule);
        }
        Ok(())
    }
}

impl fmt::Display for Policy {
    /// Renders the rules back in the policy format (without the comments).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for rule in &self.rules {
            write!(f, "{}", rule.name)?;
            for (i, c) in rule.conditions.iter().enumerate() {
                let joiner = if i == 0 { " " } else { " && " };
                let value = match c.value {
                    Value::Literal(v) => format!("{v:#x}"),
                    Value::Pid => "$pid".to_owned(),
                };
                match c.op {
                    Op::MaskedEq(mask) => write!(f, "{joiner}arg{} & {mask:#x} == {value}", c.arg)?,
                    op => write!(f, "{joiner}arg{} {} {value}", c.arg, op_text(op))?,
                }
            }
            if let Action::Errno(e) = rule.action {
                write!(f, " => errno {e}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// `sandbox/base.policy`, embedded.
pub const BASE_POLICY: &str = include_str!("../base.policy");
/// `sandbox/threads.policy`, embedded.
pub const THREADS_POLICY: &str = include_str!("../threads.policy");

fn op_text(op: Op) -> &'static str {
    match op {
        Op::Eq | Op::MaskedEq(_) => "==",
        Op::Ne => "!=",
        Op::Lt => "<",
        Op::Le => "<=",
        Op::Gt => ">",
        Op::Ge => ">=",
    }
}

fn parse_line(raw: &str, line: usize) -> Result<Option<Rule>, PolicyError> {
    let text = raw.trim();
    if text.is_empty() || text.starts_with('#') {
        return Ok(None);
    }
    let (body, comment) = match text.split_once('#') {
        Some((body, comment)) => (body, comment.trim()),
        None => (text, ""),
    };
    if comment.is_empty() {
        return Err(PolicyError::MissingComment { line });
    }
    let syntax = |message: &str| PolicyError::Syntax {
        line,
        message: message.to_owned(),
    };

    let mut tokens = body.split_whitespace().peekable();
    let Some(name) = tokens.next() else {
        return Err(syntax("a comment must start the line with `#`"));
    };
    let (name, nr) = lookup_syscall(name).ok_or_else(|| PolicyError::UnknownSyscall {
        line,
        name: name.to_owned(),
    })?;

    let mut conditions = Vec::new();
    let mut action = Action::Allow;
    while let Some(token) = tokens.next() {
        if token == "=>" {
            action = parse_action(&mut tokens, line)?;
            if tokens.next().is_some() {
                return Err(syntax("nothing may follow the action but the comment"));
            }
            break;
        }
        if conditions.is_empty() {
            conditions.push(parse_condition(token, &mut tokens, line)?);
        } else {
            if token != "&&" {
                return Err(syntax("conditions are joined with `&&`"));
            }
            let Some(next) = tokens.next() else {
                return Err(syntax("`&&` must be followed by a condition"));
            };
            conditions.push(parse_condition(next, &mut tokens, line)?);
        }
    }
    Ok(Some(Rule {
        name,
        nr,
        conditions,
        action,
        line,
    }))
}

fn parse_condition<'a>(
    first: &str,
    tokens: &mut impl Iterator<Item = &'a str>,
    line: usize,
) -> Result<Condition, PolicyError> {
    let syntax = |message: String| PolicyError::Syntax { line, message };
    let arg = first
        .strip_prefix("arg")
        .and_then(|n| n.parse::<u8>().ok())
        .filter(|n| *n <= 5)
        .ok_or_else(|| syntax(format!("expected `arg0`..`arg5`, found `{first}`")))?;
    let op_token = tokens
        .next()
        .ok_or_else(|| syntax(format!("`arg{arg}` needs a comparison")))?;
    let op = match op_token {
        "==" => Op::Eq,
        "!=" => Op::Ne,
        "<" => Op::Lt,
        "<=" => Op::Le,
        ">" => Op::Gt,
        ">=" => Op::Ge,
        "&" => {
            let mask_token = tokens
                .next()
                .ok_or_else(|| syntax("`&` needs a mask".to_owned()))?;
            let mask = parse_number(mask_token, line)?;
            if tokens.next() != Some("==") {
                return Err(syntax("a masked argument is compared with `==`".to_owned()));
            }
            Op::MaskedEq(mask)
        }
        other => return Err(syntax(format!("unknown comparison `{other}`"))),
    };
    let value_token = tokens
        .next()
        .ok_or_else(|| syntax("a comparison needs a value".to_owned()))?;
    let value = if value_token == "$pid" {
        if matches!(op, Op::MaskedEq(_)) {
            return Err(syntax("`$pid` cannot be masked".to_owned()));
        }
        Value::Pid
    } else {
        Value::Literal(parse_number(value_token, line)?)
    };
    Ok(Condition { arg, op, value })
}

fn parse_action<'a>(
    tokens: &mut impl Iterator<Item = &'a str>,
    line: usize,
) -> Result<Action, PolicyError> {
    match tokens.next() {
        Some("allow") => Ok(Action::Allow),
        Some("errno") => {
            let name = tokens.next().ok_or_else(|| PolicyError::Syntax {
                line,
                message: "`errno` needs an error name or number".to_owned(),
            })?;
            let errno = errno_value(name)
                .filter(|e| (1..=4095).contains(e))
                .ok_or_else(|| PolicyError::UnknownErrno {
                    line,
                    name: name.to_owned(),
                })?;
            Ok(Action::Errno(errno))
        }
        other => Err(PolicyError::Syntax {
            line,
            message: format!(
                "expected `allow` or `errno NAME` after `=>`, found `{}`",
                other.unwrap_or("")
            ),
        }),
    }
}

/// Parses `123`, `-100`, `0x5421`, `NAME` or `A|B|0x10`.
fn parse_number(token: &str, line: usize) -> Result<u64, PolicyError> {
    let bad = || PolicyError::BadValue {
        line,
        token: token.to_owned(),
    };
    let mut value = 0u64;
    for part in token.split('|') {
        let part_value = if let Some(hex) = part.strip_prefix("0x") {
            u64::from_str_radix(hex, 16).map_err(|_| bad())?
        } else if let Some(negative) = part.strip_prefix('-') {
            // Negative literals (AT_FDCWD) are sign-extended, as the C library passes them.
            let magnitude = negative.parse::<i64>().map_err(|_| bad())?;
            sign_extend(magnitude.checked_neg().ok_or_else(bad)?)
        } else if part.starts_with(|c: char| c.is_ascii_digit()) {
            part.parse::<u64>().map_err(|_| bad())?
        } else {
            constant(part).ok_or_else(bad)?
        };
        value |= part_value;
    }
    Ok(value)
}

fn lookup_syscall(name: &str) -> Option<(&'static str, i64)> {
    SYSCALLS
        .binary_search_by(|(candidate, _)| (*candidate).cmp(name))
        .ok()
        .and_then(|index| SYSCALLS.get(index).copied())
}

fn errno_value(name: &str) -> Option<u32> {
    if let Ok(number) = name.parse::<u32>() {
        return Some(number);
    }
    let value = match name {
        "EPERM" => libc::EPERM,
        "ENOENT" => libc::ENOENT,
        "EACCES" => libc::EACCES,
        "EINVAL" => libc::EINVAL,
        "ENOSYS" => libc::ENOSYS,
        "ENOTTY" => libc::ENOTTY,
        "EAFNOSUPPORT" => libc::EAFNOSUPPORT,
        "EOPNOTSUPP" => libc::EOPNOTSUPP,
        _ => return None,
    };
    value.try_into().ok()
}

/// The named constants a policy may use. Values are Linux `x86_64`'s, from `libc`.
pub fn constant(name: &str) -> Option<u64> {
    let value = match name {
        // clone(2) flags.
        "CLONE_VM" => int(libc::CLONE_VM),
        "CLONE_FS" => int(libc::CLONE_FS),
        "CLONE_FILES" => int(libc::CLONE_FILES),
        "CLONE_SIGHAND" => int(libc::CLONE_SIGHAND),
        "CLONE_PIDFD" => int(libc::CLONE_PIDFD),
        "CLONE_PTRACE" => int(libc::CLONE_PTRACE),
        "CLONE_VFORK" => int(libc::CLONE_VFORK),
        "CLONE_PARENT" => int(libc::CLONE_PARENT),
        "CLONE_THREAD" => int(libc::CLONE_THREAD),
        "CLONE_NEWNS" => int(libc::CLONE_NEWNS),
        "CLONE_SYSVSEM" => int(libc::CLONE_SYSVSEM),
        "CLONE_SETTLS" => int(libc::CLONE_SETTLS),
        "CLONE_PARENT_SETTID" => int(libc::CLONE_PARENT_SETTID),
        "CLONE_CHILD_CLEARTID" => int(libc::CLONE_CHILD_CLEARTID),
        "CLONE_UNTRACED" => int(libc::CLONE_UNTRACED),
        "CLONE_CHILD_SETTID" => int(libc::CLONE_CHILD_SETTID),
        "CLONE_NEWCGROUP" => int(libc::CLONE_NEWCGROUP),
        "CLONE_NEWUTS" => int(libc::CLONE_NEWUTS),
        "CLONE_NEWIPC" => int(libc::CLONE_NEWIPC),
        "CLONE_NEWUSER" => int(libc::CLONE_NEWUSER),
        "CLONE_NEWPID" => int(libc::CLONE_NEWPID),
        "CLONE_NEWNET" => int(libc::CLONE_NEWNET),
        "CLONE_IO" => int(libc::CLONE_IO),
        // mmap(2) / mprotect(2).
        "PROT_NONE" => int(libc::PROT_NONE),
        "PROT_READ" => int(libc::PROT_READ),
        "PROT_WRITE" => int(libc::PROT_WRITE),
        "PROT_EXEC" => int(libc::PROT_EXEC),
        "MAP_SHARED" => int(libc::MAP_SHARED),
        "MAP_PRIVATE" => int(libc::MAP_PRIVATE),
        "MAP_FIXED" => int(libc::MAP_FIXED),
        "MAP_ANONYMOUS" => int(libc::MAP_ANONYMOUS),
        "MAP_NORESERVE" => int(libc::MAP_NORESERVE),
        // fcntl(2) commands.
        "F_GETFD" => int(libc::F_GETFD),
        "F_SETFD" => int(libc::F_SETFD),
        "F_GETFL" => int(libc::F_GETFL),
        "F_SETFL" => int(libc::F_SETFL),
        "F_DUPFD_CLOEXEC" => int(libc::F_DUPFD_CLOEXEC),
        "F_ADD_SEALS" => int(libc::F_ADD_SEALS),
        "F_GET_SEALS" => int(libc::F_GET_SEALS),
        // *at(2) flags.
        "AT_FDCWD" => int(libc::AT_FDCWD),
        "AT_EMPTY_PATH" => int(libc::AT_EMPTY_PATH),
        // ioctl(2) requests every process may meet.
        "FIONBIO" => libc::FIONBIO,
        "FIOCLEX" => libc::FIOCLEX,
        "TCGETS" => libc::TCGETS,
        // prctl(2) options.
        "PR_SET_NAME" => int(libc::PR_SET_NAME),
        "PR_GET_NAME" => int(libc::PR_GET_NAME),
        // Socket domains and types.
        "AF_UNIX" => int(libc::AF_UNIX),
        "AF_INET" => int(libc::AF_INET),
        "AF_INET6" => int(libc::AF_INET6),
        "AF_NETLINK" => int(libc::AF_NETLINK),
        "SOCK_STREAM" => int(libc::SOCK_STREAM),
        "SOCK_DGRAM" => int(libc::SOCK_DGRAM),
        "SOCK_SEQPACKET" => int(libc::SOCK_SEQPACKET),
        "SOCK_CLOEXEC" => int(libc::SOCK_CLOEXEC),
        "SOCK_NONBLOCK" => int(libc::SOCK_NONBLOCK),
        _ => return None,
    };
    Some(value)
}

/// A C `int` constant as the C library passes it in a 64-bit register: sign-extended.
fn int(value: libc::c_int) -> u64 {
    sign_extend(i64::from(value))
}

fn sign_extend(value: i64) -> u64 {
    u64::from_ne_bytes(value.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> PolicyError {
        match Policy::parse(text) {
            Ok(policy) => panic!("parsed {policy:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn base_policy_file_parses() {
        let policy = Policy::parse(BASE_POLICY);
        assert!(policy.is_ok(), "{policy:?}");
        let base = Policy::base().unwrap();
        assert!(base.allows("read"));
        assert!(!base.allows("openat"));
        assert!(base.mentions("openat"));
    }

    #[test]
    fn threads_policy_file_parses() {
        let policy = Policy::parse(THREADS_POLICY);
        assert!(policy.is_ok(), "{policy:?}");
        assert!(Policy::threads().unwrap().allows("clone"));
    }

    #[test]
    fn plain_rule_allows_unconditionally() {
        let policy = Policy::parse("read # reading held descriptors\n").unwrap();

        assert_eq!(
            policy.rules(),
            &[Rule {
                name: "read",
                nr: libc::SYS_read,
                conditions: vec![],
                action: Action::Allow,
                line: 1,
            }]
        );
    }

    #[test]
    fn ioctl_by_number_and_by_name_parse_to_the_same_condition() {
        let by_number = Policy::parse("ioctl arg1 == 0x5421 # nonblocking\n").unwrap();
        let by_name = Policy::parse("ioctl arg1 == FIONBIO # nonblocking\n").unwrap();

        assert_eq!(by_number, by_name);
        assert_eq!(
            by_number.rules()[0].conditions,
            vec![Condition {
                arg: 1,
                op: Op::Eq,
                value: Value::Literal(0x5421)
            }]
        );
    }

    #[test]
    fn masked_condition_with_or_ed_flags_parses() {
        let policy = Policy::parse(
            "clone arg0 & CLONE_THREAD|CLONE_VM == CLONE_THREAD|0x100 && arg1 != 0 # threads\n",
        )
        .unwrap();

        let flags = int(libc::CLONE_THREAD | libc::CLONE_VM);
        assert_eq!(
            policy.rules()[0].conditions,
            vec![
                Condition {
                    arg: 0,
                    op: Op::MaskedEq(flags),
                    value: Value::Literal(flags)
                },
                Condition {
                    arg: 1,
                    op: Op::Ne,
                    value: Value::Literal(0)
                }
            ]
        );
    }

    #[test]
    fn errno_action_and_pid_value_parse() {
        let policy = Policy::parse(
            "openat => errno EACCES # capability mode\ntgkill arg0 == $pid # abort\n",
        )
        .unwrap();

        assert_eq!(policy.rules()[0].action, Action::Errno(13));
        assert_eq!(policy.rules()[1].conditions[0].value, Value::Pid);
    }

    #[test]
    fn negative_literal_is_sign_extended() {
        let policy = Policy::parse("newfstatat arg0 == -100 # AT_FDCWD\n").unwrap();

        assert_eq!(
            policy.rules()[0].conditions[0].value,
            Value::Literal(u64::MAX - 99)
        );
    }

    #[test]
    fn blank_and_comment_lines_are_skipped() {
        let policy = Policy::parse("\n   # only a comment\n\t\nclose # done\n").unwrap();

        assert_eq!(policy.len(), 1);
    }

    #[test]
    fn rule_without_comment_is_an_error_naming_its_line() {
        assert_eq!(
            err("read # ok\nwrite\n"),
            PolicyError::MissingComment { line: 2 }
        );
    }

    #[test]
    fn rule_with_empty_comment_is_an_error() {
        assert_eq!(err("write #   \n"), PolicyError::MissingComment { line: 1 });
    }

    #[test]
    fn unknown_syscall_is_an_error_naming_it() {
        assert_eq!(
            err("# header\n\nfrobnicate # no such call\n"),
            PolicyError::UnknownSyscall {
                line: 3,
                name: "frobnicate".to_owned()
            }
        );
    }

    #[test]
    fn argument_index_above_five_is_a_syntax_error() {
        assert!(matches!(
            err("read arg6 == 0 # bad\n"),
            PolicyError::Syntax { line: 1, .. }
        ));
    }

    #[test]
    fn unknown_comparison_is_a_syntax_error() {
        assert!(matches!(
            err("read arg0 =~ 1 # x\n"),
            PolicyError::Syntax { line: 1, .. }
        ));
    }

    #[test]
    fn conditions_not_joined_by_and_are_a_syntax_error() {
        assert!(matches!(
            err("read arg0 == 1 arg1 == 2 # x\n"),
            PolicyError::Syntax { line: 1, .. }
        ));
    }

    #[test]
    fn dangling_and_is_a_syntax_error() {
        assert!(matches!(
            err("read arg0 == 1 && # x\n"),
            PolicyError::Syntax { line: 1, .. }
        ));
    }

    #[test]
    fn missing_value_is_a_syntax_error() {
        assert!(matches!(
            err("read arg0 == # x\n"),
            PolicyError::Syntax { line: 1, .. }
        ));
    }

    #[test]
    fn masked_comparison_other_than_equality_is_a_syntax_error() {
        assert!(matches!(
            err("mmap arg2 & 4 != 0 # x\n"),
            PolicyError::Syntax { line: 1, .. }
        ));
    }

    #[test]
    fn unknown_constant_is_a_bad_value() {
        assert_eq!(
            err("ioctl arg1 == KVM_RUN # x\n"),
            PolicyError::BadValue {
                line: 1,
                token: "KVM_RUN".to_owned()
            }
        );
    }

    #[test]
    fn malformed_hex_is_a_bad_value() {
        assert!(matches!(
            err("ioctl arg1 == 0xZZ # x\n"),
            PolicyError::BadValue { line: 1, .. }
        ));
    }

    #[test]
    fn unknown_errno_is_an_error() {
        assert_eq!(
            err("open => errno EFOO # x\n"),
            PolicyError::UnknownErrno {
                line: 1,
                name: "EFOO".to_owned()
            }
        );
    }

    #[test]
    fn out_of_range_errno_is_an_error() {
        assert!(matches!(
            err("open => errno 70000 # x\n"),
            PolicyError::UnknownErrno { line: 1, .. }
        ));
    }

    #[test]
    fn unknown_action_is_a_syntax_error() {
        assert!(matches!(
            err("open => kill # x\n"),
            PolicyError::Syntax { line: 1, .. }
        ));
    }

    #[test]
    fn two_error_numbers_for_one_call_are_an_error() {
        assert_eq!(
            err("open => errno EACCES # a\nopen => errno EPERM # b\n"),
            PolicyError::ConflictingErrno {
                line: 2,
                name: "open".to_owned()
            }
        );
    }

    #[test]
    fn masked_pid_is_a_syntax_error() {
        assert!(matches!(
            err("kill arg0 & 1 == $pid # x\n"),
            PolicyError::Syntax { line: 1, .. }
        ));
    }

    #[test]
    fn extend_unions_rules_without_duplicates() {
        let mut policy = Policy::parse("read # a\n").unwrap();
        let other = Policy::parse("read # again\nwrite # b\n").unwrap();

        policy.extend(&other).unwrap();

        assert_eq!(policy.len(), 2);
        assert!(policy.allows("write"));
    }

    #[test]
    fn display_renders_rules_back() {
        let policy =
            Policy::parse("mmap arg2 & PROT_EXEC == 0 # no code\nopen => errno 13 # x\n").unwrap();

        assert_eq!(
            policy.to_string(),
            "mmap arg2 & 0x4 == 0x0\nopen => errno 13\n"
        );
    }

    #[test]
    fn syscall_table_is_sorted_and_agrees_with_libc() {
        assert!(SYSCALLS.windows(2).all(|w| w[0].0 < w[1].0));
        for (name, nr) in [
            ("read", libc::SYS_read),
            ("ioctl", libc::SYS_ioctl),
            ("clone", libc::SYS_clone),
            ("clone3", libc::SYS_clone3),
            ("openat2", libc::SYS_openat2),
            ("io_uring_setup", libc::SYS_io_uring_setup),
            ("landlock_restrict_self", libc::SYS_landlock_restrict_self),
            ("fchmodat2", libc::SYS_fchmodat2),
            ("mseal", libc::SYS_mseal),
            ("exit_group", libc::SYS_exit_group),
        ] {
            assert_eq!(lookup_syscall(name), Some((name, nr)), "{name}");
        }
    }
}
