//! The datastore layout, vm-bhyve's:
//!
//! ```text
//! $vm_dir/.config/system.conf   switches, extra datastores (datastore_list, path_NAME)
//! $vm_dir/.templates/*.conf     guest templates
//! $vm_dir/.iso/  $vm_dir/.img/  install media and cloud images
//! $ds/NAME/NAME.conf            one directory per guest, in any datastore
//! ```
//!
//! `vm_dir` is the datastore called `default`; more are listed in `system.conf`. Guest names
//! are unique across datastores and are checked ([`validate_name`]) before they touch a path.

#![forbid(unsafe_code)]

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::conf::{self, Conf, ConfError};

pub const CONFIG_DIR: &str = ".config";
pub const TEMPLATES_DIR: &str = ".templates";
pub const ISO_DIR: &str = ".iso";
pub const IMG_DIR: &str = ".img";
pub const SYSTEM_CONF: &str = "system.conf";
/// The datastore that is `vm_dir` itself.
pub const DEFAULT_DATASTORE: &str = "default";
/// The longest guest, datastore or template name.
pub const MAX_NAME_LEN: usize = 64;

/// Templates shipped with capvm; `vm init` installs the missing ones.
pub static TEMPLATES: &[(&str, &str)] = &[
    ("default", include_str!("../templates/default.conf")),
    (
        "freebsd-uefi",
        include_str!("../templates/freebsd-uefi.conf"),
    ),
    ("linux", include_str!("../templates/linux.conf")),
];

const SYSTEM_CONF_HEADER: &str =
    "# capvm / vm-bhyve system settings: virtual switches and extra datastores.\n";

/// Why a datastore operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("vm_dir {0} does not exist or is not a directory (run vm init)")]
    NoVmDir(PathBuf),
    #[error("{op} {path} failed")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Conf(#[from] ConfError),
    #[error("unable to load datastore {0:?}")]
    NoDatastore(String),
    #[error("datastore {0:?} already exists")]
    DatastoreExists(String),
    #[error("cannot remove the default datastore")]
    RemoveDefault,
    #[error("datastore {name}: ZFS datastores are not supported")]
    Zfs { name: String },
    #[error("{0} is not an absolute path to a directory")]
    BadPath(PathBuf),
    #[error("{0} is already the default datastore")]
    IsVmDir(PathBuf),
    #[error("{0:?} does not appear to be a valid virtual machine")]
    NoGuest(String),
    #[error("unable to find template {0}")]
    NoTemplate(PathBuf),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DatastoreError + use<> {
    let path = path.to_owned();
    move |source| DatastoreError::Io { op, path, source }
}

/// Checks a guest, datastore or template name: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most
/// [`MAX_NAME_LEN`] characters. Such a name is a single, non-hidden path component.
pub fn validate_name(name: &str) -> Result<(), DatastoreError> {
    let invalid = |reason| {
        Err(DatastoreError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return invalid("longer than 64 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return invalid("must start with a letter or digit");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return invalid("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// Where one datastore lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datastore {
    pub name: String,
    pub path: PathBuf,
}

impl Datastore {
    pub fn iso_dir(&self) -> PathBuf {
        self.path.join(ISO_DIR)
    }

    pub fn img_dir(&self) -> PathBuf {
        self.path.join(IMG_DIR)
    }
}

/// A guest found in a datastore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    pub name: String,
    pub datastore: String,
    /// `$ds/NAME`.
    pub dir: PathBuf,
}

impl Guest {
    /// `$ds/NAME/NAME.conf`.
    pub fn conf_path(&self) -> PathBuf {
        self.dir.join(format!("{}.conf", self.name))
    }
}

/// `$vm_dir/.config/system.conf`.
pub fn system_conf_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join(CONFIG_DIR).join(SYSTEM_CONF)
}

/// `$vm_dir/.templates/NAME.conf`, if it exists.
pub fn template_path(vm_dir: &Path, name: &str) -> Result<PathBuf, DatastoreError> {
    validate_name(name)?;
    let path = vm_dir.join(TEMPLATES_DIR).join(format!("{name}.conf"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(DatastoreError::NoTemplate(path))
    }
}

/// The datastores configured for `vm_dir`, `default` first.
#[derive(Debug, Clone)]
pub struct Datastores {
    stores: Vec<Datastore>,
}

impl Datastores {
    /// Reads `system.conf` of `vm_dir`. Datastores whose `path_NAME` is unset are skipped,
    /// as vm-bhyve skips them.
    pub fn load(vm_dir: &Path) -> Result<Self, DatastoreError> {
        if !vm_dir.is_dir() {
            return Err(DatastoreError::NoVmDir(vm_dir.to_owned()));
        }
        let conf = Conf::load_if_exists(&system_conf_path(vm_dir))?;
        let mut stores = vec![Datastore {
            name: DEFAULT_DATASTORE.to_owned(),
            path: vm_dir.to_owned(),
        }];
        for name in conf
            .get("datastore_list")
            .unwrap_or_default()
            .split_whitespace()
        {
            if name == DEFAULT_DATASTORE || stores.iter().any(|d| d.name == name) {
                continue;
            }
            let Some(spec) = conf.get(&format!("path_{name}")).filter(|s| !s.is_empty()) else {
                continue;
            };
            if spec.starts_with("zfs:") {
                return Err(DatastoreError::Zfs {
                    name: name.to_owned(),
                });
            }
            stores.push(Datastore {
                name: name.to_owned(),
                path: PathBuf::from(spec),
            });
        }
        Ok(Datastores { stores })
    }

    /// All datastores, `default` first, then in `datastore_list` order.
    pub fn all(&self) -> &[Datastore] {
        &self.stores
    }

    /// The datastore called `name`.
    pub fn get(&self, name: &str) -> Result<&Datastore, DatastoreError> {
        self.stores
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| DatastoreError::NoDatastore(name.to_owned()))
    }

    /// The guest called `name`, looked for in each datastore in order.
    pub fn find_guest(&self, name: &str) -> Result<Guest, DatastoreError> {
        validate_name(name)?;
        self.stores
            .iter()
            .map(|ds| Guest {
                name: name.to_owned(),
                datastore: ds.name.clone(),
                dir: ds.path.join(name),
            })
            .find(|g| g.conf_path().is_file())
            .ok_or_else(|| DatastoreError::NoGuest(name.to_owned()))
    }

    /// Every guest: datastores in order, guests sorted by name. A datastore whose directory
    /// cannot be read is skipped, as vm-bhyve skips it.
    pub fn guests(&self) -> Vec<Guest> {
        let mut all = Vec::new();
        for ds in &self.stores {
            let Ok(entries) = fs::read_dir(&ds.path) else {
                continue;
            };
            let mut names: Vec<String> = entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| validate_name(n).is_ok())
                .collect();
            names.sort();
            all.extend(
                names
                    .into_iter()
                    .map(|name| Guest {
                        dir: ds.path.join(&name),
                        name,
                        datastore: ds.name.clone(),
                    })
                    .filter(|g| g.conf_path().is_file()),
            );
        }
        all
    }
}

/// What `vm init` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitReport {
    /// Templates written (the others were present and left alone).
    pub templates_installed: Vec<String>,
}

/// Creates the datastore layout under `vm_dir`; safe to run again: nothing present is
/// overwritten, so templates the user edited stay as they are.
pub fn init(vm_dir: &Path) -> Result<InitReport, DatastoreError> {
    fs::create_dir_all(vm_dir).map_err(io_err("creating", vm_dir))?;
    for sub in [CONFIG_DIR, TEMPLATES_DIR, ISO_DIR, IMG_DIR] {
        let dir = vm_dir.join(sub);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err(io_err("creating", &dir)(e)),
        }
    }
    write_new(&system_conf_path(vm_dir), SYSTEM_CONF_HEADER)?;
    let mut report = InitReport::default();
    for (name, text) in TEMPLATES {
        let path = vm_dir.join(TEMPLATES_DIR).join(format!("{name}.conf"));
        if write_new(&path, text)? {
            report.templates_installed.push((*name).to_owned());
        }
    }
    Ok(report)
}

/// Writes `text` to a new file at `path`; `false` if the file already exists.
fn write_new(path: &Path, text: &str) -> Result<bool, DatastoreError> {
    let mut file = match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(io_err("creating", path)(e)),
    };
    file.write_all(text.as_bytes())
        .map_err(io_err("writing", path))?;
    Ok(true)
}

/// Adds datastore `name` at `path` (an existing directory; it is not created, as in
/// vm-bhyve) to `system.conf`.
pub fn add(vm_dir: &Path, name: &str, path: &Path) -> Result<(), DatastoreError> {
    validate_name(name)?;
    let current = Datastores::load(vm_dir)?;
    if name == DEFAULT_DATASTORE || current.all().iter().any(|d| d.name == name) {
        return Err(DatastoreError::DatastoreExists(name.to_owned()));
    }
    let spec = path.to_string_lossy();
    if spec.starts_with("zfs:") {
        return Err(DatastoreError::Zfs {
            name: name.to_owned(),
        });
    }
    if !path.is_absolute() || !path.is_dir() {
        return Err(DatastoreError::BadPath(path.to_owned()));
    }
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(path, vm_dir) {
        return Err(DatastoreError::IsVmDir(path.to_owned()));
    }
    let spec = spec.into_owned();
    conf::update_file(&system_conf_path(vm_dir), |text| {
        let list = Conf::parse(text)
            .get("datastore_list")
            .unwrap_or_default()
            .split_whitespace()
            .chain([name])
            .collect::<Vec<_>>()
            .join(" ");
        let text = conf::set_value(text, "datastore_list", &list)?;
        conf::set_value(&text, &format!("path_{name}"), &spec)
    })?;
    Ok(())
}

/// Removes datastore `name` from `system.conf`; its files stay where they are.
pub fn remove(vm_dir: &Path, name: &str) -> Result<(), DatastoreError> {
    if name == DEFAULT_DATASTORE {
        return Err(DatastoreError::RemoveDefault);
    }
    validate_name(name)?;
    let path = system_conf_path(vm_dir);
    let conf = Conf::load_if_exists(&path)?;
    let listed = conf
        .get("datastore_list")
        .unwrap_or_default()
        .split_whitespace()
        .any(|n| n == name);
    if !listed {
        return Err(DatastoreError::NoDatastore(name.to_owned()));
    }
    conf::update_file(&path, |text| {
        let list = Conf::parse(text)
            .get("datastore_list")
            .unwrap_or_default()
            .split_whitespace()
            .filter(|n| *n != name)
            .collect::<Vec<_>>()
            .join(" ");
        let text = if list.is_empty() {
            conf::remove_key(text, "datastore_list")
        } else {
            conf::set_value(text, "datastore_list", &list)?
        };
        Ok(conf::remove_key(&text, &format!("path_{name}")))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rules() {
        for ok in ["a", "web1", "my.guest_2-x", "0", &"a".repeat(64)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "_x",
            "a/b",
            "..",
            "a b",
            "ü",
            &"a".repeat(65),
            "a\0",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn init_creates_layout_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = dir.path().join("vm");
        let first = init(&vm_dir).unwrap();
        assert_eq!(first.templates_installed.len(), TEMPLATES.len());
        for sub in [CONFIG_DIR, TEMPLATES_DIR, ISO_DIR, IMG_DIR] {
            assert!(vm_dir.join(sub).is_dir());
        }
        assert!(system_conf_path(&vm_dir).is_file());
        let edited = vm_dir.join(TEMPLATES_DIR).join("default.conf");
        fs::write(&edited, "cpu=8\n").unwrap();
        let second = init(&vm_dir).unwrap();
        assert!(second.templates_installed.is_empty());
        assert_eq!(fs::read_to_string(&edited).unwrap(), "cpu=8\n");
    }

    #[test]
    fn init_restores_a_deleted_template() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        fs::remove_file(dir.path().join(TEMPLATES_DIR).join("linux.conf")).unwrap();
        assert_eq!(init(dir.path()).unwrap().templates_installed, vec!["linux"]);
    }

    #[test]
    fn add_list_remove_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = dir.path().join("vm");
        let extra = dir.path().join("extra");
        fs::create_dir(&extra).unwrap();
        init(&vm_dir).unwrap();
        add(&vm_dir, "fast", &extra).unwrap();
        let ds = Datastores::load(&vm_dir).unwrap();
        let names: Vec<_> = ds.all().iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["default", "fast"]);
        assert_eq!(ds.get("fast").unwrap().path, extra);
        assert!(matches!(
            add(&vm_dir, "fast", &extra),
            Err(DatastoreError::DatastoreExists(_))
        ));
        remove(&vm_dir, "fast").unwrap();
        assert_eq!(Datastores::load(&vm_dir).unwrap().all().len(), 1);
        let text = fs::read_to_string(system_conf_path(&vm_dir)).unwrap();
        assert!(!text.contains("path_fast"), "{text}");
        assert!(matches!(
            remove(&vm_dir, "fast"),
            Err(DatastoreError::NoDatastore(_))
        ));
    }

    #[test]
    fn add_refuses_bad_paths() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        assert!(matches!(
            add(dir.path(), "x", Path::new("relative")),
            Err(DatastoreError::BadPath(_))
        ));
        assert!(matches!(
            add(dir.path(), "x", &dir.path().join("missing")),
            Err(DatastoreError::BadPath(_))
        ));
        assert!(matches!(
            add(dir.path(), "x", dir.path()),
            Err(DatastoreError::IsVmDir(_))
        ));
        assert!(matches!(
            add(dir.path(), "x", Path::new("zfs:pool/vm")),
            Err(DatastoreError::Zfs { .. })
        ));
        assert!(matches!(
            remove(dir.path(), "default"),
            Err(DatastoreError::RemoveDefault)
        ));
    }

    #[test]
    fn guests_are_found_across_datastores() {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = dir.path().join("vm");
        let extra = dir.path().join("extra");
        fs::create_dir(&extra).unwrap();
        init(&vm_dir).unwrap();
        add(&vm_dir, "extra", &extra).unwrap();
        for (base, name) in [(&vm_dir, "b"), (&vm_dir, "a"), (&extra, "c")] {
            fs::create_dir(base.join(name)).unwrap();
            fs::write(base.join(name).join(format!("{name}.conf")), "cpu=1\n").unwrap();
        }
        fs::create_dir(vm_dir.join("noconf")).unwrap();
        let ds = Datastores::load(&vm_dir).unwrap();
        let guests: Vec<_> = ds
            .guests()
            .into_iter()
            .map(|g| (g.name, g.datastore))
            .collect();
        assert_eq!(
            guests,
            [
                ("a".to_owned(), "default".to_owned()),
                ("b".to_owned(), "default".to_owned()),
                ("c".to_owned(), "extra".to_owned())
            ]
        );
        assert_eq!(ds.find_guest("c").unwrap().dir, extra.join("c"));
        assert!(matches!(
            ds.find_guest("noconf"),
            Err(DatastoreError::NoGuest(_))
        ));
        assert!(matches!(
            ds.find_guest("../vm/a"),
            Err(DatastoreError::InvalidName { .. })
        ));
    }

    #[test]
    fn zfs_datastore_in_system_conf_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        fs::write(
            system_conf_path(dir.path()),
            "datastore_list=\"z\"\npath_z=\"zfs:pool/z\"\n",
        )
        .unwrap();
        assert!(matches!(
            Datastores::load(dir.path()),
            Err(DatastoreError::Zfs { .. })
        ));
    }

    #[test]
    fn template_path_checks_name_and_presence() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        assert!(template_path(dir.path(), "freebsd-uefi").is_ok());
        assert!(matches!(
            template_path(dir.path(), "nope"),
            Err(DatastoreError::NoTemplate(_))
        ));
        assert!(template_path(dir.path(), "../x").is_err());
    }
}
