//! A guest's `vm-bhyve.log`: one line per lifecycle event, in vm-bhyve's format
//! (`Nov 27 03:04:05: starting vcpu-runner (pid 4242)`), local time.
//!
//! The only `unsafe` here is `localtime_r`, which the standard library does not offer; it is
//! fenced in [`local_time`].

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The log file in each guest directory, as vm-bhyve names it.
pub const LOG_FILE: &str = "vm-bhyve.log";

/// Why the log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("opening {path} failed")]
pub struct VmLogError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

/// An open `vm-bhyve.log`, appended to.
#[derive(Debug)]
pub struct VmLog {
    file: File,
}

impl VmLog {
    /// Opens (creating if needed) `GUEST_DIR/vm-bhyve.log` for appending.
    pub fn open(guest_dir: &Path) -> Result<VmLog, VmLogError> {
        let path = guest_dir.join(LOG_FILE);
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| VmLogError { path, source })?;
        Ok(VmLog { file })
    }

    /// Appends one timestamped line. A failed write is not fatal to the guest; it is traced.
    pub fn line(&mut self, message: &str) {
        let text = format!("{}: {message}\n", timestamp(SystemTime::now()));
        if let Err(e) = self.file.write_all(text.as_bytes()) {
            tracing::warn!(error = %e, "writing vm-bhyve.log failed");
        }
    }

    /// Another handle on the same file (for a child's stderr, say).
    pub fn try_clone(&self) -> io::Result<File> {
        self.file.try_clone()
    }
}

/// Local broken-down time: (month 1..=12, day, hour, minute, second, seconds east of UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub offset_secs: i32,
}

/// `when` in the host's local time zone; UTC fields if the conversion fails.
pub fn local_time(when: SystemTime) -> LocalTime {
    let secs = when.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let t = libc::time_t::try_from(secs).unwrap_or(0);
    // SAFETY: `tm` is plain data for which all-zero bytes are a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers refer to live, properly aligned locals for the whole call;
    // localtime_r writes only into `tm` and is thread-safe.
    let ok = !unsafe { libc::localtime_r(&raw const t, &raw mut tm) }.is_null();
    if !ok {
        let day_secs = secs % 86_400;
        return LocalTime {
            month: 1,
            day: 1,
            hour: u32::try_from(day_secs / 3600).unwrap_or(0),
            minute: u32::try_from(day_secs % 3600 / 60).unwrap_or(0),
            second: u32::try_from(day_secs % 60).unwrap_or(0),
            offset_secs: 0,
        };
    }
    let field = |v: libc::c_int| u32::try_from(v).unwrap_or(0);
    LocalTime {
        month: field(tm.tm_mon).saturating_add(1),
        day: field(tm.tm_mday),
        hour: field(tm.tm_hour),
        minute: field(tm.tm_min),
        second: field(tm.tm_sec),
        offset_secs: i32::try_from(tm.tm_gmtoff).unwrap_or(0),
    }
}

/// vm-bhyve's log timestamp, `date "+%b %d %T"`: `Nov 27 03:04:05`.
pub fn timestamp(when: SystemTime) -> String {
    format_timestamp(&local_time(when))
}

fn format_timestamp(t: &LocalTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = usize::try_from(t.month.saturating_sub(1))
        .ok()
        .and_then(|i| MONTHS.get(i))
        .copied()
        .unwrap_or("???");
    format!(
        "{month} {:02} {:02}:{:02}:{:02}",
        t.day, t.hour, t.minute, t.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_has_vm_bhyve_layout() {
        let t = LocalTime {
            month: 11,
            day: 7,
            hour: 3,
            minute: 4,
            second: 5,
            offset_secs: 0,
        };
        assert_eq!(format_timestamp(&t), "Nov 07 03:04:05");
    }

    #[test]
    fn lines_are_appended_with_a_timestamp() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOG_FILE), "old line\n").unwrap();
        let mut log = VmLog::open(dir.path()).unwrap();
        log.line("initialising");
        let text = std::fs::read_to_string(dir.path().join(LOG_FILE)).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], "old line");
        assert!(lines[1].ends_with(": initialising"), "{text}");
        assert_eq!(lines[1].len(), "Nov 07 03:04:05: initialising".len());
    }
}
