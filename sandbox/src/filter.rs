//! Compiling a [`Policy`] to seccomp-bpf programs with `seccompiler`, and installing them.
//!
//! A seccompiler filter has one action for a match and one for a miss, and a policy has three
//! outcomes (allow, fail with an errno, kill). The kernel runs every installed filter and takes
//! the most severe verdict (kill > errno > allow), so a policy becomes:
//!
//! - one *errno filter* per distinct error number: the call's errno rules match → that errno;
//!   anything else → allow (this filter has no opinion);
//! - one *allow-list filter*: allow rules or errno rules match → allow; anything else → kill.
//!
//! An allowed call passes all filters; an errno call is allowed by the allow-list and answered
//! by its errno filter; anything else is killed by the allow-list. Both kinds start with
//! seccompiler's architecture check, which kills on a non-x86_64 call (the x32 ABI's numbers
//! have bit 30 set and so match no rule either). The errno filters are installed first: once
//! the allow-list is in, `seccomp(2)` itself is no longer allowed.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::policy::{Action, Condition, Op, Policy, Rule, Value};

/// Compiled filters, in installation order.
#[derive(Debug)]
pub(crate) struct Filters {
    programs: Vec<BpfProgram>,
}

/// Why a policy did not compile.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("building the filter for `{syscall}`")]
    Rule {
        syscall: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("building the seccomp program")]
    Program(#[source] seccompiler::BackendError),
}

const ARCH: TargetArch = TargetArch::x86_64;

impl Filters {
    /// Compiles `policy`, substituting `pid` for `$pid`.
    pub(crate) fn compile(policy: &Policy, pid: u32) -> Result<Filters, FilterError> {
        let mut allow_list: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        let mut errno_lists: BTreeMap<u32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();

        for rule in policy.rules() {
            let compiled = compile_rule(rule, pid)?;
            add(&mut allow_list, rule.nr, compiled.clone());
            if let Action::Errno(errno) = rule.action {
                add(errno_lists.entry(errno).or_default(), rule.nr, compiled);
            }
        }

        let mut programs = Vec::with_capacity(errno_lists.len().saturating_add(1));
        for (errno, rules) in errno_lists {
            programs.push(program(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(errno),
            )?);
        }
        programs.push(program(
            allow_list,
            SeccompAction::KillProcess,
            SeccompAction::Allow,
        )?);
        Ok(Filters { programs })
    }

    /// Installs every program on every thread of the process (TSYNC).
    pub(crate) fn install(&self) -> Result<(), seccompiler::Error> {
        for program in &self.programs {
            seccompiler::apply_filter_all_threads(program)?;
        }
        Ok(())
    }

    /// Total BPF instructions, for logs.
    pub(crate) fn instructions(&self) -> usize {
        self.programs.iter().map(Vec::len).sum()
    }

    pub(crate) fn count(&self) -> usize {
        self.programs.len()
    }
}

/// `None` marks an unconditional rule.
fn compile_rule(rule: &Rule, pid: u32) -> Result<Option<SeccompRule>, FilterError> {
    if rule.conditions.is_empty() {
        return Ok(None);
    }
    let error = |source| FilterError::Rule {
        syscall: rule.name,
        source,
    };
    let conditions = rule
        .conditions
        .iter()
        .map(|c| condition(c, pid).map_err(error))
        .collect::<Result<Vec<_>, _>>()?;
    SeccompRule::new(conditions).map(Some).map_err(error)
}

fn condition(c: &Condition, pid: u32) -> Result<SeccompCondition, seccompiler::BackendError> {
    let value = match c.value {
        Value::Literal(v) => v,
        Value::Pid => u64::from(pid),
    };
    let op = match c.op {
        Op::Eq => SeccompCmpOp::Eq,
        Op::Ne => SeccompCmpOp::Ne,
        Op::Lt => SeccompCmpOp::Lt,
        Op::Le => SeccompCmpOp::Le,
        Op::Gt => SeccompCmpOp::Gt,
        Op::Ge => SeccompCmpOp::Ge,
        Op::MaskedEq(mask) => SeccompCmpOp::MaskedEq(mask),
    };
    SeccompCondition::new(c.arg, SeccompCmpArgLen::Qword, op, value)
}

/// Adds a rule to a per-call list; an unconditional rule (`None`) empties the list for good.
fn add(list: &mut BTreeMap<i64, Vec<SeccompRule>>, nr: i64, rule: Option<SeccompRule>) {
    match rule {
        None => {
            list.insert(nr, Vec::new());
        }
        Some(rule) => match list.get_mut(&nr) {
            // Already unconditional: a narrower alternative changes nothing.
            Some(rules) if rules.is_empty() => {}
            Some(rules) => rules.push(rule),
            None => {
                list.insert(nr, vec![rule]);
            }
        },
    }
}

fn program(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    miss: SeccompAction,
    hit: SeccompAction,
) -> Result<BpfProgram, FilterError> {
    let filter = SeccompFilter::new(rules, miss, hit, ARCH).map_err(FilterError::Program)?;
    BpfProgram::try_from(filter).map_err(FilterError::Program)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_and_threads_policies_compile_to_errno_filters_plus_allow_list() {
        let mut policy = Policy::base().unwrap();
        policy.extend(&Policy::threads().unwrap()).unwrap();

        let filters = Filters::compile(&policy, 42).unwrap();

        // EACCES and ENOSYS filters, then the allow-list.
        assert_eq!(filters.count(), 3);
        assert!(filters.instructions() < 4096);
    }

    #[test]
    fn allow_only_policy_compiles_to_one_filter() {
        let policy = Policy::parse("read # r\nwrite # w\n").unwrap();

        let filters = Filters::compile(&policy, 1).unwrap();

        assert_eq!(filters.count(), 1);
    }

    #[test]
    fn unconditional_rule_overrides_conditional_alternatives() {
        let mut list = BTreeMap::new();
        let narrow = SeccompRule::new(vec![
            SeccompCondition::new(1, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 7).unwrap(),
        ])
        .unwrap();

        add(&mut list, 16, Some(narrow.clone()));
        add(&mut list, 16, None);
        add(&mut list, 16, Some(narrow));

        assert_eq!(list.get(&16).map(Vec::len), Some(0));
    }
}
