#![forbid(unsafe_code)]

//! capvm's end-to-end test support: real, unmodified Linux guests.
//!
//! - [`kit`]: the guest kit (a Debian kernel + busybox initramfs built by
//!   `tests/kit/build.sh`) and the kernel command line its `/init` obeys.
//! - [`marker`]: the `CAPVM-KIT:` lines the kit prints on its console.
//! - [`launcher`]: how a guest is started (QEMU now, capvm's `vm` next).
//! - [`testvm`]: the [`testvm::TestVm`] fixture: start, wait for a console
//!   line, run a guest command, stop, keep the console log for failures.
//! - [`testhost`]: where a guest can run: directly on `/dev/kvm`, or inside
//!   the emulated test host (`tests/testhost.sh`) on machines whose KVM cannot
//!   run ordinary guests (PVM).
//! - [`virtio_driver`]: a split-ring driver playing the guest for device-process tests.
//! - [`netns`]: network namespaces for tests that put guests on a switch, and a launcher
//!   that starts a guest inside one.
//! - [`graphics_guest`]: a kit guest with a display and VNC (capvm or QEMU) and the
//!   commands that paint its `/dev/fb0`.
//! - [`real_vnc`]: VNC clients not written by us (vncdotool, `TigerVNC` under Xvfb).
//! - [`procfs`]: capvm's processes as `/proc` shows them (children, sandbox).
//! - [`harness`]: the runner of the e2e test binaries (skips are reported as
//!   skips, tests that need KVM move into the test host where needed).
//!
//! Trusts: the kit's files and the scripts under `tests/`. May touch: its
//! cache (`$CAPVM_CACHE`, default `/var/cache/capvm`), temporary directories,
//! child processes it starts (QEMU, `vm`, the test host), `/dev/kvm`.

pub mod bench;
pub mod console;
pub mod graphics_guest;
pub mod harness;
pub mod kit;
pub mod launcher;
pub mod marker;
pub mod netns;
pub mod pictures;
pub mod procfs;
pub mod real_vnc;
pub mod rfb_client;
pub mod testhost;
pub mod testvm;
pub mod virtio_driver;
