//! The `vm` binary end to end, in a temporary datastore (`VM_DIR`) with its own host config
//! (`CAPVM_CONF`), so nothing outside the temporary directory is touched.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use supervisor::state::GuestLock;

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    vm_dir: PathBuf,
    conf: PathBuf,
}

impl Env {
    /// A datastore with `vm init` run, and a host config with `vm_list`.
    fn new(vm_list: &str) -> Env {
        let env = Env::bare(vm_list);
        env.ok(&["init"]);
        env
    }

    fn bare(vm_list: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let vm_dir = root.join("vm");
        let conf = root.join("vm.conf");
        fs::write(&conf, format!("vm_list=\"{vm_list}\"\nvm_delay=\"5\"\n")).unwrap();
        Env {
            _dir: dir,
            root,
            vm_dir,
            conf,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vm"));
        cmd.args(args)
            .env("VM_DIR", &self.vm_dir)
            .env("CAPVM_CONF", &self.conf)
            .env_remove("EDITOR")
            .env_remove("VM_LOG")
            .stdin(Stdio::null());
        cmd
    }

    fn vm(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn vm_with_input(&self, args: &[&str], input: &str) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Runs `vm args`, asserts success, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.vm(args);
        assert!(
            out.status.success(),
            "vm {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_no_panic(&out);
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `vm args`, asserts failure, returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.vm(args);
        assert!(!out.status.success(), "vm {args:?} succeeded");
        assert_no_panic(&out);
        String::from_utf8(out.stderr).unwrap()
    }

    fn guest_conf(&self, name: &str) -> String {
        fs::read_to_string(self.vm_dir.join(name).join(format!("{name}.conf"))).unwrap()
    }
}

fn assert_no_panic(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
}

fn lines_of(text: &str) -> Vec<&str> {
    text.lines().collect()
}

const SEED: &str = include_str!("../templates/freebsd-uefi.conf");

#[test]
fn init_twice_creates_layout_and_keeps_edited_templates() {
    let env = Env::bare("");
    env.ok(&["init"]);
    for sub in [".config", ".templates", ".iso", ".img"] {
        assert!(env.vm_dir.join(sub).is_dir(), "{sub}");
    }
    assert!(env.vm_dir.join(".config/system.conf").is_file());
    let templates = env.vm_dir.join(".templates");
    assert_eq!(
        fs::read_to_string(templates.join("freebsd-uefi.conf")).unwrap(),
        SEED
    );
    assert!(templates.join("default.conf").is_file());
    assert!(templates.join("linux.conf").is_file());

    fs::write(templates.join("default.conf"), "# mine\ncpu=8\n").unwrap();
    fs::write(
        env.vm_dir.join(".config/system.conf"),
        "switch_list=\"public\"\n",
    )
    .unwrap();
    env.ok(&["init"]);
    assert_eq!(
        fs::read_to_string(templates.join("default.conf")).unwrap(),
        "# mine\ncpu=8\n"
    );
    assert_eq!(
        fs::read_to_string(env.vm_dir.join(".config/system.conf")).unwrap(),
        "switch_list=\"public\"\n"
    );
}

#[test]
fn create_from_seed_template_writes_uuid_mac_and_sparse_disk() {
    let env = Env::new("");
    env.ok(&["create", "-t", "freebsd-uefi", "-s", "8G", "bsd"]);
    let conf = env.guest_conf("bsd");

    // Every template line but disk0_size is copied in order.
    let template_lines: Vec<_> = SEED
        .lines()
        .filter(|l| !l.starts_with("disk0_size"))
        .collect();
    let copied: Vec<_> = conf.lines().take(template_lines.len()).collect();
    assert_eq!(copied, template_lines);
    assert!(!conf.contains("disk0_size"));

    let value = |key: &str| {
        conf.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=\"")))
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or_else(|| panic!("{key} missing in {conf}"))
            .to_owned()
    };
    let uuid = value("uuid");
    let bytes: Vec<u8> = uuid.bytes().collect();
    assert_eq!(uuid.len(), 36, "{uuid}");
    assert_eq!(bytes[14], b'4', "version 4: {uuid}");
    assert!(uuid.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));

    let mac = value("network0_mac");
    let parts: Vec<_> = mac.split(':').collect();
    assert_eq!(parts.len(), 6, "{mac}");
    assert_eq!(&parts[..3], ["58", "9c", "fc"]);
    assert!(
        parts
            .iter()
            .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok())
    );

    let disk = fs::metadata(env.vm_dir.join("bsd/disk0.img")).unwrap();
    assert_eq!(disk.len(), 8 << 30);
    assert_eq!(disk.blocks(), 0, "sparse");
    assert_eq!(disk.permissions().mode() & 0o777, 0o600);
}

#[test]
fn create_uses_template_size_and_default_size() {
    let env = Env::new("");
    env.ok(&["create", "-t", "freebsd-uefi", "big"]);
    assert_eq!(
        fs::metadata(env.vm_dir.join("big/disk0.img"))
            .unwrap()
            .len(),
        64 << 30
    );
    env.ok(&["create", "small"]);
    assert_eq!(
        fs::metadata(env.vm_dir.join("small/disk0.img"))
            .unwrap()
            .len(),
        20 << 30
    );
    assert!(env.guest_conf("small").contains("loader=\"uefi\""));
}

#[test]
fn create_refuses_existing_and_invalid_names() {
    let env = Env::new("");
    env.ok(&["create", "g"]);
    let before = env.guest_conf("g");
    let err = env.fails(&["create", "-t", "freebsd-uefi", "g"]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(env.guest_conf("g"), before);

    let long = "a".repeat(65);
    for bad in ["../evil", "-x", ".hidden", "a b", "a/b", "", long.as_str()] {
        let err = env.fails(&["create", "--", bad]);
        assert!(err.contains("invalid name"), "{bad:?}: {err}");
    }
    let mut entries: Vec<_> = fs::read_dir(&env.vm_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    entries.sort();
    assert_eq!(entries, [".config", ".img", ".iso", ".templates", "g"]);
    assert!(!env.root.join("evil").exists());
}

#[test]
fn create_refuses_bad_options_and_unknown_template() {
    let env = Env::new("");
    assert!(env.fails(&["create", "-m", "lots", "g"]).contains("-m: "));
    assert!(env.fails(&["create", "-c", "0", "g"]).contains("-c: "));
    assert!(env.fails(&["create", "-s", "big", "g"]).contains("-s: "));
    assert!(
        env.fails(&["create", "-t", "nope", "g"])
            .contains("unable to find template")
    );
    assert!(
        env.fails(&["create", "-d", "nope", "g"])
            .contains("unable to load datastore")
    );
    assert!(!env.vm_dir.join("g").exists());
}

#[test]
fn list_prints_vm_bhyve_columns() {
    let env = Env::new("bsd other");
    env.ok(&["create", "-t", "freebsd-uefi", "-s", "1G", "bsd"]);
    env.ok(&["create", "-c", "2", "-m", "1G", "-s", "1G", "deb"]);
    env.ok(&["create", "-t", "linux", "lin"]);
    let out = env.ok(&["list"]);
    assert_eq!(
        lines_of(&out),
        [
            "NAME  DATASTORE  LOADER  CPU  MEMORY  VNC  AUTO     STATE",
            "bsd   default    uefi    4    4G      -    Yes [1]  Stopped",
            "deb   default    uefi    2    1G      -    No       Stopped",
            "lin   default    linux   1    512M    -    No       Stopped",
        ]
    );
}

#[test]
fn list_json_parses_and_matches_table() {
    let env = Env::new("x bsd");
    env.ok(&["create", "-t", "freebsd-uefi", "-s", "1G", "bsd"]);
    let out = env.ok(&["list", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let row = &rows[0];
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_eq!(row["name"], "bsd");
    assert_eq!(row["datastore"], "default");
    assert_eq!(row["loader"], "uefi");
    assert_eq!(row["cpu"], "4");
    assert_eq!(row["memory"], "4G");
    assert_eq!(row["autostart"], 2);
    assert_eq!(row["state"], "stopped");
    assert!(row["vnc"].is_null());
    assert_eq!(row["errors"].as_array().unwrap().len(), 0);
}

#[test]
fn running_guest_is_listed_and_protected() {
    let env = Env::new("");
    env.ok(&["create", "-s", "1M", "g"]);
    let mut lock = GuestLock::acquire(&env.vm_dir.join("g")).unwrap();
    lock.write_pid(31337).unwrap();

    let out = env.ok(&["list"]);
    assert!(
        out.lines().nth(1).unwrap().ends_with("Running (31337)"),
        "{out}"
    );
    let info = env.ok(&["info", "g"]);
    assert!(info.contains("  state: running (31337)\n"), "{info}");

    let err = env.fails(&["destroy", "-f", "g"]);
    assert!(err.contains("running"), "{err}");
    let err = env.fails(&["rename", "g", "h"]);
    assert!(err.contains("running"), "{err}");
    assert!(env.vm_dir.join("g/g.conf").is_file());

    drop(lock);
    let out = env.ok(&["list"]);
    assert!(out.lines().nth(1).unwrap().ends_with("Stopped"), "{out}");
    env.ok(&["destroy", "-f", "g"]);
    assert!(!env.vm_dir.join("g").exists());
}

#[test]
fn info_shows_vm_bhyve_layout_and_json() {
    let env = Env::new("");
    env.ok(&["create", "-t", "freebsd-uefi", "-s", "8G", "bsd"]);
    let conf = env.guest_conf("bsd");
    let mac = conf
        .lines()
        .find_map(|l| l.strip_prefix("network0_mac=\""))
        .unwrap()
        .trim_end_matches('"');
    let uuid = conf
        .lines()
        .find_map(|l| l.strip_prefix("uuid=\""))
        .unwrap()
        .trim_end_matches('"');
    let out = env.ok(&["info", "bsd"]);
    let disk = env.vm_dir.join("bsd/disk0.img");
    let expected = format!(
        "------------------------\n\
         Virtual Machine: bsd\n\
         ------------------------\n  \
           state: stopped\n  \
           datastore: default\n  \
           loader: uefi\n  \
           uuid: {uuid}\n  \
           cpu: 4\n  \
           memory: 4G\n\
         \n  \
           network-interface\n    \
             number: 0\n    \
             emulation: virtio-net\n    \
             virtual-switch: public\n    \
             fixed-mac-address: {mac}\n    \
             fixed-device: -\n\
         \n  \
           virtual-disk\n    \
             number: 0\n    \
             device-type: file\n    \
             emulation: virtio-blk\n    \
             options: -\n    \
             system-path: {}\n    \
             bytes-size: 8589934592 (8.000G)\n    \
             bytes-used: 0 (0.000B)\n\n",
        disk.display()
    );
    assert_eq!(out, expected);

    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["info", "--json", "bsd"])).unwrap();
    let g = &json[0];
    assert_eq!(g["name"], "bsd");
    assert_eq!(g["uuid"], uuid);
    assert_eq!(g["network_interfaces"][0]["fixed_mac_address"], mac);
    assert_eq!(g["virtual_disks"][0]["bytes_size"], 8u64 << 30);
    assert_eq!(g["virtual_disks"][0]["bytes_used"], 0);

    // No name: every guest.
    env.ok(&["create", "-s", "1M", "other"]);
    let all = env.ok(&["info"]);
    assert_eq!(all.matches("Virtual Machine: ").count(), 2);
    assert!(env.fails(&["info", "missing"]).contains("missing"));
}

#[test]
fn bad_config_value_is_reported_with_file_line_and_key() {
    let env = Env::new("");
    env.ok(&["create", "-s", "1M", "g"]);
    let path = env.vm_dir.join("g/g.conf");
    let conf = env
        .guest_conf("g")
        .replace("memory=256M", "memory=\"lots\"");
    fs::write(&path, &conf).unwrap();
    let line = conf.lines().position(|l| l.starts_with("memory=")).unwrap() + 1;
    let location = format!("{}:{line}: memory: ", path.display());

    let out = env.vm(&["info", "g"]);
    assert!(!out.status.success());
    assert_no_panic(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("  memory: lots\n"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&location),
        "{out:?}"
    );

    let out = env.vm(&["list"]);
    assert!(!out.status.success());
    assert_no_panic(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().nth(1).unwrap().contains(" lots "),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&location));

    for (bad, key) in [("cpu=0", "cpu"), ("graphics_res=\"7x7\"", "graphics_res")] {
        fs::write(&path, format!("{bad}\n")).unwrap();
        let err = env.fails(&["info", "g"]);
        assert!(
            err.contains(&format!("{}:1: {key}: ", path.display())),
            "{err}"
        );
    }

    // Binary junk is an error or a warning, never a crash.
    fs::write(&path, b"\xff\xfe\0memory=\x80\ncpu=\"\"\"\n=\n#\n").unwrap();
    let out = env.vm(&["list"]);
    assert_no_panic(&out);
    let out = env.vm(&["info", "g"]);
    assert_no_panic(&out);
}

#[test]
fn rename_moves_guest() {
    let env = Env::new("");
    env.ok(&["create", "-s", "1M", "old"]);
    env.ok(&["rename", "old", "new"]);
    assert!(!env.vm_dir.join("old").exists());
    assert!(env.vm_dir.join("new/new.conf").is_file());
    assert!(env.vm_dir.join("new/disk0.img").is_file());
    let out = env.ok(&["list"]);
    assert!(out.lines().nth(1).unwrap().starts_with("new "), "{out}");
    assert!(env.fails(&["rename", "old", "x"]).contains("old"));
    env.ok(&["create", "-s", "1M", "other"]);
    assert!(
        env.fails(&["rename", "new", "other"])
            .contains("already exists")
    );
    assert!(
        env.fails(&["rename", "new", "../x"])
            .contains("invalid name")
    );
}

#[test]
fn destroy_asks_unless_forced() {
    let env = Env::new("");
    for name in ["a", "b", "c", "d"] {
        env.ok(&["create", "-s", "1M", name]);
    }
    let out = env.vm_with_input(&["destroy", "a"], "n\n");
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("Are you sure you want to completely remove a? [y/N]")
    );
    assert!(env.vm_dir.join("a").exists());

    let out = env.vm_with_input(&["destroy", "a"], "");
    assert!(out.status.success());
    assert!(env.vm_dir.join("a").exists(), "EOF is no");

    let out = env.vm_with_input(&["destroy", "a"], "y\n");
    assert!(out.status.success(), "{out:?}");
    assert!(!env.vm_dir.join("a").exists());

    let out = env.vm_with_input(&["destroy", "b"], "YES\n");
    assert!(out.status.success());
    assert!(!env.vm_dir.join("b").exists());

    env.ok(&["destroy", "-f", "c"]);
    assert!(!env.vm_dir.join("c").exists());
    assert!(env.vm_dir.join("d").exists());
    assert!(
        env.fails(&["destroy", "-f", "c"])
            .contains("does not appear to be a valid virtual machine")
    );
}

#[test]
fn commands_accept_unique_prefixes_only() {
    let env = Env::new("");
    env.ok(&["create", "-s", "1M", "g"]);
    assert_eq!(env.ok(&["li"]), env.ok(&["list"]));
    assert_eq!(env.ok(&["l"]), env.ok(&["list"]));
    assert_eq!(env.ok(&["datas", "l"]), env.ok(&["datastore", "list"]));
    assert_eq!(env.ok(&["ver"]), env.ok(&["version"]));
    let out = env.vm(&["i"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("'i'"));
    env.fails(&["c", "x"]);
    env.fails(&["d", "-f", "g"]);
    assert!(env.vm_dir.join("g").exists());
}

#[test]
fn datastore_add_list_remove() {
    let env = Env::new("");
    let extra = env.root.join("extra");
    fs::create_dir(&extra).unwrap();
    env.ok(&["datastore", "add", "extra", extra.to_str().unwrap()]);
    let out = env.ok(&["datastore", "list"]);
    assert_eq!(
        lines_of(&out),
        [
            format!("{:<15} {:<11} {:<25} ZFS DATASET", "NAME", "TYPE", "PATH"),
            format!(
                "{:<15} {:<11} {:<25} -",
                "default",
                "directory",
                env.vm_dir.display()
            ),
            format!(
                "{:<15} {:<11} {:<25} -",
                "extra",
                "directory",
                extra.display()
            ),
        ]
    );
    env.ok(&["create", "-d", "extra", "-s", "1M", "far"]);
    assert!(extra.join("far/far.conf").is_file());
    let out = env.ok(&["list"]);
    assert!(
        out.lines().nth(1).unwrap().starts_with("far   extra "),
        "{out}"
    );
    assert!(
        env.fails(&["create", "-s", "1M", "far"])
            .contains("already exists")
    );
    env.ok(&["info", "far"]);

    assert!(
        env.fails(&["datastore", "add", "extra", extra.to_str().unwrap()])
            .contains("already exists")
    );
    assert!(
        env.fails(&["datastore", "add", "rel", "relative/path"])
            .contains("absolute")
    );
    assert!(
        env.fails(&["datastore", "add", "z", "zfs:pool/vm"])
            .contains("ZFS datastores are not supported")
    );
    assert!(
        env.fails(&["datastore", "remove", "default"])
            .contains("default")
    );

    env.ok(&["datastore", "remove", "extra"]);
    assert_eq!(env.ok(&["datastore", "list"]).lines().count(), 2);
    assert!(extra.join("far/far.conf").is_file(), "files stay");
    assert_eq!(env.ok(&["list"]).lines().count(), 1);
    assert!(
        env.fails(&["datastore", "remove", "extra"])
            .contains("extra")
    );
}

#[test]
fn host_config_sources_and_errors() {
    let env = Env::new("");
    // --vm-dir wins over VM_DIR.
    let other = env.root.join("other");
    let out = env
        .command(&["--vm-dir", other.to_str().unwrap(), "init"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(other.join(".templates/default.conf").is_file());

    // vm_dir from the config file when VM_DIR is unset.
    let conf_only = env.root.join("conf-only");
    fs::write(&env.conf, format!("vm_dir=\"{}\"\n", conf_only.display())).unwrap();
    let out = env
        .command(&["init"])
        .env_remove("VM_DIR")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(conf_only.join(".config/system.conf").is_file());

    fs::write(&env.conf, "vm_dir=\"zfs:pool/vm\"\n").unwrap();
    let out = env
        .command(&["list"])
        .env_remove("VM_DIR")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ZFS datastores are not supported"));

    fs::write(&env.conf, "").unwrap();
    let out = env
        .command(&["list"])
        .env_remove("VM_DIR")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("vm_dir is not set"));

    fs::write(&env.conf, "vm_delay=\"later\"\n").unwrap();
    let err = env.fails(&["list"]);
    assert!(
        err.contains(&format!("{}:1: vm_delay: ", env.conf.display())),
        "{err}"
    );

    let missing = Env::bare("");
    assert!(missing.fails(&["list"]).contains("run vm init"));
}

#[test]
fn version_and_help_on_every_command() {
    let env = Env::bare("");
    let version = env.ok(&["version"]);
    assert!(version.starts_with("capvm: "), "{version}");
    assert!(version.contains(env!("CARGO_PKG_VERSION")));
    let help = env.ok(&["--help"]);
    for cmd in [
        "version",
        "init",
        "datastore",
        "create",
        "list",
        "info",
        "configure",
        "rename",
        "destroy",
        "iso",
        "img",
    ] {
        assert!(help.contains(cmd), "{cmd} missing from --help");
        let out = env.ok(&[cmd, "--help"]);
        assert!(out.contains(&format!("Usage: vm {cmd}")), "{cmd}: {out}");
    }
    for sub in ["list", "add", "remove"] {
        let out = env.ok(&["datastore", sub, "--help"]);
        assert!(out.contains(&format!("Usage: vm datastore {sub}")), "{out}");
    }
    let create = env.ok(&["create", "--help"]);
    for flag in [
        "-d <DATASTORE>",
        "-t <TEMPLATE>",
        "-s <SIZE>",
        "-c <CPUS>",
        "-m <MEMORY>",
    ] {
        assert!(create.contains(flag), "{flag}: {create}");
    }
}

#[test]
fn configure_runs_editor_then_checks_the_config() {
    let env = Env::new("");
    env.ok(&["create", "-s", "1M", "g"]);
    let editor = env.root.join("editor.sh");
    fs::write(&editor, "#!/bin/sh\nprintf '%s\\n' \"$APPEND\" >> \"$1\"\n").unwrap();
    fs::set_permissions(&editor, fs::Permissions::from_mode(0o755)).unwrap();

    let out = env
        .command(&["configure", "g"])
        .env("EDITOR", &editor)
        .env("APPEND", "graphics=\"yes\"")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(env.guest_conf("g").ends_with("graphics=\"yes\"\n"));

    let out = env
        .command(&["configure", "g"])
        .env("EDITOR", &editor)
        .env("APPEND", "bogus_key=1")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("WARNING: "));
    assert!(String::from_utf8_lossy(&out.stderr).contains(": bogus_key: unknown key"));

    // A repeated key: the first occurrence wins, the repeat is a warning.
    let out = env
        .command(&["configure", "g"])
        .env("EDITOR", &editor)
        .env("APPEND", "cpu=\"0\"")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(": cpu: repeats line "));

    let out = env
        .command(&["configure", "g"])
        .env("EDITOR", &editor)
        .env("APPEND", "graphics_port=\"0\"")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_no_panic(&out);
    let conf_path = env.vm_dir.join("g/g.conf");
    let line = env.guest_conf("g").lines().count();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "ERROR: {}:{line}: graphics_port: ",
            conf_path.display()
        )),
        "{stderr}"
    );
    // The edit stays, as in vm-bhyve.
    assert!(env.guest_conf("g").ends_with("graphics_port=\"0\"\n"));
}

/// Serves `body` once over HTTP on 127.0.0.1; returns the base URL.
fn serve_once(body: Vec<u8>) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
            request.push(byte[0]);
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&body).unwrap();
    });
    (url, handle)
}

#[test]
fn iso_and_img_list_and_download() {
    let env = Env::new("");
    assert_eq!(env.ok(&["iso"]), "DATASTORE  FILENAME\n");
    fs::write(env.vm_dir.join(".iso/local.iso"), "iso").unwrap();
    assert_eq!(
        env.ok(&["iso"]),
        "DATASTORE  FILENAME\ndefault    local.iso\n"
    );

    // http on loopback, into .iso
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (url, server) = serve_once(payload.clone());
    let out = env.ok(&["iso", &format!("{url}/FreeBSD-disc1.iso")]);
    server.join().unwrap();
    let fetched = env.vm_dir.join(".iso/FreeBSD-disc1.iso");
    assert_eq!(out.trim(), fetched.display().to_string());
    assert_eq!(fs::read(&fetched).unwrap(), payload);
    assert_eq!(
        env.ok(&["iso"]),
        "DATASTORE  FILENAME\ndefault    FreeBSD-disc1.iso\ndefault    local.iso\n"
    );

    // file:// gzip image into .img, decompressed
    let raw: Vec<u8> = b"disk image ".repeat(1000);
    let gz_path = env.root.join("cloud.img.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&raw).unwrap();
    fs::write(&gz_path, enc.finish().unwrap()).unwrap();
    env.ok(&["img", &format!("file://{}", gz_path.display())]);
    assert_eq!(fs::read(env.vm_dir.join(".img/cloud.img")).unwrap(), raw);
    assert_eq!(
        env.ok(&["img"]),
        "DATASTORE  FILENAME\ndefault    cloud.img\n"
    );

    // A failed download leaves nothing behind.
    let err = env.fails(&["iso", "http://127.0.0.1:9/none.iso"]);
    assert!(!err.is_empty());
    assert!(!env.vm_dir.join(".iso/none.iso").exists());
    let leftovers: Vec<_> = fs::read_dir(env.vm_dir.join(".iso"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(
        env.fails(&["iso", "-d", "nope", "file:///etc/hostname"])
            .contains("nope")
    );
}

#[test]
fn every_shipped_template_creates_a_listable_guest() {
    let env = Env::new("");
    for (template, loader) in [
        ("default", "uefi"),
        ("freebsd-uefi", "uefi"),
        ("linux", "linux"),
    ] {
        let name = format!("t-{template}");
        env.ok(&["create", "-t", template, "-s", "1M", &name]);
        let out = env.vm(&["info", &name]);
        assert!(out.status.success());
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains(&format!("  loader: {loader}\n")), "{text}");
    }
    let out = env.ok(&["list"]);
    assert_eq!(out.lines().count(), 4);
}
