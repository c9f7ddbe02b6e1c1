//! The `vm` command line: vm-bhyve's command names and options. Any unique prefix of a
//! command is accepted (`vm li` is `vm list`), as in vm-bhyve.

#![forbid(unsafe_code)]
// The doc comments below are the `--help` text, where backticks would show.
#![allow(clippy::doc_markdown)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The `vm` command.
#[derive(Debug, Parser)]
#[command(
    name = "vm",
    about = "capvm: bhyve/vm-bhyve-style virtual machines on Linux/KVM, one sandboxed process per device",
    infer_subcommands = true,
    arg_required_else_help = true,
    disable_version_flag = true
)]
pub struct Cli {
    /// The default datastore directory (overrides VM_DIR and vm_dir in /etc/vm.conf)
    #[arg(long, global = true, value_name = "DIR")]
    pub vm_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// `vm` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the version
    Version,
    /// Create the datastore layout and install missing templates (safe to run again)
    Init,
    /// List, add or remove datastores
    #[command(subcommand, infer_subcommands = true, arg_required_else_help = true)]
    Datastore(DatastoreCommand),
    /// Create a guest from a template
    Create {
        /// Datastore to create the guest in
        #[arg(short = 'd', value_name = "DATASTORE", default_value = "default")]
        datastore: String,
        /// Template (a file in $vm_dir/.templates, without .conf)
        #[arg(short = 't', value_name = "TEMPLATE", default_value = "default")]
        template: String,
        /// Size of disk0 (K/M/G/T suffix; default: the template's disk0_size, else 20G)
        #[arg(short = 's', value_name = "SIZE")]
        size: Option<String>,
        /// Number of vCPUs (overrides the template)
        #[arg(short = 'c', value_name = "CPUS")]
        cpus: Option<String>,
        /// Memory (K/M/G/T suffix, none = megabytes; overrides the template)
        #[arg(short = 'm', value_name = "MEMORY")]
        memory: Option<String>,
        /// Name of the new guest
        name: String,
    },
    /// List guests
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show details of guests (all when no name is given)
    Info {
        /// Print JSON (an array of objects) instead of text
        #[arg(long)]
        json: bool,
        /// Guests to show
        names: Vec<String>,
    },
    /// Edit a guest's config in $EDITOR, then check it
    Configure {
        /// Guest to edit
        name: String,
    },
    /// Rename a stopped guest
    Rename {
        /// Current name
        old: String,
        /// New name
        new: String,
    },
    /// Remove a stopped guest and its files
    Destroy {
        /// Do not ask for confirmation
        #[arg(short = 'f')]
        force: bool,
        /// Guest to remove
        name: String,
    },
    /// Start guests (each detached, vm_delay seconds apart), or one in the foreground with -f
    Start {
        /// Stay in the foreground with the serial console on stdin/stdout; exit with the guest
        #[arg(short = 'f')]
        foreground: bool,
        /// Guests to start
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Start a guest with an ISO attached read-only after its disks, for this run only
    Install {
        /// Stay in the foreground with the serial console on stdin/stdout; exit with the guest
        #[arg(short = 'f')]
        foreground: bool,
        /// Guest to start
        name: String,
        /// The ISO: a file in $vm_dir/.iso, or a path (any name with a '/')
        iso: String,
    },
    /// Press the ACPI power button of running guests and wait until they are off
    Stop {
        /// Seconds to wait before forcing the guest off (default: its stop_timeout, else 30; 0 never forces)
        #[arg(short = 't', value_name = "SECS", value_parser = clap::value_parser!(u32).range(0..=3600))]
        timeout: Option<u32>,
        /// Guests to stop
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Shut a guest down through ACPI and boot it again
    Restart {
        /// Guest to restart
        name: String,
    },
    /// Reset a guest at once, without a shutdown
    Reset {
        /// Do not ask for confirmation
        #[arg(short = 'f')]
        force: bool,
        /// Guest to reset
        name: String,
    },
    /// Stop a guest at once, as pulling the plug
    Poweroff {
        /// Do not ask for confirmation
        #[arg(short = 'f')]
        force: bool,
        /// Guest to power off
        name: String,
    },
    /// Attach to a running guest's serial console (~. detaches)
    Console {
        /// Guest to attach to
        name: String,
    },
    /// Start the guests of vm_list in order, vm_delay seconds apart
    Startall,
    /// Stop the guests of vm_list in reverse order, then every other running guest
    Stopall,
    /// The per-VM supervisor that `vm start` runs detached (not for direct use)
    #[command(name = "_run", hide = true)]
    Supervise {
        /// Install media to attach read-only after the disks (vm install)
        #[arg(long, value_name = "PATH")]
        iso: Option<PathBuf>,
        /// Guest to run
        name: String,
    },
    /// List install media, or download one (http, https, ftp, file) into .iso
    Iso {
        /// Datastore to download into
        #[arg(short = 'd', value_name = "DATASTORE", default_value = "default")]
        datastore: String,
        /// URL to download
        url: Option<String>,
    },
    /// List disk images, or download one into .img (.xz/.gz are decompressed)
    Img {
        /// Datastore to download into
        #[arg(short = 'd', value_name = "DATASTORE", default_value = "default")]
        datastore: String,
        /// URL to download
        url: Option<String>,
    },
}

/// `vm datastore` subcommands.
#[derive(Debug, Subcommand)]
pub enum DatastoreCommand {
    /// List datastores
    List,
    /// Add an existing directory as a datastore
    Add {
        /// Datastore name
        name: String,
        /// Absolute path of the directory
        path: PathBuf,
    },
    /// Remove a datastore from the list (its files stay)
    Remove {
        /// Datastore name
        name: String,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn unique_prefix_selects_a_command() {
        let cli = Cli::try_parse_from(["vm", "li", "--json"]).unwrap();
        assert!(matches!(cli.command, Command::List { json: true }));
        let cli = Cli::try_parse_from(["vm", "datas", "l"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Datastore(DatastoreCommand::List)
        ));
    }

    #[test]
    fn ambiguous_prefix_is_an_error() {
        assert!(Cli::try_parse_from(["vm", "i"]).is_err());
        assert!(Cli::try_parse_from(["vm", "c", "x"]).is_err());
    }

    #[test]
    fn create_takes_vm_bhyve_options() {
        let cli = Cli::try_parse_from([
            "vm",
            "create",
            "-t",
            "freebsd-uefi",
            "-s",
            "8G",
            "-c",
            "2",
            "-m",
            "1G",
            "-d",
            "ds",
            "g",
        ])
        .unwrap();
        let Command::Create {
            datastore,
            template,
            size,
            cpus,
            memory,
            name,
        } = cli.command
        else {
            panic!("not create");
        };
        assert_eq!(
            (datastore.as_str(), template.as_str(), name.as_str()),
            ("ds", "freebsd-uefi", "g")
        );
        assert_eq!(
            (size, cpus, memory),
            (Some("8G".into()), Some("2".into()), Some("1G".into()))
        );
    }

    #[test]
    fn lifecycle_commands_parse_with_vm_bhyve_options() {
        let cli = Cli::try_parse_from(["vm", "start", "-f", "a"]).unwrap();
        assert!(
            matches!(cli.command, Command::Start { foreground: true, ref names } if names == &["a"])
        );
        let cli = Cli::try_parse_from(["vm", "stop", "-t", "5", "a", "b"]).unwrap();
        assert!(
            matches!(cli.command, Command::Stop { timeout: Some(5), ref names } if names.len() == 2)
        );
        let cli = Cli::try_parse_from(["vm", "poweroff", "-f", "a"]).unwrap();
        assert!(matches!(cli.command, Command::Poweroff { force: true, .. }));
        let cli = Cli::try_parse_from(["vm", "_run", "a"]).unwrap();
        assert!(matches!(cli.command, Command::Supervise { iso: None, .. }));
        let cli = Cli::try_parse_from(["vm", "install", "-f", "a", "x.iso"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Install { foreground: true, ref name, ref iso } if name == "a" && iso == "x.iso"
        ));
        let cli = Cli::try_parse_from(["vm", "_run", "--iso", "/i/x.iso", "a"]).unwrap();
        assert!(
            matches!(cli.command, Command::Supervise { iso: Some(ref p), .. } if p == &PathBuf::from("/i/x.iso"))
        );
        assert!(Cli::try_parse_from(["vm", "stop", "-t", "3601", "a"]).is_err());
        assert!(Cli::try_parse_from(["vm", "start"]).is_err());
    }

    #[test]
    fn exact_names_win_over_longer_commands() {
        let cli = Cli::try_parse_from(["vm", "start", "a"]).unwrap();
        assert!(matches!(cli.command, Command::Start { .. }));
        let cli = Cli::try_parse_from(["vm", "stop", "a"]).unwrap();
        assert!(matches!(cli.command, Command::Stop { .. }));
        let cli = Cli::try_parse_from(["vm", "startall"]).unwrap();
        assert!(matches!(cli.command, Command::Startall));
        let cli = Cli::try_parse_from(["vm", "cons", "a"]).unwrap();
        assert!(matches!(cli.command, Command::Console { .. }));
    }

    #[test]
    fn vm_dir_is_global() {
        let cli = Cli::try_parse_from(["vm", "list", "--vm-dir", "/x"]).unwrap();
        assert_eq!(cli.vm_dir, Some(PathBuf::from("/x")));
    }
}
