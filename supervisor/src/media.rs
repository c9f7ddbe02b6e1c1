//! `vm iso` and `vm img`: install media in `.iso/` and cloud images in `.img/` of each
//! datastore: list them, or download one (through [`crate::fetch`]).

#![forbid(unsafe_code)]

use std::fs;
use std::io::IsTerminal;
use std::path::PathBuf;

use crate::datastore::{DatastoreError, Datastores};
use crate::fetch::{self, FetchError};
use crate::table;

/// Which media directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    /// `.iso/`: install media, stored as fetched.
    Iso,
    /// `.img/`: disk images, decompressed from `.xz`/`.gz`.
    Img,
}

/// Why a media command failed.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    #[error("creating {path} failed")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Fetch(#[from] FetchError),
}

/// Every media file: `(datastore, file name)`, datastores in order, names sorted. Hidden
/// files (a download in progress is `.NAME.part`) are left out.
pub fn list(stores: &Datastores, kind: MediaKind) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for ds in stores.all() {
        let dir = match kind {
            MediaKind::Iso => ds.iso_dir(),
            MediaKind::Img => ds.img_dir(),
        };
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        out.extend(names.into_iter().map(|n| (ds.name.clone(), n)));
    }
    out
}

/// The `DATASTORE FILENAME` table.
pub fn render(files: &[(String, String)]) -> String {
    let mut rows = vec![vec!["DATASTORE".to_owned(), "FILENAME".to_owned()]];
    rows.extend(files.iter().map(|(ds, f)| vec![ds.clone(), f.clone()]));
    table::render(&rows)
}

/// Downloads `url` into the media directory of datastore `datastore`; returns the new file.
pub fn download(
    stores: &Datastores,
    datastore: &str,
    kind: MediaKind,
    url: &str,
) -> Result<PathBuf, MediaError> {
    let ds = stores.get(datastore)?;
    let dir = match kind {
        MediaKind::Iso => ds.iso_dir(),
        MediaKind::Img => ds.img_dir(),
    };
    fs::create_dir_all(&dir).map_err(|source| MediaError::CreateDir {
        path: dir.clone(),
        source,
    })?;
    let opts = fetch::Options {
        decompress: kind == MediaKind::Img,
        progress: std::io::stderr().is_terminal(),
    };
    Ok(fetch::download(url, &dir, &opts)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore;

    #[test]
    fn list_shows_visible_files_of_every_datastore() {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = dir.path().join("vm");
        let extra = dir.path().join("extra");
        fs::create_dir(&extra).unwrap();
        datastore::init(&vm_dir).unwrap();
        datastore::add(&vm_dir, "extra", &extra).unwrap();
        fs::write(vm_dir.join(".iso/b.iso"), "").unwrap();
        fs::write(vm_dir.join(".iso/a.iso"), "").unwrap();
        fs::write(vm_dir.join(".iso/.c.iso.part"), "").unwrap();
        fs::create_dir(extra.join(".iso")).unwrap();
        fs::write(extra.join(".iso/d.iso"), "").unwrap();
        let stores = Datastores::load(&vm_dir).unwrap();
        let files = list(&stores, MediaKind::Iso);
        assert_eq!(
            render(&files),
            "DATASTORE  FILENAME\ndefault    a.iso\ndefault    b.iso\nextra      d.iso\n"
        );
        assert!(list(&stores, MediaKind::Img).is_empty());
    }

    #[test]
    fn download_to_unknown_datastore_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        datastore::init(dir.path()).unwrap();
        let stores = Datastores::load(dir.path()).unwrap();
        assert!(matches!(
            download(&stores, "nope", MediaKind::Iso, "file:///etc/hostname"),
            Err(MediaError::Datastore(DatastoreError::NoDatastore(_)))
        ));
    }
}
