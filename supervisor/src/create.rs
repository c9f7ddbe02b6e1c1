//! `vm create`: a new guest directory from a template.
//!
//! As vm-bhyve: the template is copied to `NAME/NAME.conf` with `uuid` set, `-c`/`-m`
//! applied, and every `diskN_size` stripped (it only means something in templates); each
//! file disk becomes a sparse file of its size (`-s` for disk0, else `diskN_size`, else 20G),
//! mode 600. capvm also writes one generated MAC per NIC that has none (vm-bhyve does this at
//! first start), with vm-bhyve's 58:9c:fc prefix.
//!
//! Every file is created with `O_EXCL`; if anything fails, the guest directory (which this
//! call created, so everything in it is ours) is removed: no half guest is left behind.

#![forbid(unsafe_code)]

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::conf::{self, Conf, ConfError, Diagnostic};
use crate::datastore::{self, DatastoreError, Datastores, Guest};
use crate::guest_config::{
    self, DiskDev, GuestConfig, GuestConfigError, MacAddr, parse_disk_size, parse_memory,
};

/// vm-bhyve's disk size when neither `-s` nor the template gives one.
pub const DEFAULT_DISK_SIZE: u64 = 20 << 30;
/// The OUI vm-bhyve generates MACs in.
pub const MAC_PREFIX: [u8; 3] = [0x58, 0x9c, 0xfc];

/// Why a guest could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    #[error("virtual machine already exists in {0}")]
    Exists(PathBuf),
    #[error("template {path}: {source}")]
    Template {
        path: PathBuf,
        #[source]
        source: GuestConfigError,
    },
    #[error("template {0} is missing disk0_name specification")]
    NoDisk(PathBuf),
    #[error("{flag}: {message}")]
    BadOption { flag: &'static str, message: String },
    #[error("disk{index}_dev={dev}: capvm cannot create such disks")]
    UnsupportedDisk { index: u32, dev: &'static str },
    #[error("-s needs disk0 to be a file disk")]
    SizeForCustomDisk,
    #[error(transparent)]
    Conf(#[from] ConfError),
    #[error("the new config is invalid: {0}")]
    Result(GuestConfigError),
    #[error("{op} {path} failed")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("generating a MAC address failed: {0}")]
    Random(getrandom::Error),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CreateError + use<> {
    let path = path.to_owned();
    move |source| CreateError::Io { op, path, source }
}

/// `vm create` options, as given on the command line.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// `-d`
    pub datastore: String,
    /// `-t`
    pub template: String,
    /// `-s`: disk0's size.
    pub size: Option<String>,
    /// `-c`
    pub cpus: Option<String>,
    /// `-m`
    pub memory: Option<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            datastore: datastore::DEFAULT_DATASTORE.to_owned(),
            template: "default".to_owned(),
            size: None,
            cpus: None,
            memory: None,
        }
    }
}

/// A created guest, and what its template contained that capvm ignores.
#[derive(Debug, Clone)]
pub struct Created {
    pub guest: Guest,
    pub warnings: Vec<Diagnostic>,
}

/// A random MAC in vm-bhyve's range.
pub fn generate_mac() -> Result<MacAddr, CreateError> {
    let mut octets = [0u8; 6];
    let (prefix, tail) = octets.split_at_mut(MAC_PREFIX.len());
    prefix.copy_from_slice(&MAC_PREFIX);
    getrandom::fill(tail).map_err(CreateError::Random)?;
    Ok(MacAddr(octets))
}

/// Gives every NIC of `config` that has no `networkN_mac` a generated one and writes it to
/// the guest's config file (vm-bhyve does this at start), so the guest keeps its MAC from one
/// start to the next. Returns the NIC numbers that got one.
pub fn assign_missing_macs(
    guest: &Guest,
    config: &mut GuestConfig,
) -> Result<Vec<u32>, CreateError> {
    let mut assigned = Vec::new();
    let mut new_macs = Vec::new();
    for nic in config.nics.iter_mut().filter(|n| n.mac.is_none()) {
        let mac = generate_mac()?;
        nic.mac = Some(mac);
        new_macs.push((format!("network{}_mac", nic.index), mac.to_string()));
        assigned.push(nic.index);
    }
    if !new_macs.is_empty() {
        conf::update_file(&guest.conf_path(), |text| {
            new_macs.iter().try_fold(text.to_owned(), |t, (key, mac)| {
                conf::set_value(&t, key, mac)
            })
        })?;
    }
    Ok(assigned)
}

/// One disk image to make.
struct DiskPlan {
    path: PathBuf,
    size: u64,
}

/// Creates guest `name` in `stores` from the templates of `vm_dir`.
pub fn create(
    vm_dir: &Path,
    stores: &Datastores,
    name: &str,
    opts: &CreateOptions,
) -> Result<Created, CreateError> {
    datastore::validate_name(name)?;
    if let Ok(existing) = stores.find_guest(name) {
        return Err(CreateError::Exists(existing.dir));
    }
    let ds = stores.get(&opts.datastore)?;
    let template = datastore::template_path(vm_dir, &opts.template)?;
    let template_text = conf::read_capped(&template)?;
    let parsed =
        GuestConfig::from_conf(&Conf::parse(&template_text), &template).map_err(|source| {
            CreateError::Template {
                path: template.clone(),
                source,
            }
        })?;
    if parsed.config.disks.is_empty() {
        return Err(CreateError::NoDisk(template));
    }

    let guest = Guest {
        name: name.to_owned(),
        datastore: ds.name.clone(),
        dir: ds.path.join(name),
    };
    let text = guest_text(&template_text, &parsed.config, opts)?;
    let disks = plan_disks(&guest, &parsed.config, opts)?;
    // The final text must read back as a valid config (the options were checked, but
    // check what is written, not what was meant).
    GuestConfig::from_conf(&Conf::parse(&text), &guest.conf_path()).map_err(CreateError::Result)?;

    match fs::create_dir(&guest.dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(CreateError::Exists(guest.dir));
        }
        Err(e) => return Err(io_err("creating", &guest.dir)(e)),
    }
    if let Err(e) = populate(&guest, &text, &disks) {
        if let Err(cleanup) = fs::remove_dir_all(&guest.dir) {
            tracing::error!(dir = %guest.dir.display(), error = %cleanup, "removing a half-created guest failed");
        }
        return Err(e);
    }
    tracing::info!(guest = name, dir = %guest.dir.display(), "created");
    Ok(Created {
        guest,
        warnings: parsed.warnings,
    })
}

/// The guest's config text: the template with options, uuid and MACs set and sizes removed.
fn guest_text(
    template_text: &str,
    config: &GuestConfig,
    opts: &CreateOptions,
) -> Result<String, CreateError> {
    let mut text = template_text.to_owned();
    let size_keys: Vec<String> = Conf::parse(&text)
        .entries()
        .iter()
        .filter(|e| guest_config::lookup_key(&e.key).is_some_and(|(s, _)| s.key == "diskN_size"))
        .map(|e| e.key.clone())
        .collect();
    for key in size_keys {
        text = conf::remove_key(&text, &key);
    }
    if let Some(cpus) = &opts.cpus {
        guest_config::parse_cpu(cpus).map_err(|message| CreateError::BadOption {
            flag: "-c",
            message,
        })?;
        text = conf::set_value(&text, "cpu", cpus)?;
    }
    if let Some(memory) = &opts.memory {
        parse_memory(memory).map_err(|message| CreateError::BadOption {
            flag: "-m",
            message,
        })?;
        text = conf::set_value(&text, "memory", memory)?;
    }
    text = conf::set_value(&text, "uuid", &uuid::Uuid::new_v4().to_string())?;
    for nic in config.nics.iter().filter(|n| n.mac.is_none()) {
        let key = format!("network{}_mac", nic.index);
        text = conf::set_value(&text, &key, &generate_mac()?.to_string())?;
    }
    Ok(text)
}

fn plan_disks(
    guest: &Guest,
    config: &GuestConfig,
    opts: &CreateOptions,
) -> Result<Vec<DiskPlan>, CreateError> {
    let size_flag = opts
        .size
        .as_deref()
        .map(|s| {
            parse_disk_size(s).map_err(|message| CreateError::BadOption {
                flag: "-s",
                message,
            })
        })
        .transpose()?;
    let mut plans = Vec::new();
    for disk in &config.disks {
        match disk.dev {
            DiskDev::File => {}
            DiskDev::Custom if disk.index == 0 && size_flag.is_some() => {
                return Err(CreateError::SizeForCustomDisk);
            }
            DiskDev::Custom => continue,
            other => {
                return Err(CreateError::UnsupportedDisk {
                    index: disk.index,
                    dev: other.name(),
                });
            }
        }
        let size = match size_flag {
            Some(size) if disk.index == 0 => size,
            _ => disk.size.unwrap_or(DEFAULT_DISK_SIZE),
        };
        let Some(path) = disk.path(&guest.dir) else {
            continue;
        };
        plans.push(DiskPlan { path, size });
    }
    Ok(plans)
}

fn populate(guest: &Guest, text: &str, disks: &[DiskPlan]) -> Result<(), CreateError> {
    let conf_path = guest.conf_path();
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&conf_path)
        .map_err(io_err("creating", &conf_path))?;
    file.write_all(text.as_bytes())
        .map_err(io_err("writing", &conf_path))?;
    for disk in disks {
        let image = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&disk.path)
            .map_err(io_err("creating", &disk.path))?;
        // The umask can only clear bits, but say exactly what we mean.
        image
            .set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err("setting the mode of", &disk.path))?;
        image
            .set_len(disk.size)
            .map_err(io_err("sizing", &disk.path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf, Datastores) {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = dir.path().join("vm");
        datastore::init(&vm_dir).unwrap();
        let stores = Datastores::load(&vm_dir).unwrap();
        (dir, vm_dir, stores)
    }

    fn opts(template: &str) -> CreateOptions {
        CreateOptions {
            template: template.to_owned(),
            ..CreateOptions::default()
        }
    }

    #[test]
    fn create_from_seed_template_writes_config_and_sparse_disk() {
        let (_d, vm_dir, stores) = setup();
        let mut o = opts("freebsd-uefi");
        o.size = Some("8G".to_owned());
        let created = create(&vm_dir, &stores, "bsd", &o).unwrap();
        let conf = Conf::load(&created.guest.conf_path()).unwrap();
        assert_eq!(conf.get("uefi"), Some("yes"));
        assert_eq!(conf.get("disk0_size"), None);
        assert!(uuid::Uuid::parse_str(conf.get("uuid").unwrap()).is_ok());
        let mac = MacAddr::parse(conf.get("network0_mac").unwrap()).unwrap();
        assert_eq!(mac.0[..3], MAC_PREFIX);
        let meta = fs::metadata(vm_dir.join("bsd/disk0.img")).unwrap();
        assert_eq!(meta.len(), 8 << 30);
        assert_eq!(meta.blocks(), 0);
        assert_eq!(meta.mode() & 0o777, 0o600);
    }

    #[test]
    fn options_override_template_values_in_place() {
        let (_d, vm_dir, stores) = setup();
        let mut o = opts("default");
        o.cpus = Some("2".to_owned());
        o.memory = Some("1G".to_owned());
        let created = create(&vm_dir, &stores, "g", &o).unwrap();
        let conf = Conf::load(&created.guest.conf_path()).unwrap();
        assert_eq!(conf.get("cpu"), Some("2"));
        assert_eq!(conf.get("memory"), Some("1G"));
        assert_eq!(conf.entries().iter().filter(|e| e.key == "cpu").count(), 1);
        let meta = fs::metadata(vm_dir.join("g/disk0.img")).unwrap();
        assert_eq!(meta.len(), DEFAULT_DISK_SIZE);
    }

    #[test]
    fn bad_option_creates_nothing() {
        let (_d, vm_dir, stores) = setup();
        let mut o = opts("default");
        o.memory = Some("lots".to_owned());
        assert!(matches!(
            create(&vm_dir, &stores, "g", &o),
            Err(CreateError::BadOption { flag: "-m", .. })
        ));
        assert!(!vm_dir.join("g").exists());
    }

    #[test]
    fn failure_after_mkdir_removes_the_guest_dir() {
        let (_d, vm_dir, stores) = setup();
        // Two disks with one file name: the second O_EXCL create fails.
        fs::write(
            vm_dir.join(".templates/twin.conf"),
            "loader=uefi\ndisk0_type=virtio-blk\ndisk0_name=d.img\ndisk1_type=virtio-blk\ndisk1_name=d.img\n",
        )
        .unwrap();
        let err = create(&vm_dir, &stores, "twin", &opts("twin")).unwrap_err();
        assert!(
            matches!(err, CreateError::Io { op: "creating", .. }),
            "{err}"
        );
        assert!(!vm_dir.join("twin").exists());
    }

    #[test]
    fn existing_guest_is_refused() {
        let (_d, vm_dir, stores) = setup();
        create(&vm_dir, &stores, "g", &opts("default")).unwrap();
        assert!(matches!(
            create(&vm_dir, &stores, "g", &opts("default")),
            Err(CreateError::Exists(_))
        ));
    }

    #[test]
    fn stray_directory_with_the_name_is_refused_and_kept() {
        let (_d, vm_dir, stores) = setup();
        fs::create_dir(vm_dir.join("g")).unwrap();
        fs::write(vm_dir.join("g/keep"), "x").unwrap();
        assert!(matches!(
            create(&vm_dir, &stores, "g", &opts("default")),
            Err(CreateError::Exists(_))
        ));
        assert!(vm_dir.join("g/keep").exists());
    }

    #[test]
    fn template_without_disk_is_refused() {
        let (_d, vm_dir, stores) = setup();
        fs::write(
            vm_dir.join(".templates/nodisk.conf"),
            "loader=uefi\ncpu=1\n",
        )
        .unwrap();
        assert!(matches!(
            create(&vm_dir, &stores, "g", &opts("nodisk")),
            Err(CreateError::NoDisk(_))
        ));
    }

    #[test]
    fn invalid_template_is_refused_with_its_location() {
        let (_d, vm_dir, stores) = setup();
        fs::write(
            vm_dir.join(".templates/bad.conf"),
            "cpu=0\ndisk0_type=virtio-blk\ndisk0_name=d.img\n",
        )
        .unwrap();
        let err = create(&vm_dir, &stores, "g", &opts("bad")).unwrap_err();
        assert!(err.to_string().contains("bad.conf:1: cpu: "), "{err}");
        assert!(!vm_dir.join("g").exists());
    }

    #[test]
    fn existing_mac_is_kept_and_missing_ones_generated() {
        let (_d, vm_dir, stores) = setup();
        fs::write(
            vm_dir.join(".templates/two.conf"),
            "disk0_type=virtio-blk\ndisk0_name=d.img\nnetwork0_type=virtio-net\nnetwork0_mac=\"02:00:00:00:00:01\"\nnetwork1_type=virtio-net\nnetwork1_mac=\"\"\n",
        )
        .unwrap();
        let created = create(&vm_dir, &stores, "g", &opts("two")).unwrap();
        let conf = Conf::load(&created.guest.conf_path()).unwrap();
        assert_eq!(conf.get("network0_mac"), Some("02:00:00:00:00:01"));
        assert!(conf.get("network1_mac").unwrap().starts_with("58:9c:fc:"));
        assert_eq!(
            conf.entries()
                .iter()
                .filter(|e| e.key == "network1_mac")
                .count(),
            1
        );
    }

    #[test]
    fn a_guest_without_macs_gets_them_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let guest = Guest {
            name: "g".into(),
            datastore: "default".into(),
            dir: dir.path().to_owned(),
        };
        let text = "# mine\nnetwork0_type=virtio-net\nnetwork0_mac=\"02:00:00:00:00:01\"\nnetwork1_type=virtio-net\n";
        fs::write(guest.conf_path(), text).unwrap();
        let mut config = GuestConfig::load(&guest.conf_path()).unwrap().config;

        let assigned = assign_missing_macs(&guest, &mut config).unwrap();

        assert_eq!(assigned, [1]);
        let mac = config.nics[1].mac.unwrap();
        assert_eq!(mac.0[..3], MAC_PREFIX);
        let written = fs::read_to_string(guest.conf_path()).unwrap();
        assert!(written.starts_with(text), "{written}");
        assert!(
            written.ends_with(&format!("network1_mac=\"{mac}\"\n")),
            "{written}"
        );
        let mut again = GuestConfig::load(&guest.conf_path()).unwrap().config;
        assert!(assign_missing_macs(&guest, &mut again).unwrap().is_empty());
        assert_eq!(again.nics[1].mac, Some(mac));
    }

    #[test]
    fn generated_macs_differ() {
        let a = generate_mac().unwrap();
        let b = generate_mac().unwrap();
        let c = generate_mac().unwrap();
        assert!(a != b || b != c);
    }
}
