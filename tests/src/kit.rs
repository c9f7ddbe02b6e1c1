//! The guest kit: where its files are, and the command line its `/init` obeys.
//!
//! `tests/kit/build.sh` builds the kit (cached by a hash of its inputs) and
//! prints its directory; [`Kit::locate`] runs it, or takes `CAPVM_KIT_DIR`
//! when a caller (the test host) already resolved it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;

/// The kernel's limit for the x86 command line (`COMMAND_LINE_SIZE`), less
/// the terminating NUL.
pub const CMDLINE_MAX: usize = 2047;

/// Kernel parameters every kit guest gets: console on the first UART, quiet
/// (each console byte is a VM exit, costly when nested), no AMD GART aperture
/// scan (seconds of PCI config reads when nested), no zeroing on allocation.
pub const BASE_ARGS: &[&str] = &[
    "console=ttyS0",
    "quiet",
    "iommu=noaperture",
    "init_on_alloc=0",
    "panic=-1",
];

#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("cannot run {script}")]
    Spawn {
        script: PathBuf,
        source: std::io::Error,
    },
    #[error("{script} failed ({status}): {stderr}")]
    Build {
        script: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} has no {key}")]
    MissingKey { path: PathBuf, key: &'static str },
    #[error("kit file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("kernel command line is {len} bytes, over the limit of {CMDLINE_MAX}")]
    CmdlineTooLong { len: usize },
    #[error("{what} {value:?} would split the kernel command line")]
    Unquotable { what: &'static str, value: String },
}

/// The files of one kit build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kit {
    pub dir: PathBuf,
    /// The input hash the build is keyed by.
    pub key: String,
    /// The Debian bzImage.
    pub kernel: PathBuf,
    /// The same kernel, uncompressed ELF (PVH boot; skips decompression).
    pub vmlinux: PathBuf,
    /// The guest kit's initramfs.
    pub initrd: PathBuf,
    /// The test host's initramfs.
    pub testhost_initrd: PathBuf,
    pub kernel_release: String,
    pub kernel_package: String,
}

/// What running `build.sh` took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub kit: Kit,
    pub elapsed: Duration,
    /// Whether the script reported a cache hit.
    pub cached: bool,
}

/// The `tests/` directory of this checkout.
pub fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/kit/build.sh`.
pub fn build_script() -> PathBuf {
    tests_dir().join("kit").join("build.sh")
}

impl Kit {
    /// `CAPVM_KIT_DIR` if set, else the result of `build.sh`.
    pub fn locate() -> Result<Kit, KitError> {
        match std::env::var_os("CAPVM_KIT_DIR") {
            Some(dir) => Kit::from_dir(Path::new(&dir)),
            None => Kit::build().map(|l| l.kit),
        }
    }

    /// Runs `build.sh` (builds or reuses the cached kit).
    pub fn build() -> Result<Located, KitError> {
        let script = build_script();
        let start = Instant::now();
        let out = Command::new(&script)
            .output()
            .map_err(|source| KitError::Spawn {
                script: script.clone(),
                source,
            })?;
        let elapsed = start.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(KitError::Build {
                script,
                status: out.status,
                stderr,
            });
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = stdout.lines().last().unwrap_or_default().trim();
        let kit = Kit::from_dir(Path::new(dir))?;
        Ok(Located {
            kit,
            elapsed,
            cached: stderr.contains("kit: cached"),
        })
    }

    /// Reads `DIR/kit.env` and checks that the files it names exist.
    pub fn from_dir(dir: &Path) -> Result<Kit, KitError> {
        let path = dir.join("kit.env");
        let text = std::fs::read_to_string(&path).map_err(|source| KitError::Read {
            path: path.clone(),
            source,
        })?;
        let kit = Kit::parse_env(&text, &path)?;
        for file in [&kit.kernel, &kit.vmlinux, &kit.initrd, &kit.testhost_initrd] {
            if !file.is_file() {
                return Err(KitError::MissingFile(file.clone()));
            }
        }
        Ok(kit)
    }

    /// Parses `kit.env` (`KEY=VALUE` lines); `path` names it in errors.
    pub fn parse_env(text: &str, path: &Path) -> Result<Kit, KitError> {
        let get = |key: &'static str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .map(str::to_owned)
                .ok_or_else(|| KitError::MissingKey {
                    path: path.to_owned(),
                    key,
                })
        };
        Ok(Kit {
            dir: get("KIT_DIR")?.into(),
            key: get("KIT_KEY")?,
            kernel: get("KIT_KERNEL")?.into(),
            vmlinux: get("KIT_VMLINUX")?.into(),
            initrd: get("KIT_INITRD")?.into(),
            testhost_initrd: get("KIT_TESTHOST_INITRD")?.into(),
            kernel_release: get("KIT_KERNEL_RELEASE")?,
            kernel_package: get("KIT_KERNEL_PACKAGE")?,
        })
    }
}

/// What the kit's `/init` does once ready (`capvm.action`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Power off right away.
    Poweroff,
    /// Interactive shell on the console.
    Shell,
    /// Run a shell command, print `CAPVM-KIT: exit <status>`.
    Run(String),
    /// Run the named built-in checks (`kit-test`).
    Test(Vec<String>),
    /// Read commands from the console ([`crate::testvm::TestVm::run`]).
    Agent,
}

/// What follows a `Run` or `Test` action (`capvm.then`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    Poweroff,
    Reboot,
    Halt,
    Shell,
}

/// A kit guest's kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KitCmdline {
    pub action: Action,
    pub then: Option<Then>,
    /// Expected CPU count for `kit-test cpus` (`capvm.cpus`).
    pub cpus: Option<u32>,
    /// Further parameters, appended as given.
    pub extra: Vec<String>,
}

/// The kit with its agent (`capvm.action=agent`) on `cpus` vCPUs with `memory_mib` of RAM:
/// the guest most e2e tests drive.
pub fn agent_guest(cpus: u32, memory_mib: u32) -> Result<crate::launcher::GuestSpec, KitError> {
    let mut cmdline = KitCmdline::new(Action::Agent);
    cmdline.cpus = Some(cpus);
    let kit = Kit::locate()?;
    Ok(crate::launcher::GuestSpec {
        kernel: kit.kernel.clone(),
        initrd: kit.initrd.clone(),
        cmdline: cmdline.render()?,
        cpus,
        memory_mib,
    })
}

impl KitCmdline {
    pub fn new(action: Action) -> KitCmdline {
        KitCmdline {
            action,
            then: None,
            cpus: None,
            extra: Vec::new(),
        }
    }

    /// The command line: [`BASE_ARGS`], the `capvm.*` parameters, `extra`.
    pub fn render(&self) -> Result<String, KitError> {
        let mut args: Vec<String> = BASE_ARGS.iter().map(|a| (*a).to_owned()).collect();
        let action = match &self.action {
            Action::Poweroff => "poweroff",
            Action::Shell => "shell",
            Action::Run(_) => "run",
            Action::Test(_) => "test",
            Action::Agent => "agent",
        };
        args.push(format!("capvm.action={action}"));
        match &self.action {
            Action::Run(cmd) => {
                args.push(format!(
                    "capvm.run={}",
                    base64::engine::general_purpose::STANDARD.encode(cmd)
                ));
            }
            Action::Test(names) => {
                for name in names {
                    if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == ',') {
                        return Err(KitError::Unquotable {
                            what: "test name",
                            value: name.clone(),
                        });
                    }
                }
                args.push(format!("capvm.test={}", names.join(",")));
            }
            Action::Poweroff | Action::Shell | Action::Agent => {}
        }
        if let Some(then) = self.then {
            let then = match then {
                Then::Poweroff => "poweroff",
                Then::Reboot => "reboot",
                Then::Halt => "halt",
                Then::Shell => "shell",
            };
            args.push(format!("capvm.then={then}"));
        }
        if let Some(cpus) = self.cpus {
            args.push(format!("capvm.cpus={cpus}"));
        }
        for extra in &self.extra {
            if extra.is_empty() || extra.contains(char::is_whitespace) {
                return Err(KitError::Unquotable {
                    what: "parameter",
                    value: extra.clone(),
                });
            }
            args.push(extra.clone());
        }
        let line = args.join(" ");
        if line.len() > CMDLINE_MAX {
            return Err(KitError::CmdlineTooLong { len: line.len() });
        }
        Ok(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::process::Stdio;

    fn decode_run(line: &str) -> String {
        let b64 = line
            .split(' ')
            .find_map(|a| a.strip_prefix("capvm.run="))
            .expect("capvm.run present");
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("base64"),
        )
        .expect("utf8")
    }

    #[test]
    fn run_action_encodes_the_command_as_one_base64_word() {
        let cmd = "grep -c ^processor /proc/cpuinfo; echo 'a  b' \"$x\"";
        let mut cmdline = KitCmdline::new(Action::Run(cmd.into()));
        cmdline.cpus = Some(2);

        let line = cmdline.render().expect("renders");

        assert!(line.starts_with("console=ttyS0 quiet "), "{line}");
        assert!(line.contains(" capvm.action=run "), "{line}");
        assert!(line.ends_with(" capvm.cpus=2"), "{line}");
        assert_eq!(decode_run(&line), cmd);
    }

    #[test]
    fn test_action_joins_names_with_commas() {
        let mut cmdline = KitCmdline::new(Action::Test(vec!["cpus".into(), "virtio".into()]));
        cmdline.then = Some(Then::Reboot);

        let line = cmdline.render().expect("renders");

        assert!(
            line.contains(" capvm.action=test capvm.test=cpus,virtio capvm.then=reboot"),
            "{line}"
        );
    }

    #[test]
    fn names_or_parameters_with_spaces_are_rejected() {
        let bad_name = KitCmdline::new(Action::Test(vec!["a b".into()]));
        let mut bad_extra = KitCmdline::new(Action::Agent);
        bad_extra.extra.push("x=1 y=2".into());

        assert!(matches!(
            bad_name.render(),
            Err(KitError::Unquotable { .. })
        ));
        assert!(matches!(
            bad_extra.render(),
            Err(KitError::Unquotable { .. })
        ));
    }

    #[test]
    fn command_over_the_kernel_limit_is_rejected() {
        let cmdline = KitCmdline::new(Action::Run("x".repeat(1600)));

        assert!(matches!(
            cmdline.render(),
            Err(KitError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn kit_env_parses_and_names_a_missing_key() {
        let text = "KIT_DIR=/c/k\nKIT_KEY=ab\nKIT_KERNEL=/c/k/vmlinuz\nKIT_VMLINUX=/c/k/vmlinux\n\
                    KIT_INITRD=/c/k/kit.cpio\nKIT_TESTHOST_INITRD=/c/k/testhost.cpio\n\
                    KIT_KERNEL_RELEASE=6.1.0-56-amd64\nKIT_KERNEL_PACKAGE=linux-image-6.1.0-56-amd64=6.1.192-2\n";
        let path = Path::new("/c/k/kit.env");

        let kit = Kit::parse_env(text, path).expect("parses");
        let missing = Kit::parse_env(&text.replace("KIT_VMLINUX", "X"), path);

        assert_eq!(kit.vmlinux, PathBuf::from("/c/k/vmlinux"));
        assert_eq!(kit.kernel_release, "6.1.0-56-amd64");
        assert!(matches!(
            missing,
            Err(KitError::MissingKey {
                key: "KIT_VMLINUX",
                ..
            })
        ));
    }

    fn load_order(input: &str) -> (bool, Vec<String>) {
        let mut child = Command::new(build_script())
            .arg("--load-order")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("build.sh runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("wait");
        let order = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        (out.status.success(), order)
    }

    fn position(order: &[String], name: &str) -> usize {
        order
            .iter()
            .position(|m| m == name)
            .unwrap_or_else(|| panic!("{name} missing from {order:?}"))
    }

    #[test]
    fn load_order_puts_every_module_after_its_dependencies() {
        // What modinfo reports for Debian 6.1: depmod's lists are not in load
        // order (llc before stp before bridge, virtio_ring before virtio).
        let deps = "bridge llc,stp\nstp llc\nllc\nvirtio_pci virtio_ring,virtio_pci_modern_dev,virtio_pci_legacy_dev,virtio\n\
                    virtio_ring\nvirtio\nvirtio_pci_modern_dev\nvirtio_pci_legacy_dev\nbochs drm_kms_helper,drm,drm_vram_helper,drm_ttm_helper\n\
                    drm_kms_helper drm\ndrm\ndrm_vram_helper drm,drm_kms_helper,drm_ttm_helper,ttm\ndrm_ttm_helper ttm,drm\nttm drm\n";

        let (ok, order) = load_order(deps);

        assert!(ok);
        assert_eq!(order.len(), 14, "{order:?}");
        for line in deps.lines() {
            let mut parts = line.split(' ');
            let module = parts.next().expect("name");
            for dep in parts
                .next()
                .unwrap_or_default()
                .split(',')
                .filter(|d| !d.is_empty())
            {
                assert!(
                    position(&order, dep) < position(&order, module),
                    "{dep} after {module} in {order:?}"
                );
            }
        }
    }

    #[test]
    fn load_order_rejects_a_dependency_loop() {
        let (ok, _) = load_order("a b\nb a\n");

        assert!(!ok);
    }
}
