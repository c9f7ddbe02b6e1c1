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
    fn vm_dir_is_global() {
        let cli = Cli::try_parse_from(["vm", "list", "--vm-dir", "/x"]).unwrap();
        assert_eq!(cli.vm_dir, Some(PathBuf::from("/x")));
    }
}
