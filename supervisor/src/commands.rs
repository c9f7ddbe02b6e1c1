//! Runs a parsed `vm` command against the datastores, writing to the given streams.

#![forbid(unsafe_code)]

use std::io::{self, BufRead, Write};
use std::path::Path;

use crate::cli::{Cli, Command, DatastoreCommand, SwitchCommand};
use crate::configure::{self, ConfigureError};
use crate::create::{self, CreateError, CreateOptions};
use crate::datastore::{self, DatastoreError, Datastores};
use crate::destroy::{self, DestroyError};
use crate::guest_config::{GuestConfig, GuestConfigError};
use crate::host_config::{HostConfig, HostConfigError};
use crate::info;
use crate::lifecycle::{self, Force, LifecycleError};
use crate::list;
use crate::media::{self, MediaError, MediaKind};
use crate::rename::{self, RenameError};
use crate::state::{self, RunState, StateError};
use crate::switch::{self, SwitchError};

/// `vm version` output.
pub const VERSION_LINE: &str = concat!(
    "capvm: capability-sandboxed virtual machine management v",
    env!("CARGO_PKG_VERSION")
);

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    HostConfig(#[from] HostConfigError),
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    #[error(transparent)]
    Create(#[from] CreateError),
    #[error(transparent)]
    Media(#[from] MediaError),
    #[error(transparent)]
    Configure(#[from] ConfigureError),
    #[error(transparent)]
    GuestConfig(#[from] GuestConfigError),
    #[error(transparent)]
    Rename(#[from] RenameError),
    #[error(transparent)]
    Destroy(#[from] DestroyError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error(transparent)]
    Console(#[from] crate::console::ConsoleError),
    #[error(transparent)]
    Switch(#[from] SwitchError),
    #[error("writing output failed")]
    Output(#[from] io::Error),
    #[error("encoding JSON failed")]
    Json(#[from] serde_json::Error),
}

/// The streams a command uses.
pub struct Streams<'a> {
    pub out: &'a mut dyn Write,
    pub err: &'a mut dyn Write,
    /// Answers to questions (`vm destroy`).
    pub input: &'a mut dyn BufRead,
}

impl std::fmt::Debug for Streams<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Streams")
    }
}

impl Streams<'_> {
    fn warn(&mut self, what: &dyn std::fmt::Display) -> io::Result<()> {
        writeln!(self.err, "vm: WARNING: {what}")
    }

    fn error(&mut self, what: &dyn std::fmt::Display) -> io::Result<()> {
        writeln!(self.err, "vm: ERROR: {what}")
    }
}

/// Runs `cli`. `Ok(false)`: the command ran but reported problems on `err` (a guest config
/// with errors, say), and `vm` should exit non-zero.
pub fn run(cli: &Cli, io: &mut Streams<'_>) -> Result<bool, CommandError> {
    if let Command::Version = cli.command {
        writeln!(io.out, "{VERSION_LINE}")?;
        return Ok(true);
    }
    let host = HostConfig::load(cli.vm_dir.as_deref())?;
    let vm_dir = host.vm_dir.as_path();
    match &cli.command {
        Command::Version => Ok(true),
        Command::Init => {
            let report = datastore::init(vm_dir)?;
            for name in &report.templates_installed {
                tracing::info!(template = %name, "installed template");
            }
            // After a host reboot the bridges are gone: make every switch again.
            let problems = switch::init_all(vm_dir, &mut switch::netcfg_opener(vm_dir))?;
            for p in &problems {
                io.error(p)?;
            }
            Ok(problems.is_empty())
        }
        Command::Switch(sub) => run_switch(sub, vm_dir, io),
        Command::Datastore(sub) => run_datastore(sub, vm_dir, io),
        Command::Create {
            datastore,
            template,
            size,
            cpus,
            memory,
            name,
        } => {
            let opts = CreateOptions {
                datastore: datastore.clone(),
                template: template.clone(),
                size: size.clone(),
                cpus: cpus.clone(),
                memory: memory.clone(),
            };
            let created = create::create(vm_dir, &Datastores::load(vm_dir)?, name, &opts)?;
            for w in &created.warnings {
                io.warn(w)?;
            }
            Ok(true)
        }
        Command::List { json } => run_list(&host, *json, io),
        Command::Info { json, names } => run_info(vm_dir, *json, names, io),
        Command::Configure { name } => run_configure(vm_dir, name, io),
        Command::Rename { old, new } => {
            rename::rename(&Datastores::load(vm_dir)?, old, new)?;
            Ok(true)
        }
        Command::Destroy { force, name } => run_destroy(vm_dir, *force, name, io),
        Command::Start { foreground, names } => Ok(if *foreground {
            lifecycle::start_foreground(&host, names, io)?
        } else {
            lifecycle::start(&host, names, io)?
        }),
        Command::Stop { timeout, names } => Ok(lifecycle::stop(&host, names, *timeout, io)?),
        Command::Restart { name } => Ok(lifecycle::restart(&host, name, io)?),
        Command::Reset { force, name } => {
            Ok(lifecycle::force(&host, name, Force::Reset, *force, io)?)
        }
        Command::Poweroff { force, name } => {
            Ok(lifecycle::force(&host, name, Force::Poweroff, *force, io)?)
        }
        Command::Console { name } => {
            let dir = lifecycle::console_target(&host, name)?;
            crate::console::attach(&dir, name)?;
            Ok(true)
        }
        Command::Startall => Ok(lifecycle::startall(&host, io)?),
        Command::Stopall => Ok(lifecycle::stopall(&host, io)?),
        Command::Supervise { iso, name } => {
            Ok(lifecycle::run_detached(&host, name, iso.as_deref())?)
        }
        Command::Install {
            foreground,
            name,
            iso,
        } => Ok(lifecycle::install(&host, name, iso, *foreground, io)?),
        Command::Iso { datastore, url } => {
            run_media(vm_dir, MediaKind::Iso, datastore, url.as_deref(), io)
        }
        Command::Img { datastore, url } => {
            run_media(vm_dir, MediaKind::Img, datastore, url.as_deref(), io)
        }
    }
}

fn run_list(host: &HostConfig, json: bool, io: &mut Streams<'_>) -> Result<bool, CommandError> {
    let stores = Datastores::load(&host.vm_dir)?;
    let rows = list::rows(host, &stores);
    if json {
        writeln!(io.out, "{}", serde_json::to_string_pretty(&rows)?)?;
    } else {
        io.out.write_all(list::render_table(&rows).as_bytes())?;
    }
    let mut clean = true;
    for e in rows.iter().flat_map(|r| &r.errors) {
        io.error(e)?;
        clean = false;
    }
    Ok(clean)
}

fn run_info(
    vm_dir: &Path,
    json: bool,
    names: &[String],
    io: &mut Streams<'_>,
) -> Result<bool, CommandError> {
    let stores = Datastores::load(vm_dir)?;
    let guests = if names.is_empty() {
        stores.guests()
    } else {
        names
            .iter()
            .map(|n| stores.find_guest(n))
            .collect::<Result<Vec<_>, _>>()?
    };
    let infos: Vec<_> = guests.iter().map(info::gather).collect();
    if json {
        writeln!(io.out, "{}", serde_json::to_string_pretty(&infos)?)?;
    } else {
        for i in &infos {
            io.out.write_all(info::render_text(i).as_bytes())?;
        }
    }
    let mut clean = true;
    for i in &infos {
        for w in &i.warnings {
            io.warn(w)?;
        }
        for e in &i.errors {
            io.error(e)?;
            clean = false;
        }
    }
    Ok(clean)
}

fn run_configure(vm_dir: &Path, name: &str, io: &mut Streams<'_>) -> Result<bool, CommandError> {
    let guest = Datastores::load(vm_dir)?.find_guest(name)?;
    configure::edit(&guest, std::env::var_os("EDITOR"))?;
    match GuestConfig::load(&guest.conf_path()) {
        Ok(parsed) => {
            for w in &parsed.warnings {
                io.warn(w)?;
            }
            Ok(true)
        }
        Err(GuestConfigError::Invalid { errors, warnings }) => {
            for w in &warnings {
                io.warn(w)?;
            }
            for e in &errors {
                io.error(e)?;
            }
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

fn run_destroy(
    vm_dir: &Path,
    force: bool,
    name: &str,
    io: &mut Streams<'_>,
) -> Result<bool, CommandError> {
    let guest = Datastores::load(vm_dir)?.find_guest(name)?;
    // Refuse before asking; destroy::destroy checks again under the lock.
    if let RunState::Running { pid } = state::probe(&guest.dir)? {
        return Err(DestroyError::Lock {
            name: name.to_owned(),
            source: StateError::Running { pid },
        }
        .into());
    }
    if !force {
        write!(io.err, "{}", destroy::prompt(name))?;
        io.err.flush()?;
        let mut answer = String::new();
        io.input.read_line(&mut answer)?;
        if !destroy::confirmed(&answer) {
            return Ok(true);
        }
    }
    destroy::destroy(&guest)?;
    Ok(true)
}

fn run_datastore(
    sub: &DatastoreCommand,
    vm_dir: &Path,
    io: &mut Streams<'_>,
) -> Result<bool, CommandError> {
    match sub {
        DatastoreCommand::List => {
            let stores = Datastores::load(vm_dir)?;
            // vm-bhyve's fixed-width layout for this listing.
            writeln!(
                io.out,
                "{:<15} {:<11} {:<25} ZFS DATASET",
                "NAME", "TYPE", "PATH"
            )?;
            for ds in stores.all() {
                writeln!(
                    io.out,
                    "{:<15} {:<11} {:<25} -",
                    ds.name,
                    "directory",
                    ds.path.display()
                )?;
            }
        }
        DatastoreCommand::Add { name, path } => datastore::add(vm_dir, name, path)?,
        DatastoreCommand::Remove { name } => datastore::remove(vm_dir, name)?,
    }
    Ok(true)
}

fn run_media(
    vm_dir: &Path,
    kind: MediaKind,
    datastore: &str,
    url: Option<&str>,
    io: &mut Streams<'_>,
) -> Result<bool, CommandError> {
    let stores = Datastores::load(vm_dir)?;
    match url {
        None => io
            .out
            .write_all(media::render(&media::list(&stores, kind)).as_bytes())?,
        Some(url) => {
            let path = media::download(&stores, datastore, kind, url)?;
            writeln!(io.out, "{}", path.display())?;
        }
    }
    Ok(true)
}

fn run_switch(
    sub: &SwitchCommand,
    vm_dir: &Path,
    io: &mut Streams<'_>,
) -> Result<bool, CommandError> {
    let mut open = switch::netcfg_opener(vm_dir);
    match sub {
        SwitchCommand::List | SwitchCommand::Info { .. } => {
            let switches = switch::load(vm_dir)?;
            let wanted: Vec<&str> = match sub {
                SwitchCommand::Info { names } => names.iter().map(String::as_str).collect(),
                _ => Vec::new(),
            };
            for name in &wanted {
                if switches.get(name).is_none() {
                    return Err(SwitchError::NoSwitch((*name).to_owned()).into());
                }
            }
            let mut shown = switches.clone();
            if !wanted.is_empty() {
                shown.switches.retain(|s| wanted.contains(&s.name.as_str()));
            }
            // Live state through netcfg; without it (not root) only /sys tells.
            let mut links = if shown.switches.is_empty() {
                None
            } else {
                match open(switches.bridges()) {
                    Ok(links) => Some(links),
                    Err(e) => {
                        io.warn(&format!(
                            "live state unavailable: {}",
                            crate::list::error_chain(&e)
                        ))?;
                        None
                    }
                }
            };
            let live = switch::live(&shown, links.as_deref_mut());
            let text = if matches!(sub, SwitchCommand::List) {
                switch::render_list(&live)
            } else {
                switch::render_info(&live)
            };
            io.out.write_all(text.as_bytes())?;
            for e in &switches.errors {
                io.error(e)?;
            }
            return Ok(switches.errors.is_empty());
        }
        SwitchCommand::Create {
            kind,
            interface,
            vlan,
            bridge,
            mtu,
            addresses,
            private,
            name,
        } => {
            let args = switch::CreateArgs {
                name: name.clone(),
                kind: kind.clone(),
                interface: interface.clone(),
                vlan: vlan.clone(),
                bridge: bridge.clone(),
                mtu: mtu.clone(),
                addresses: addresses.clone(),
                private: *private,
            };
            switch::create(vm_dir, &args, &mut open)?;
        }
        SwitchCommand::Add { name, interface } => {
            switch::add(vm_dir, name, interface, &mut open)?;
        }
        SwitchCommand::Remove { name, interface } => {
            switch::remove(vm_dir, name, interface, &mut open)?;
        }
        SwitchCommand::Address { name, addresses } => {
            switch::address(vm_dir, name, addresses, &mut open)?;
        }
        SwitchCommand::Vlan { name, id } => switch::vlan(vm_dir, name, id, &mut open)?,
        SwitchCommand::Private { name, value } => {
            switch::private(vm_dir, name, value, &mut open)?;
        }
        SwitchCommand::Mtu { name, mtu } => switch::mtu(vm_dir, name, mtu, &mut open)?,
        SwitchCommand::Destroy { name } => switch::destroy(vm_dir, name, &mut open)?,
    }
    Ok(true)
}
