//! `vm rename OLD NEW`: renames a stopped guest's directory and config, within its
//! datastore, holding its run lock throughout.

#![forbid(unsafe_code)]

use std::io;
use std::path::{Path, PathBuf};

use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};

use crate::datastore::{self, DatastoreError, Datastores, Guest};
use crate::state::{GuestLock, StateError};

/// Why a guest could not be renamed.
#[derive(Debug, thiserror::Error)]
pub enum RenameError {
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    #[error("{0} already exists")]
    Exists(PathBuf),
    #[error("{name} cannot be renamed")]
    Lock {
        name: String,
        #[source]
        source: StateError,
    },
    #[error("renaming {from} to {to} failed")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn rename_noreplace(from: &Path, to: &Path) -> Result<(), RenameError> {
    renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE).map_err(|errno| {
        if errno == nix::errno::Errno::EEXIST {
            RenameError::Exists(to.to_owned())
        } else {
            RenameError::Rename {
                from: from.to_owned(),
                to: to.to_owned(),
                source: errno.into(),
            }
        }
    })
}

/// Renames guest `old` to `new`; returns the guest under its new name.
pub fn rename(stores: &Datastores, old: &str, new: &str) -> Result<Guest, RenameError> {
    datastore::validate_name(new)?;
    if let Ok(existing) = stores.find_guest(new) {
        return Err(RenameError::Exists(existing.dir));
    }
    let guest = stores.find_guest(old)?;
    let new_dir = guest.dir.with_file_name(new);
    let mut lock = GuestLock::acquire(&guest.dir).map_err(|source| RenameError::Lock {
        name: old.to_owned(),
        source,
    })?;
    rename_noreplace(&guest.dir, &new_dir)?;
    lock.relocate(&new_dir);
    let renamed = Guest {
        name: new.to_owned(),
        datastore: guest.datastore.clone(),
        dir: new_dir,
    };
    let old_conf = renamed.dir.join(format!("{old}.conf"));
    if let Err(e) = rename_noreplace(&old_conf, &renamed.conf_path()) {
        // Put the directory back so the guest stays usable under its old name.
        if rename_noreplace(&renamed.dir, &guest.dir).is_ok() {
            lock.relocate(&guest.dir);
        }
        return Err(e);
    }
    if lock.created() {
        // The lock file was made by us: leave the directory as it was.
        let _ = lock.remove();
    }
    Ok(renamed)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::state::LOCK_FILE;

    fn setup() -> (tempfile::TempDir, Datastores) {
        let dir = tempfile::tempdir().unwrap();
        datastore::init(dir.path()).unwrap();
        fs::create_dir(dir.path().join("a")).unwrap();
        fs::write(dir.path().join("a/a.conf"), "cpu=1\n").unwrap();
        fs::write(dir.path().join("a/disk0.img"), "").unwrap();
        let stores = Datastores::load(dir.path()).unwrap();
        (dir, stores)
    }

    #[test]
    fn rename_moves_directory_and_config() {
        let (dir, stores) = setup();
        let g = rename(&stores, "a", "b").unwrap();
        assert_eq!(g.dir, dir.path().join("b"));
        assert!(dir.path().join("b/b.conf").is_file());
        assert!(dir.path().join("b/disk0.img").is_file());
        assert!(!dir.path().join("a").exists());
        assert!(!dir.path().join("b").join(LOCK_FILE).exists());
    }

    #[test]
    fn rename_onto_existing_name_is_refused() {
        let (dir, stores) = setup();
        fs::create_dir(dir.path().join("b")).unwrap();
        assert!(matches!(
            rename(&stores, "a", "b"),
            Err(RenameError::Exists(_))
        ));
        assert!(dir.path().join("a/a.conf").is_file());
    }

    #[test]
    fn rename_to_invalid_name_is_refused() {
        let (_dir, stores) = setup();
        assert!(matches!(
            rename(&stores, "a", "../b"),
            Err(RenameError::Datastore(DatastoreError::InvalidName { .. }))
        ));
    }

    #[test]
    fn running_guest_is_not_renamed() {
        let (dir, stores) = setup();
        let _held = GuestLock::acquire(&dir.path().join("a")).unwrap();
        assert!(matches!(
            rename(&stores, "a", "b"),
            Err(RenameError::Lock { .. })
        ));
        assert!(dir.path().join("a/a.conf").is_file());
    }
}
