//! `vm configure NAME`: opens the guest's config in `$EDITOR` (or `vi`).

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use crate::datastore::Guest;

/// The editor when `EDITOR` is unset, as in vm-bhyve.
pub const FALLBACK_EDITOR: &str = "vi";

/// Why the editor could not be run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigureError {
    #[error("running the editor {editor:?} failed")]
    Spawn {
        editor: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the editor {editor:?} exited with {status}; {path} may be unchanged")]
    EditorFailed {
        editor: String,
        status: std::process::ExitStatus,
        path: PathBuf,
    },
}

/// Runs `editor` (split on blanks, as vm-bhyve's unquoted `$EDITOR`; `vi` if unset or empty)
/// on the config of `guest` and waits for it.
pub fn edit(guest: &Guest, editor: Option<OsString>) -> Result<(), ConfigureError> {
    let editor = editor
        .map(|e| e.to_string_lossy().into_owned())
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| FALLBACK_EDITOR.to_owned());
    let mut words = editor.split_whitespace();
    let program = words.next().unwrap_or(FALLBACK_EDITOR);
    let path = guest.conf_path();
    let status = Command::new(program)
        .args(words)
        .arg(&path)
        .status()
        .map_err(|source| ConfigureError::Spawn {
            editor: editor.clone(),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(ConfigureError::EditorFailed {
            editor,
            status,
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(dir: &std::path::Path) -> Guest {
        Guest {
            name: "g".into(),
            datastore: "default".into(),
            dir: dir.to_owned(),
        }
    }

    #[test]
    fn editor_words_are_split_and_file_appended() {
        let dir = tempfile::tempdir().unwrap();
        let g = guest(dir.path());
        std::fs::write(g.conf_path(), "").unwrap();
        // `sh -c SCRIPT sh FILE`: the script appends to its first argument.
        let script = dir.path().join("ed.sh");
        std::fs::write(&script, "#!/bin/sh\necho cpu=3 >> \"$1\"\n").unwrap();
        edit(&g, Some(format!("sh {}", script.display()).into())).unwrap();
        assert_eq!(std::fs::read_to_string(g.conf_path()).unwrap(), "cpu=3\n");
    }

    #[test]
    fn failing_editor_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            edit(&guest(dir.path()), Some("false".into())),
            Err(ConfigureError::EditorFailed { .. })
        ));
        assert!(matches!(
            edit(&guest(dir.path()), Some("/nonexistent/editor".into())),
            Err(ConfigureError::Spawn { .. })
        ));
    }
}
