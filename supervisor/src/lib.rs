//! The `vm` command's library: capvm's datastore side, compatible with vm-bhyve.
//!
//! What it does: reads host settings (`/etc/vm.conf`) and vm-bhyve-format configs, lays out
//! datastores (`vm init`), creates, lists, describes, renames and destroys guests, and lists or
//! downloads install media.
//!
//! What it trusts: nothing in config files, templates or directory listings: every config is
//! read by a parser that cannot fail on content ([`conf`]), every value is checked
//! ([`guest_config`]), and every name is validated before it becomes a path component
//! ([`datastore::validate_name`]). Errors name file, line and key; nothing panics on input.
//!
//! What it may touch: `vm_dir` and the datastore directories listed in its `system.conf`,
//! the host config file (read only), and guest run locks (`GUEST_DIR/run.lock`, [`state`]).
//! It runs `$EDITOR` for `vm configure`, and reaches the network only for `vm iso`/`vm img`.
//!
//! Each module of the datastore side forbids `unsafe`; the signal handling of [`fetch`] and
//! the child start-up code of the supervisor fence theirs.

pub mod cli;
pub mod commands;
pub mod conf;
pub mod configure;
pub mod create;
pub mod datastore;
pub mod destroy;
pub mod fetch;
pub mod guest_config;
pub mod host_config;
pub mod info;
pub mod list;
pub mod media;
pub mod rename;
pub mod spawn;
pub mod state;
pub mod table;
