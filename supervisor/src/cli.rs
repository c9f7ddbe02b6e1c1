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
    /// Virtual switches: bridges guests' NICs join (vm-bhyve's vm switch)
    #[command(subcommand, infer_subcommands = true, arg_required_else_help = true)]
    Switch(SwitchCommand),
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

/// `vm switch` subcommands.
#[derive(Debug, Subcommand)]
pub enum SwitchCommand {
    /// List switches: NAME TYPE IFACE ADDRESS PRIVATE MTU VLAN PORTS
    List,
    /// Show switches (all when no name is given) with their live state and guest ports
    Info {
        /// Switches to show
        names: Vec<String>,
    },
    /// Create a switch (standard: a bridge vm-NAME capvm makes; manual: an existing bridge)
    Create {
        /// Switch type: standard or manual
        #[arg(short = 't', value_name = "TYPE")]
        kind: Option<String>,
        /// Member interface (joined as IF.VLAN with -n)
        #[arg(short = 'i', value_name = "IF")]
        interface: Option<String>,
        /// VLAN id of the members
        #[arg(short = 'n', value_name = "VLAN")]
        vlan: Option<String>,
        /// The existing bridge of a manual switch
        #[arg(short = 'b', value_name = "BRIDGE")]
        bridge: Option<String>,
        /// MTU of the bridge, its members and its taps
        #[arg(short = 'm', value_name = "MTU")]
        mtu: Option<String>,
        /// Host address on the bridge, IPv4 or IPv6 (repeatable)
        #[arg(short = 'a', value_name = "ADDR/LEN")]
        addresses: Vec<String>,
        /// Private: guests on the switch cannot reach each other
        #[arg(short = 'p')]
        private: bool,
        /// Switch name (letters, digits, '_', '-'; at most 12)
        name: String,
    },
    /// Add a member interface to a switch
    Add {
        /// Switch
        name: String,
        /// Interface
        interface: String,
    },
    /// Remove a member interface from a switch
    Remove {
        /// Switch
        name: String,
        /// Interface
        interface: String,
    },
    /// Set the host addresses of a switch's bridge (none removes them)
    Address {
        /// Switch
        name: String,
        /// ADDR/LEN (IPv4 or IPv6), several allowed, or none
        #[arg(required = true, value_name = "ADDR/LEN|none")]
        addresses: Vec<String>,
    },
    /// Set the VLAN id of a switch's members (0: none)
    Vlan {
        /// Switch
        name: String,
        /// VLAN id, 0 to 4094
        id: String,
    },
    /// Make a switch private (guests cannot reach each other) or not
    Private {
        /// Switch
        name: String,
        /// on or off
        value: String,
    },
    /// Set the MTU of a switch's bridge, members and taps
    Mtu {
        /// Switch
        name: String,
        /// MTU, 68 to 65535
        mtu: String,
    },
    /// Destroy a switch (a standard switch's bridge is deleted; a manual one's stays)
    Destroy {
        /// Switch
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
    fn switch_commands_take_vm_bhyve_options() {
        let cli = Cli::try_parse_from([
            "vm",
            "switch",
            "create",
            "-t",
            "standard",
            "-i",
            "eth0",
            "-n",
            "10",
            "-m",
            "9000",
            "-a",
            "198.18.0.1/24",
            "-a",
            "2001:db8::1/64",
            "-p",
            "public",
        ])
        .unwrap();
        let Command::Switch(SwitchCommand::Create {
            kind,
            interface,
            vlan,
            bridge,
            mtu,
            addresses,
            private,
            name,
        }) = cli.command
        else {
            panic!("not switch create");
        };
        assert_eq!(
            (
                kind.as_deref(),
                interface.as_deref(),
                vlan.as_deref(),
                bridge,
                mtu.as_deref()
            ),
            (
                Some("standard"),
                Some("eth0"),
                Some("10"),
                None,
                Some("9000")
            )
        );
        assert_eq!(addresses, ["198.18.0.1/24", "2001:db8::1/64"]);
        assert!(private);
        assert_eq!(name, "public");
        let cli = Cli::try_parse_from(["vm", "switch", "address", "s", "none"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Switch(SwitchCommand::Address { ref addresses, .. }) if addresses == &["none"]
        ));
        let cli = Cli::try_parse_from(["vm", "sw", "l"]).unwrap();
        assert!(matches!(cli.command, Command::Switch(SwitchCommand::List)));
        assert!(Cli::try_parse_from(["vm", "switch", "address", "s"]).is_err());
        assert!(Cli::try_parse_from(["vm", "switch", "a", "s", "eth0"]).is_err());
    }

    #[test]
    fn vm_dir_is_global() {
        let cli = Cli::try_parse_from(["vm", "list", "--vm-dir", "/x"]).unwrap();
        assert_eq!(cli.vm_dir, Some(PathBuf::from("/x")));
    }
}
