//! Step 4: resource limits. Soft and hard limits are both set, so they cannot be raised again
//! once the process has no `CAP_SYS_RESOURCE`.

use std::io;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::{Error, Profile};

/// No core files, the profile's descriptor ceiling, and (without threads) no new tasks.
pub(crate) fn apply(profile: &Profile) -> Result<(), Error> {
    set(Resource::RLIMIT_CORE, "RLIMIT_CORE", 0)?;
    set(Resource::RLIMIT_NOFILE, "RLIMIT_NOFILE", profile.max_fds)?;
    if !profile.threads {
        // Counted per real uid: once the process runs as the profile's uid, clone() fails with
        // EAGAIN, behind seccomp, which already kills any clone().
        set(Resource::RLIMIT_NPROC, "RLIMIT_NPROC", 0)?;
    }
    Ok(())
}

fn set(resource: Resource, name: &'static str, value: u64) -> Result<(), Error> {
    let error = |source: io::Error| Error::Rlimit {
        resource: name,
        source,
    };
    setrlimit(resource, value, value).map_err(|e| error(e.into()))?;
    let (soft, hard) = getrlimit(resource).map_err(|e| error(e.into()))?;
    if soft != value || hard != value {
        return Err(error(io::Error::other(format!(
            "limit reads back as {soft}/{hard}, not {value}"
        ))));
    }
    Ok(())
}
