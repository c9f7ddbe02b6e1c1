//! Host settings: `/etc/vm.conf` (`vm_dir`, `vm_list`, `vm_delay`), the rc.conf settings of
//! vm-bhyve, in the same sh-style format.
//!
//! The file's path can be changed with `CAPVM_CONF` (tests never touch `/etc`); `vm_dir` is
//! overridden by `VM_DIR`, which is overridden by `--vm-dir`. A missing file is no error as
//! long as `vm_dir` comes from somewhere.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use crate::conf::Diagnostic;
use crate::conf::{Conf, ConfError};

/// The host config file.
pub const DEFAULT_CONF_PATH: &str = "/etc/vm.conf";
/// Environment variable that replaces [`DEFAULT_CONF_PATH`].
pub const CONF_ENV: &str = "CAPVM_CONF";
/// Environment variable that overrides `vm_dir`.
pub const VM_DIR_ENV: &str = "VM_DIR";
/// vm-bhyve's delay between guests started by `startall`, in seconds.
pub const DEFAULT_VM_DELAY: u32 = 2;

/// Why the host settings could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HostConfigError {
    #[error(transparent)]
    Read(#[from] ConfError),
    #[error("vm_dir is not set: set it in {conf}, or use VM_DIR or --vm-dir")]
    NoVmDir { conf: PathBuf },
    #[error("vm_dir {0}: ZFS datastores are not supported")]
    Zfs(String),
    #[error("vm_dir {0} is not an absolute path")]
    RelativeVmDir(PathBuf),
    #[error("{0}")]
    Value(Diagnostic),
}

/// Host settings in effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// The default datastore.
    pub vm_dir: PathBuf,
    /// Guests started at boot, in order.
    pub vm_list: Vec<String>,
    /// Seconds between guests started at boot.
    pub vm_delay: u32,
}

impl HostConfig {
    /// Loads the settings from the file named by `CAPVM_CONF` (or `/etc/vm.conf`), with
    /// `VM_DIR` and then `vm_dir_flag` overriding `vm_dir`.
    pub fn load(vm_dir_flag: Option<&Path>) -> Result<Self, HostConfigError> {
        let conf_path = std::env::var_os(CONF_ENV)
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_CONF_PATH), PathBuf::from);
        let env_dir = std::env::var_os(VM_DIR_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let conf = Conf::load_if_exists(&conf_path)?;
        let vm_dir = vm_dir_flag.map(Path::to_owned).or(env_dir);
        HostConfig::from_conf(&conf, &conf_path, vm_dir)
    }

    /// Builds the settings from a parsed `conf` (read from `conf_path`) and an overriding
    /// `vm_dir`.
    pub fn from_conf(
        conf: &Conf,
        conf_path: &Path,
        vm_dir_override: Option<PathBuf>,
    ) -> Result<Self, HostConfigError> {
        let vm_dir = match vm_dir_override {
            Some(dir) => dir,
            None => conf
                .get("vm_dir")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .ok_or_else(|| HostConfigError::NoVmDir {
                    conf: conf_path.to_owned(),
                })?,
        };
        let text = vm_dir.to_string_lossy();
        if text.starts_with("zfs:") {
            return Err(HostConfigError::Zfs(text.into_owned()));
        }
        if !vm_dir.is_absolute() {
            return Err(HostConfigError::RelativeVmDir(vm_dir));
        }
        let vm_delay = match conf.entry("vm_delay").filter(|e| !e.value.is_empty()) {
            None => DEFAULT_VM_DELAY,
            Some(e) => e.value.parse().map_err(|_| {
                HostConfigError::Value(Diagnostic {
                    file: conf_path.to_owned(),
                    line: e.line,
                    key: e.key.clone(),
                    message: format!("{:?} is not a number of seconds", e.value),
                })
            })?,
        };
        let vm_list = conf
            .get("vm_list")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        Ok(HostConfig {
            vm_dir,
            vm_list,
            vm_delay,
        })
    }

    /// The 1-based position of `name` in `vm_list` (vm-bhyve's `Yes [n]`); the first match.
    pub fn autostart_position(&self, name: &str) -> Option<usize> {
        self.vm_list
            .iter()
            .position(|n| n == name)
            .map(|i| i.saturating_add(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(text: &str, over: Option<&str>) -> Result<HostConfig, HostConfigError> {
        HostConfig::from_conf(
            &Conf::parse(text),
            Path::new("/etc/vm.conf"),
            over.map(PathBuf::from),
        )
    }

    #[test]
    fn settings_are_read_from_rc_style_text() {
        let h = host(
            "vm_enable=\"YES\"\nvm_dir=\"/vm\"\nvm_list=\"a  b\"\nvm_delay=\"5\"\n",
            None,
        )
        .unwrap();
        assert_eq!(h.vm_dir, PathBuf::from("/vm"));
        assert_eq!(h.vm_list, vec!["a", "b"]);
        assert_eq!(h.vm_delay, 5);
        assert_eq!(h.autostart_position("b"), Some(2));
        assert_eq!(h.autostart_position("c"), None);
    }

    #[test]
    fn override_wins_over_file() {
        let h = host("vm_dir=/vm\n", Some("/other")).unwrap();
        assert_eq!(h.vm_dir, PathBuf::from("/other"));
    }

    #[test]
    fn missing_vm_dir_is_an_error() {
        assert!(matches!(
            host("", None),
            Err(HostConfigError::NoVmDir { .. })
        ));
    }

    #[test]
    fn zfs_vm_dir_is_refused_clearly() {
        let err = host("vm_dir=\"zfs:pool/vm\"\n", None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "vm_dir zfs:pool/vm: ZFS datastores are not supported"
        );
    }

    #[test]
    fn relative_vm_dir_is_refused() {
        assert!(matches!(
            host("vm_dir=vms\n", None),
            Err(HostConfigError::RelativeVmDir(_))
        ));
    }

    #[test]
    fn bad_delay_names_file_line_and_key() {
        let err = host("vm_dir=/vm\n\nvm_delay=soon\n", None).unwrap_err();
        assert!(
            err.to_string().starts_with("/etc/vm.conf:3: vm_delay: "),
            "{err}"
        );
    }

    #[test]
    fn defaults_apply_when_unset() {
        let h = host("vm_dir=/vm\n", None).unwrap();
        assert_eq!(h.vm_delay, DEFAULT_VM_DELAY);
        assert!(h.vm_list.is_empty());
    }
}
