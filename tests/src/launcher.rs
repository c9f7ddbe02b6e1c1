//! How a test guest is started: a [`Launcher`] turns a [`GuestSpec`] into the
//! command that runs the guest in the foreground with its serial console on
//! stdin/stdout. [`QemuLauncher`] is the reference; [`CapvmLauncher`] drives
//! capvm's own `vm` command.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    /// bzImage, or (QEMU only) an uncompressed ELF vmlinux booted via PVH.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub cpus: u32,
    pub memory_mib: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot prepare {path}")]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Setup {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{what} {value:?} cannot be written to a vm-bhyve config")]
    Unquotable { what: &'static str, value: String },
}

/// Starts guests of one kind of VMM.
pub trait Launcher: fmt::Debug {
    /// A short name for reports, e.g. `qemu-microvm-kvm`.
    fn name(&self) -> String;

    /// Prepares what the VMM needs under `workdir` (a fresh directory the
    /// caller removes afterwards) and returns the command that runs the guest
    /// in the foreground, serial console on stdin/stdout.
    fn command(&self, spec: &GuestSpec, workdir: &Path) -> Result<Command, LaunchError>;
}

/// QEMU's machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// `-M microvm`: no PCI, virtio-mmio, qboot.
    Microvm,
    /// `-M q35`: `PCIe`, `SeaBIOS`; the closest to capvm's platform.
    Q35,
}

impl Machine {
    pub fn name(self) -> &'static str {
        match self {
            Machine::Microvm => "microvm",
            Machine::Q35 => "q35",
        }
    }

    /// Kernel parameters this machine needs: microvm's CMOS RTC probe spins
    /// for ~20 s in a nested guest and the kit needs no RTC.
    pub fn kernel_args(self, accel: Accel) -> Vec<&'static str> {
        let mut args = Vec::new();
        if self == Machine::Microvm {
            args.push("initcall_blacklist=cmos_init");
            if accel == Accel::Tcg {
                // microvm has no PIT/HPET calibration source under TCG.
                args.push("tsc_early_khz=2000000");
            }
        }
        args
    }
}

/// QEMU's accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Debian's `qemu-system-x86_64`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuLauncher {
    pub machine: Machine,
    pub accel: Accel,
    pub qemu: PathBuf,
    /// Further arguments (devices), appended as given.
    pub extra: Vec<String>,
}

impl QemuLauncher {
    pub fn new(machine: Machine, accel: Accel) -> QemuLauncher {
        QemuLauncher {
            machine,
            accel,
            qemu: "qemu-system-x86_64".into(),
            extra: Vec::new(),
        }
    }

    /// The arguments for `spec`, without the program.
    pub fn args(&self, spec: &GuestSpec) -> Vec<String> {
        let (accel, cpu) = match self.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", "max"),
        };
        let mut cmdline = spec.cmdline.clone();
        for arg in self.machine.kernel_args(self.accel) {
            cmdline.push(' ');
            cmdline.push_str(arg);
        }
        let mut args: Vec<String> = [
            "-accel",
            accel,
            "-cpu",
            cpu,
            "-M",
            self.machine.name(),
            "-smp",
            &spec.cpus.to_string(),
            "-m",
            &spec.memory_mib.to_string(),
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            "stdio",
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        args.extend(["-kernel".to_owned(), spec.kernel.display().to_string()]);
        args.extend(["-initrd".to_owned(), spec.initrd.display().to_string()]);
        args.extend(["-append".to_owned(), cmdline]);
        args.extend(self.extra.iter().cloned());
        args
    }
}

impl Launcher for QemuLauncher {
    fn name(&self) -> String {
        let accel = match self.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        };
        format!("qemu-{}-{accel}", self.machine.name())
    }

    fn command(&self, spec: &GuestSpec, _workdir: &Path) -> Result<Command, LaunchError> {
        let mut command = Command::new(&self.qemu);
        command.args(self.args(spec));
        Ok(command)
    }
}

/// capvm's `vm` command, against a datastore of its own under the workdir: `vm init`, a
/// vm-bhyve `NAME.conf` with `loader="linux"`, then `vm start -f NAME` with the console on
/// stdio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapvmLauncher {
    /// The `vm` binary (default: from `CAPVM_LIBEXEC` or `PATH`).
    pub vm: PathBuf,
    /// The guest's name in the datastore.
    pub name: String,
}

impl CapvmLauncher {
    pub fn new(name: &str) -> CapvmLauncher {
        let vm = std::env::var_os("CAPVM_LIBEXEC")
            .map_or_else(|| PathBuf::from("vm"), |d| Path::new(&d).join("vm"));
        CapvmLauncher {
            vm,
            name: name.to_owned(),
        }
    }

    /// The guest's `NAME.conf`.
    pub fn guest_conf(spec: &GuestSpec) -> Result<String, LaunchError> {
        let quoted = |what, value: String| {
            if value.contains(['"', '\\', '$', '`', '\n']) {
                Err(LaunchError::Unquotable { what, value })
            } else {
                Ok(value)
            }
        };
        Ok(format!(
            "loader=\"linux\"\nlinux_kernel=\"{}\"\nlinux_initrd=\"{}\"\nlinux_cmdline=\"{}\"\ncpu=\"{}\"\nmemory=\"{}M\"\n",
            quoted("kernel path", spec.kernel.display().to_string())?,
            quoted("initrd path", spec.initrd.display().to_string())?,
            quoted("command line", spec.cmdline.clone())?,
            spec.cpus,
            spec.memory_mib,
        ))
    }

    /// A `vm` command against the datastore under `workdir` (as [`Launcher::command`] set it up).
    pub fn vm_command(&self, workdir: &Path) -> Command {
        let mut command = Command::new(&self.vm);
        command
            .env("VM_DIR", workdir.join("vms"))
            .env("CAPVM_CONF", workdir.join("vm.conf"));
        command
    }

    /// Makes an empty datastore under `workdir` (`vm.conf` naming `workdir/vms`) and runs
    /// `vm init` on it.
    pub fn init(&self, workdir: &Path) -> Result<(), LaunchError> {
        let vms = workdir.join("vms");
        std::fs::create_dir_all(&vms).map_err(|source| LaunchError::Prepare {
            path: vms.clone(),
            source,
        })?;
        let conf = workdir.join("vm.conf");
        std::fs::write(&conf, format!("vm_dir=\"{}\"\n", vms.display()))
            .map_err(|source| LaunchError::Prepare { path: conf, source })?;
        let out = self
            .vm_command(workdir)
            .arg("init")
            .output()
            .map_err(|source| LaunchError::Spawn {
                program: self.vm.display().to_string(),
                source,
            })?;
        if !out.status.success() {
            return Err(LaunchError::Setup {
                command: format!("{} init", self.vm.display()),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(())
    }
}

impl Launcher for CapvmLauncher {
    fn name(&self) -> String {
        "capvm".to_owned()
    }

    fn command(&self, spec: &GuestSpec, workdir: &Path) -> Result<Command, LaunchError> {
        self.init(workdir)?;
        let vms = workdir.join("vms");
        let write = |path: PathBuf, text: String| {
            std::fs::write(&path, text).map_err(|source| LaunchError::Prepare { path, source })
        };
        let dir = vms.join(&self.name);
        std::fs::create_dir_all(&dir).map_err(|source| LaunchError::Prepare {
            path: dir.clone(),
            source,
        })?;
        write(
            dir.join(format!("{}.conf", self.name)),
            CapvmLauncher::guest_conf(spec)?,
        )?;
        let mut command = self.vm_command(workdir);
        command.args(["start", "-f", &self.name]);
        Ok(command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GuestSpec {
        GuestSpec {
            kernel: "/k/vmlinuz".into(),
            initrd: "/k/kit.cpio".into(),
            cmdline: "console=ttyS0 capvm.action=poweroff".into(),
            cpus: 2,
            memory_mib: 256,
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    }

    #[test]
    fn microvm_under_kvm_gets_kvm_host_cpu_and_the_rtc_blacklist() {
        let args = QemuLauncher::new(Machine::Microvm, Accel::Kvm).args(&spec());

        assert_eq!(after(&args, "-accel"), Some("kvm"));
        assert_eq!(after(&args, "-cpu"), Some("host"));
        assert_eq!(after(&args, "-M"), Some("microvm"));
        assert_eq!(after(&args, "-smp"), Some("2"));
        assert_eq!(after(&args, "-serial"), Some("stdio"));
        assert_eq!(
            after(&args, "-append"),
            Some("console=ttyS0 capvm.action=poweroff initcall_blacklist=cmos_init")
        );
        assert!(
            args.contains(&"-nodefaults".to_owned()) && args.contains(&"-no-reboot".to_owned())
        );
    }

    #[test]
    fn q35_keeps_the_command_line_and_appends_extra_devices() {
        let mut launcher = QemuLauncher::new(Machine::Q35, Accel::Tcg);
        launcher.extra = vec!["-device".into(), "virtio-rng-pci".into()];

        let args = launcher.args(&spec());

        assert_eq!(
            after(&args, "-append"),
            Some("console=ttyS0 capvm.action=poweroff")
        );
        assert_eq!(after(&args, "-cpu"), Some("max"));
        assert_eq!(args.last().map(String::as_str), Some("virtio-rng-pci"));
        assert_eq!(launcher.name(), "qemu-q35-tcg");
    }

    #[test]
    fn guest_conf_is_vm_bhyve_style() {
        let conf = CapvmLauncher::guest_conf(&spec()).expect("conf");

        assert_eq!(
            conf,
            "loader=\"linux\"\nlinux_kernel=\"/k/vmlinuz\"\nlinux_initrd=\"/k/kit.cpio\"\n\
             linux_cmdline=\"console=ttyS0 capvm.action=poweroff\"\ncpu=\"2\"\nmemory=\"256M\"\n"
        );
    }

    #[test]
    fn guest_conf_refuses_values_that_break_the_quoting() {
        let mut bad = spec();
        bad.cmdline = "x=\"$(reboot)\"".into();

        assert!(matches!(
            CapvmLauncher::guest_conf(&bad),
            Err(LaunchError::Unquotable { .. })
        ));
    }
}
