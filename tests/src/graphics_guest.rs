//! A kit guest with a graphical console, for the e2e tests and the benchmark of capvm's
//! display: under capvm (`vm start -f` with `graphics="yes"`: the runner's bochs display and
//! dev-fb's VNC server on the port the supervisor bound) or under QEMU (`-device
//! bochs-display -vnc`), and the guest shell commands that paint its `/dev/fb0`.
//!
//! The guest's framebuffer is the `bochs` DRM driver's fbdev at 32 bpp (XRGB8888: bytes B, G,
//! R, X), stride = width × 4. Painting unbinds the framebuffer console first, so nothing but
//! the test draws on the screen (no blinking cursor, no kernel messages).

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};

use crate::kit::{Action, Kit, KitCmdline};
use crate::launcher::{
    Accel, CapvmLauncher, GuestSpec, LaunchError, Launcher, Machine, QemuLauncher,
};
use crate::procfs;
use crate::testvm::TestVm;

/// How long a graphical guest may take to boot (nested under TCG it is slow).
pub const BOOT_TIMEOUT: Duration = Duration::from_mins(3);
/// How long one guest command may take.
pub const CMD_TIMEOUT: Duration = Duration::from_mins(5);

/// [`CapvmLauncher`] with `conf` appended to the guest's config.
#[derive(Debug)]
pub struct WithConf {
    pub inner: CapvmLauncher,
    pub conf: String,
}

impl Launcher for WithConf {
    fn name(&self) -> String {
        "capvm".to_owned()
    }

    fn command(&self, spec: &GuestSpec, workdir: &Path) -> Result<Command, LaunchError> {
        let command = self.inner.command(spec, workdir)?;
        let conf = guest_dir(workdir, &self.inner.name).join(format!("{}.conf", self.inner.name));
        fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut f| f.write_all(self.conf.as_bytes()))
            .map_err(|source| LaunchError::Prepare { path: conf, source })?;
        Ok(command)
    }
}

/// The guest's directory in the datastore [`CapvmLauncher`] made under `workdir`.
pub fn guest_dir(workdir: &Path, name: &str) -> PathBuf {
    workdir.join("vms").join(name)
}

/// Which VMM runs the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vmm {
    /// capvm, the guest named so in its datastore.
    Capvm(String),
    /// QEMU `-M microvm,pcie=on` on KVM with `-device bochs-display` and `-vnc` on this port.
    Qemu(u16),
}

/// One running guest with a display and a VNC server.
#[derive(Debug)]
pub struct GraphicsVm {
    vm: TestVm,
    vmm: Vmm,
    vnc: SocketAddr,
    size: (u32, u32),
}

/// The kit guest (agent, `cpus` vCPUs, `memory_mib` MiB) for a display of `_size`. Nothing
/// on its command line sets the mode (no `video=`): the guest's `bochs` driver takes the
/// EDID's preferred mode, which the VMM makes the display's size (`graphics_res` under capvm,
/// `xres`x`yres` under QEMU), so `_size` goes to the VMM ([`GraphicsVm::capvm`],
/// [`GraphicsVm::qemu`]), not here.
pub fn kit_spec(cpus: u32, memory_mib: u32, _size: (u32, u32)) -> anyhow::Result<GuestSpec> {
    let mut cmdline = KitCmdline::new(Action::Agent);
    cmdline.cpus = Some(cpus);
    let kit = Kit::locate()?;
    Ok(GuestSpec {
        kernel: kit.kernel.clone(),
        initrd: kit.initrd.clone(),
        cmdline: cmdline.render()?,
        cpus,
        memory_mib,
    })
}

/// A free VNC display number's port (5900 + N), found by binding it and letting it go: QEMU
/// binds it a moment later (a race other users of the port range could lose us, nothing more).
fn free_vnc_port() -> anyhow::Result<u16> {
    (5950..5999)
        .find(|&port| TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok())
        .context("no free port in 5950..5999 for QEMU's VNC server")
}

impl GraphicsVm {
    /// Boots `spec` under capvm with `graphics="yes"` at `size`, waits for the kit's marker and
    /// reads the VNC address from the guest's `console` file.
    pub fn capvm(name: &str, spec: &GuestSpec, size: (u32, u32)) -> anyhow::Result<GraphicsVm> {
        let launcher = WithConf {
            inner: CapvmLauncher::new(name),
            conf: format!("graphics=\"yes\"\ngraphics_res=\"{}x{}\"\n", size.0, size.1),
        };
        let vm = TestVm::start(&launcher, spec)?;
        let mut g = GraphicsVm {
            vm,
            vmm: Vmm::Capvm(name.to_owned()),
            vnc: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            size,
        };
        let booted = (|| {
            g.vm.wait_ready(BOOT_TIMEOUT)?;
            let console = fs::read_to_string(guest_dir(g.vm.workdir(), name).join("console"))
                .context("the guest's console file")?;
            g.vnc = console
                .lines()
                .find_map(|l| l.strip_prefix("vnc="))
                .context("no vnc= line in the console file")?
                .parse()?;
            Ok(())
        })();
        booted.map_err(|e| g.with_logs(&e))?;
        Ok(g)
    }

    /// Boots `spec` under QEMU on KVM (`-M microvm,pcie=on`, `-device bochs-display` at
    /// `size`, `-vnc 127.0.0.1:N`).
    pub fn qemu(spec: &GuestSpec, size: (u32, u32)) -> anyhow::Result<GraphicsVm> {
        let port = free_vnc_port()?;
        let mut launcher = QemuLauncher::new(Machine::Microvm, Accel::Kvm);
        launcher.extra = vec![
            "-machine".into(),
            "pcie=on".into(),
            "-device".into(),
            format!("bochs-display,xres={},yres={}", size.0, size.1),
            "-vnc".into(),
            format!("127.0.0.1:{}", port - 5900),
        ];
        let mut vm = TestVm::start(&launcher, spec)?;
        vm.wait_ready(BOOT_TIMEOUT)?;
        Ok(GraphicsVm {
            vm,
            vmm: Vmm::Qemu(port),
            vnc: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            size,
        })
    }

    pub fn vnc_addr(&self) -> SocketAddr {
        self.vnc
    }

    pub fn vmm(&self) -> &Vmm {
        &self.vmm
    }

    pub fn size(&self) -> (u32, u32) {
        self.size
    }

    pub fn vm(&mut self) -> &mut TestVm {
        &mut self.vm
    }

    /// Runs `command` in the guest; its trimmed output, or an error if it exited non-zero.
    pub fn run_ok(&mut self, command: &str) -> anyhow::Result<String> {
        let out = self.vm.run(command, CMD_TIMEOUT)?;
        ensure!(
            out.status == 0,
            "{command:?} exited {}: {}",
            out.status,
            out.output
        );
        Ok(out.output.trim().to_owned())
    }

    /// Waits for `/dev/fb0`, checks its mode is the VM's size and unbinds the framebuffer
    /// console so that only the test draws.
    pub fn prepare_fb(&mut self) -> anyhow::Result<()> {
        let (w, h) = self.size;
        let size = self.run_ok(
            "i=0; while [ ! -e /dev/fb0 ] && [ $i -lt 80 ]; do sleep 0.25; i=$((i+1)); done; \
             for b in /sys/class/vtconsole/vtcon*/bind; do echo 0 > $b; done 2>/dev/null; \
             cat /sys/class/graphics/fb0/virtual_size /sys/class/graphics/fb0/stride",
        )?;
        let want = format!("{w},{h}\n{}", w * 4);
        ensure!(size == want, "fb0 is {size:?}, not {want:?}");
        Ok(())
    }

    /// The process that serves VNC: dev-fb under capvm, QEMU itself.
    pub fn vnc_server_pid(&self) -> anyhow::Result<u32> {
        match &self.vmm {
            Vmm::Capvm(_) => {
                let supervisor = procfs::children_named(self.vm.pid(), "vm")
                    .first()
                    .copied()
                    .context("no vm process")?;
                let dev_fb = procfs::children_named(supervisor, "dev-fb");
                ensure!(dev_fb.len() == 1, "dev-fb processes: {dev_fb:?}");
                Ok(dev_fb.first().copied().unwrap_or_default())
            }
            Vmm::Qemu(_) => procfs::children_named(self.vm.pid(), "qemu-system-x86")
                .first()
                .copied()
                .context("no QEMU process"),
        }
    }

    /// `e` with the console and, under capvm, the guest's logs appended.
    pub fn with_logs(&self, e: &anyhow::Error) -> anyhow::Error {
        let mut text = format!("{e:#}\n--- console ---\n{}", self.vm.logs());
        if let Vmm::Capvm(name) = &self.vmm {
            let dir = guest_dir(self.vm.workdir(), name);
            for log in ["vm-bhyve.log", "vcpu-runner.log", "dev-fb.log"] {
                let body = fs::read_to_string(dir.join(log)).unwrap_or_default();
                let _ = write!(text, "\n--- {log} ---\n{body}");
            }
        }
        anyhow::anyhow!(text)
    }
}

/// An axis-aligned box of the screen, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Area {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

/// `printf` escapes of one XRGB8888 pixel of `rgb` (bytes B, G, R, 0).
fn pixel_escapes(rgb: [u8; 3]) -> String {
    let [r, g, b] = rgb;
    format!("\\{b:03o}\\{g:03o}\\{r:03o}\\000")
}

/// A guest command that writes a file `path` of `pixels` pixels of `rgb` (doubling a file of
/// one pixel: busybox has no faster way).
pub fn solid_file(path: &str, rgb: [u8; 3], pixels: u64) -> String {
    format!(
        "printf '{}' > {path}; n=1; while [ $n -lt {pixels} ]; do cat {path} {path} > {path}.t; \
         mv {path}.t {path}; n=$((n*2)); done; head -c {} {path} > {path}.t; mv {path}.t {path}",
        pixel_escapes(rgb),
        pixels * 4
    )
}

/// A guest command that fills rows `0..rows` of a `width`-pixel screen with `rgb`.
pub fn fill_rows(rgb: [u8; 3], width: u32, rows: u32) -> String {
    format!(
        "{}; cat /tmp/fill > /dev/fb0",
        solid_file("/tmp/fill", rgb, u64::from(width) * u64::from(rows))
    )
}

/// A guest command that paints `area` of a `width`-pixel screen with `rgb`, row by row.
pub fn fill_area(rgb: [u8; 3], width: u32, area: Area) -> String {
    format!(
        "{}; {}",
        solid_file("/tmp/row", rgb, u64::from(area.w)),
        copy_rows("/tmp/row", width, area)
    )
}

/// A guest command that copies file `row` (one row of `area`'s pixels) into each row of
/// `area` of a `width`-pixel screen: one `dd` a row.
pub fn copy_rows(row: &str, width: u32, area: Area) -> String {
    let stride = u64::from(width) * 4;
    format!(
        "for r in $(seq 0 {}); do dd if={row} of=/dev/fb0 bs={} count=1 \
         seek=$(( ({} + r) * {stride} + {} )) oflag=seek_bytes conv=notrunc 2>/dev/null; done",
        area.h.saturating_sub(1),
        u64::from(area.w) * 4,
        area.y,
        u64::from(area.x) * 4,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixels_are_written_blue_green_red_then_zero_in_octal() {
        assert_eq!(pixel_escapes([0x20, 0xc0, 0x60]), "\\140\\300\\040\\000");
    }

    #[test]
    fn an_area_is_painted_one_dd_per_row_at_its_byte_offset() {
        let cmd = fill_area(
            [1, 2, 3],
            1600,
            Area {
                x: 10,
                y: 20,
                w: 30,
                h: 4,
            },
        );

        assert!(cmd.contains("head -c 120 /tmp/row"), "{cmd}");
        assert!(cmd.contains("$(seq 0 3)"), "{cmd}");
        assert!(
            cmd.contains("bs=120 count=1 seek=$(( (20 + r) * 6400 + 40 ))"),
            "{cmd}"
        );
    }
}
