//! Step 7: a Landlock domain that handles every file-system right the kernel knows and adds no
//! rule, so every path access is denied; likewise TCP bind/connect (ABI 4+) and, as scopes,
//! abstract UNIX sockets and signals outside the domain (ABI 6+).

use std::io;

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetError,
    RulesetStatus, Scope,
};

use crate::Error;

/// What step 7 will do, decided before anything irreversible happens.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Enforce every right of `abi` (the kernel's version, capped at the newest the `landlock`
    /// crate knows).
    Enforce { kernel_abi: i32, abi: ABI },
    /// The kernel has no Landlock and the profile allows going on without it.
    Skip { reason: io::Error },
}

/// Probes the kernel; without Landlock this is an error unless the profile weakens it.
pub(crate) fn plan(allow_missing: bool) -> Result<Plan, Error> {
    let reason = match crate::sys::landlock_abi() {
        Ok(version) if version >= 1 => {
            return Ok(Plan::Enforce {
                kernel_abi: version,
                abi: abi_for(version),
            });
        }
        Ok(version) => io::Error::other(format!("Landlock ABI version {version}")),
        Err(e) => e,
    };
    if allow_missing {
        Ok(Plan::Skip { reason })
    } else {
        Err(Error::LandlockUnavailable(reason))
    }
}

fn abi_for(version: i32) -> ABI {
    match version {
        ..=1 => ABI::V1,
        2 => ABI::V2,
        3 => ABI::V3,
        4 => ABI::V4,
        5 => ABI::V5,
        6 => ABI::V6,
        7 => ABI::V7,
        8 => ABI::V8,
        9 => ABI::V9,
        _ => ABI::V10,
    }
}

/// Restricts the calling thread (the only one) and checks the kernel enforced all of it.
pub(crate) fn restrict(plan: &Plan) -> Result<(), Error> {
    let abi = match plan {
        Plan::Enforce { abi, kernel_abi } => {
            tracing::debug!(kernel_abi, ?abi, "landlock");
            *abi
        }
        Plan::Skip { reason } => {
            tracing::warn!(%reason, "Landlock unavailable; continuing as the profile allows");
            return Ok(());
        }
    };
    let fail = |op: &'static str| {
        move |e: RulesetError| Error::Landlock {
            op: op.to_owned(),
            source: Box::new(e),
        }
    };
    // HardRequirement: every right asked for below exists in `abi`, which the kernel supports;
    // should the crate still find one unsupported, that is an error, never a silent downgrade.
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi))
        .map_err(fail("handling file-system access"))?;
    let net = AccessNet::from_all(abi);
    if !net.is_empty() {
        ruleset = ruleset
            .handle_access(net)
            .map_err(fail("handling TCP bind and connect"))?;
    }
    let scopes = Scope::from_all(abi);
    if !scopes.is_empty() {
        ruleset = ruleset
            .scope(scopes)
            .map_err(fail("scoping signals and abstract sockets"))?;
    }
    let status = ruleset
        .create()
        .map_err(fail("creating the ruleset"))?
        .restrict_self()
        .map_err(fail("landlock_restrict_self"))?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(Error::Landlock {
            op: "checking enforcement".to_owned(),
            source: format!("ruleset status is {:?}", status.ruleset).into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_versions_map_to_the_same_crate_abi() {
        assert_eq!(abi_for(1), ABI::V1);
        assert_eq!(abi_for(4), ABI::V4);
        assert_eq!(abi_for(6), ABI::V6);
        assert_eq!(abi_for(7), ABI::V7);
    }

    #[test]
    fn kernel_newer_than_the_crate_maps_to_the_newest_known_abi() {
        assert_eq!(abi_for(99), ABI::V10);
    }
}
