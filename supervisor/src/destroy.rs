//! `vm destroy`: removes a stopped guest's directory, holding its run lock throughout so it
//! cannot be started meanwhile.

#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::path::PathBuf;

use crate::datastore::Guest;
use crate::state::{GuestLock, StateError};

/// Why a guest could not be destroyed.
#[derive(Debug, thiserror::Error)]
pub enum DestroyError {
    #[error("{name} cannot be destroyed")]
    Lock {
        name: String,
        #[source]
        source: StateError,
    },
    #[error("removing {path} failed")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The question `vm destroy` asks without `-f`.
pub fn prompt(name: &str) -> String {
    format!("Are you sure you want to completely remove {name}? [y/N] ")
}

/// Whether an answer to [`prompt`] is yes: `y` or `yes`, any case.
pub fn confirmed(answer: &str) -> bool {
    let answer = answer.trim();
    answer.eq_ignore_ascii_case("y") || answer.eq_ignore_ascii_case("yes")
}

/// Removes `guest`'s directory (disk images outside it, `diskN_dev="custom"`, stay).
pub fn destroy(guest: &Guest) -> Result<(), DestroyError> {
    let lock = GuestLock::acquire(&guest.dir).map_err(|source| DestroyError::Lock {
        name: guest.name.clone(),
        source,
    })?;
    let result = fs::remove_dir_all(&guest.dir).map_err(|source| DestroyError::Remove {
        path: guest.dir.clone(),
        source,
    });
    drop(lock);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_like_vm_bhyve() {
        for yes in ["y", "Y", "yes", "YES\n", " y "] {
            assert!(confirmed(yes), "{yes:?}");
        }
        for no in ["", "n", "no", "yess", "\n"] {
            assert!(!confirmed(no), "{no:?}");
        }
    }

    #[test]
    fn running_guest_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let guest = Guest {
            name: "g".into(),
            datastore: "default".into(),
            dir: dir.path().join("g"),
        };
        fs::create_dir(&guest.dir).unwrap();
        let mut held = GuestLock::acquire(&guest.dir).unwrap();
        held.write_pid(99).unwrap();
        let err = destroy(&guest).unwrap_err();
        assert!(matches!(
            err,
            DestroyError::Lock {
                source: StateError::Running { pid: Some(99) },
                ..
            }
        ));
        assert!(guest.dir.exists());
        drop(held);
        destroy(&guest).unwrap();
        assert!(!guest.dir.exists());
    }
}
