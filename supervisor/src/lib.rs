//! The `vm` command's library: capvm's datastore side, compatible with vm-bhyve, and the
//! per-VM supervisor.
//!
//! What it does: reads host settings (`/etc/vm.conf`) and vm-bhyve-format configs, lays out
//! datastores (`vm init`), creates, lists, describes, renames and destroys guests, manages
//! virtual switches ([`switch`], applied through a sandboxed netcfg, [`netcfg_client`]), and
//! lists or downloads install media. It starts guests ([`lifecycle`]: `vm start` checks the guest with
//! [`preflight`], then runs the per-VM supervisor [`monitor`] detached as `vm _run NAME`) and
//! talks to running ones over their control socket ([`control_socket`]): `vm stop`,
//! `restart`, `reset`, `poweroff`, `console` ([`console`]), `info`, `startall`, `stopall`.
//!
//! What it trusts: nothing in config files, templates or directory listings: every config is
//! read by a parser that cannot fail on content ([`conf`]), every value is checked
//! ([`guest_config`]), and every name is validated before it becomes a path component
//! ([`datastore::validate_name`]). Errors name file, line and key; nothing panics on input.
//! The supervisor never parses guest data; what its sandboxed vcpu-runner sends is validated
//! as hostile ([`proto::runner::FromRunner::validate`]).
//!
//! What it may touch: `vm_dir` and the datastore directories listed in its `system.conf`,
//! the host config file (read only), and in each guest directory its run lock
//! (`run.lock`, [`state`]), `run/control.sock`, `vm-bhyve.log` and `vcpu-runner.log`. The
//! supervisor opens `/dev/kvm`, the guest's kernel and initrd, and creates the guest RAM
//! memfd, and hands them to the vcpu-runner it starts ([`spawn`]). It runs `$EDITOR` for
//! `vm configure`, and reaches the network only for `vm iso`/`vm img`.
//!
//! The datastore modules forbid `unsafe`; the signal handling of [`fetch`], the child start-up
//! code ([`spawn`]), the pidfd of [`monitor::runner`], `localtime_r` in [`vmlog`] and the
//! session of `vm _run` in [`lifecycle`] fence theirs.

pub mod cli;
pub mod commands;
pub mod conf;
pub mod configure;
pub mod console;
pub mod control_socket;
pub mod create;
pub mod datastore;
pub mod destroy;
pub mod fetch;
pub mod graphics;
pub mod guest_config;
pub mod host_config;
pub mod info;
pub mod lifecycle;
pub mod list;
pub mod media;
pub mod memfd;
pub mod monitor;
pub mod netcfg_client;
pub mod preflight;
pub mod rename;
pub mod ring;
pub mod spawn;
pub mod state;
pub mod switch;
pub mod table;
pub mod vmlog;
