//! `vm list`: one row per guest with vm-bhyve's columns
//! `NAME DATASTORE LOADER CPU MEMORY VNC AUTO STATE`, or the same as JSON.
//!
//! Values are shown as written in the guest config, as vm-bhyve shows them, so a guest with
//! a broken config is still listed; its config errors are returned with the row.

#![forbid(unsafe_code)]

use std::fs;
use std::path::Path;

use serde::Serialize;

use crate::conf::Conf;
use crate::datastore::{Datastores, Guest};
use crate::guest_config::{GuestConfig, GuestConfigError, yesno};
use crate::host_config::HostConfig;
use crate::state::{self, RunState};
use crate::table;

/// The file in a running guest's directory where its supervisor records console endpoints,
/// one `name=value` per line (vm-bhyve's `console` file; `vnc=ADDRESS:PORT`).
pub const CONSOLE_FILE: &str = "console";

/// One `vm list` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListRow {
    pub name: String,
    pub datastore: String,
    pub path: String,
    pub loader: String,
    pub cpu: String,
    pub memory: String,
    /// `ADDRESS:PORT` of a running guest's VNC console.
    pub vnc: Option<String>,
    /// Position in `vm_list` (1-based).
    pub autostart: Option<usize>,
    /// `stopped`, `running` or `unknown` (the lock could not be read).
    pub state: String,
    pub pid: Option<u32>,
    /// Config errors (`file:line: key: message`) and state errors.
    pub errors: Vec<String>,
}

/// The LOADER value: `loader` as written, else `uefi` for vm-bhyve's older `uefi="yes"`
/// (`uefi-csm` for `uefi="csm"`), else `none`.
pub fn loader_label(conf: &Conf) -> String {
    match (
        conf.get("loader").filter(|v| !v.is_empty()),
        conf.get("uefi"),
    ) {
        (Some(loader), _) => loader.to_owned(),
        (None, Some(u)) if u.eq_ignore_ascii_case("csm") => "uefi-csm".to_owned(),
        (None, Some(u)) if yesno(u) => "uefi".to_owned(),
        _ => "none".to_owned(),
    }
}

/// The config errors of a guest, as lines; read errors included.
pub fn config_errors(conf: Result<&Conf, String>, path: &Path) -> Vec<String> {
    match conf {
        Err(e) => vec![e],
        Ok(conf) => match GuestConfig::from_conf(conf, path) {
            Ok(_) => Vec::new(),
            Err(GuestConfigError::Invalid { errors, .. }) => {
                errors.iter().map(ToString::to_string).collect()
            }
            Err(e) => vec![e.to_string()],
        },
    }
}

/// The VNC endpoint a running guest's supervisor recorded.
pub fn vnc_endpoint(guest_dir: &Path) -> Option<String> {
    let text = fs::read_to_string(guest_dir.join(CONSOLE_FILE)).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("vnc="))
        .map(str::to_owned)
        .filter(|v| !v.is_empty())
}

/// The run state as `(state, pid)` words, and an error line if it could not be read.
pub fn state_words(guest_dir: &Path) -> (RunState, &'static str, Option<String>) {
    match state::probe(guest_dir) {
        Ok(s @ RunState::Stopped) => (s, "stopped", None),
        Ok(s @ RunState::Running { .. }) => (s, "running", None),
        Err(e) => (RunState::Stopped, "unknown", Some(error_chain(&e))),
    }
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn row(guest: &Guest, host: &HostConfig) -> ListRow {
    let conf_path = guest.conf_path();
    let loaded = Conf::load(&conf_path).map_err(|e| error_chain(&e));
    let empty = Conf::default();
    let conf = loaded.as_ref().unwrap_or(&empty);
    let mut errors = config_errors(loaded.as_ref().map_err(Clone::clone), &conf_path);
    let (run, state_word, state_error) = state_words(&guest.dir);
    errors.extend(state_error);
    let running = matches!(run, RunState::Running { .. });
    let graphics = conf.get("graphics").is_some_and(yesno);
    ListRow {
        name: guest.name.clone(),
        datastore: guest.datastore.clone(),
        path: guest.dir.display().to_string(),
        loader: loader_label(conf),
        cpu: conf.get("cpu").unwrap_or_default().to_owned(),
        memory: conf.get("memory").unwrap_or_default().to_owned(),
        vnc: (running && graphics)
            .then(|| vnc_endpoint(&guest.dir))
            .flatten(),
        autostart: host.autostart_position(&guest.name),
        state: state_word.to_owned(),
        pid: match run {
            RunState::Running { pid } => pid,
            RunState::Stopped => None,
        },
        errors,
    }
}

/// The rows of every guest in every datastore.
pub fn rows(host: &HostConfig, stores: &Datastores) -> Vec<ListRow> {
    stores.guests().iter().map(|g| row(g, host)).collect()
}

/// vm-bhyve's `vm list` table.
pub fn render_table(rows: &[ListRow]) -> String {
    let header = [
        "NAME",
        "DATASTORE",
        "LOADER",
        "CPU",
        "MEMORY",
        "VNC",
        "AUTO",
        "STATE",
    ];
    let mut cells = vec![header.iter().map(|&h| h.to_owned()).collect::<Vec<_>>()];
    for r in rows {
        let state = match (r.state.as_str(), r.pid) {
            ("running", pid) => RunState::Running { pid }.to_string(),
            ("stopped", _) => RunState::Stopped.to_string(),
            _ => "Unknown".to_owned(),
        };
        cells.push(vec![
            r.name.clone(),
            r.datastore.clone(),
            r.loader.clone(),
            r.cpu.clone(),
            r.memory.clone(),
            r.vnc.clone().unwrap_or_default(),
            r.autostart
                .map_or_else(|| "No".to_owned(), |n| format!("Yes [{n}]")),
            state,
        ]);
    }
    table::render(&cells)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_label_prefers_loader_then_uefi() {
        assert_eq!(
            loader_label(&Conf::parse("loader=linux\nuefi=yes\n")),
            "linux"
        );
        assert_eq!(loader_label(&Conf::parse("uefi=\"yes\"\n")), "uefi");
        assert_eq!(loader_label(&Conf::parse("uefi=csm\n")), "uefi-csm");
        assert_eq!(loader_label(&Conf::parse("uefi=no\n")), "none");
        assert_eq!(loader_label(&Conf::parse("loader=\"\"\n")), "none");
    }

    #[test]
    fn table_has_vm_bhyve_columns() {
        let row = ListRow {
            name: "bsd".into(),
            datastore: "default".into(),
            path: "/vm/bsd".into(),
            loader: "uefi".into(),
            cpu: "4".into(),
            memory: "4G".into(),
            vnc: None,
            autostart: Some(1),
            state: "running".into(),
            pid: Some(42),
            errors: vec![],
        };
        let out = render_table(&[row]);
        assert_eq!(
            out,
            "NAME  DATASTORE  LOADER  CPU  MEMORY  VNC  AUTO     STATE\n\
             bsd   default    uefi    4    4G      -    Yes [1]  Running (42)\n"
        );
    }

    #[test]
    fn vnc_endpoint_reads_console_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(vnc_endpoint(dir.path()), None);
        fs::write(
            dir.path().join(CONSOLE_FILE),
            "com1=/dev/pts/3\nvnc=0.0.0.0:5900\n",
        )
        .unwrap();
        assert_eq!(vnc_endpoint(dir.path()).as_deref(), Some("0.0.0.0:5900"));
    }
}
