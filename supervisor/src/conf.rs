//! The sh-style `key="value"` file format vm-bhyve uses for `/etc/vm.conf`, `system.conf`,
//! templates and guest configs.
//!
//! vm-bhyve does not run these files through sh; it reads them with
//! `grep '^[a-z]' | awk -F# '{print $1}' | sed -e 's@ *$@@' | tr -d '"'` and takes the first
//! line whose text before the first `=` equals the key. This module reproduces that reading:
//!
//! - only lines that start with a letter count (an indented line is ignored),
//! - everything from the first `#` on is a comment, even inside quotes,
//! - trailing blanks are dropped, then every `"` is removed,
//! - the key is the text before the first `=`, the value everything after it,
//! - the first occurrence of a key wins.
//!
//! A `\r` before the newline is dropped too, so files edited on Windows read the same.
//! Reading never fails on content: any text gives a [`Conf`]. Only I/O and the size cap
//! ([`MAX_CONF_BYTES`]) are errors.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The largest config file read; vm-bhyve configs are a few hundred bytes.
pub const MAX_CONF_BYTES: u64 = 1 << 20;

/// Why a config file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    #[error("reading {path} failed")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is larger than {MAX_CONF_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("writing {path} failed")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{key:?} cannot be written as a config key (letters, digits, '_', '.', '-' only)")]
    UnwritableKey { key: String },
    #[error(
        "{key}: value {value:?} cannot be written: it contains '\"', '#', '\\', '$', '`' or a line break"
    )]
    UnwritableValue { key: String, value: String },
}

/// A finding about one line of a config file: `file:line: key: message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.key,
            self.message
        )
    }
}

/// One `key=value` line as vm-bhyve reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: String,
    /// 1-based line number in the file.
    pub line: usize,
}

/// A parsed config file: every `key=value` line in file order, with first-occurrence lookup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conf {
    entries: Vec<Entry>,
    first: HashMap<String, usize>,
    stray_lines: Vec<(usize, String)>,
}

impl Conf {
    /// Reads `text` the way vm-bhyve does. Never fails.
    pub fn parse(text: &str) -> Self {
        let mut conf = Conf::default();
        for (index, raw) in text.split('\n').enumerate() {
            let line = index.saturating_add(1);
            match parse_line(raw) {
                LineKind::Ignored => {}
                LineKind::Stray(text) => conf.stray_lines.push((line, text)),
                LineKind::Entry(key, value) => {
                    let position = conf.entries.len();
                    conf.first.entry(key.clone()).or_insert(position);
                    conf.entries.push(Entry { key, value, line });
                }
            }
        }
        conf
    }

    /// Reads and parses the file at `path` (bytes that are not UTF-8 are replaced).
    pub fn load(path: &Path) -> Result<Self, ConfError> {
        read_capped(path).map(|text| Conf::parse(&text))
    }

    /// Like [`Conf::load`], but a missing file is an empty config.
    pub fn load_if_exists(path: &Path) -> Result<Self, ConfError> {
        match read_capped(path) {
            Ok(text) => Ok(Conf::parse(&text)),
            Err(ConfError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(Conf::default())
            }
            Err(e) => Err(e),
        }
    }

    /// The value of the first line that sets `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entry(key).map(|e| e.value.as_str())
    }

    /// The first line that sets `key`.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.first.get(key).and_then(|&i| self.entries.get(i))
    }

    /// Every `key=value` line in file order, later duplicates included.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The line that wins for each key, in file order.
    pub fn effective_entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(i, e)| self.first.get(&e.key) == Some(i))
            .map(|(_, e)| e)
    }

    /// Lines that start with a letter but have no `=` (line number, text as read); vm-bhyve
    /// never matches them against a key.
    pub fn stray_lines(&self) -> &[(usize, String)] {
        &self.stray_lines
    }
}

enum LineKind {
    Ignored,
    Stray(String),
    Entry(String, String),
}

fn parse_line(raw: &str) -> LineKind {
    let raw = raw.strip_suffix('\r').unwrap_or(raw);
    if !raw.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return LineKind::Ignored;
    }
    let uncommented = raw.split('#').next().unwrap_or_default();
    let trimmed = uncommented.trim_end_matches([' ', '\t', '\r']);
    let unquoted: String = trimmed.chars().filter(|&c| c != '"').collect();
    match unquoted.split_once('=') {
        Some((key, value)) => LineKind::Entry(key.to_owned(), value.to_owned()),
        None => LineKind::Stray(unquoted),
    }
}

/// Reads a file of at most [`MAX_CONF_BYTES`], replacing bytes that are not UTF-8.
pub fn read_capped(path: &Path) -> Result<String, ConfError> {
    let read_err = |source| ConfError::Read {
        path: path.to_owned(),
        source,
    };
    let file = fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_CONF_BYTES.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_CONF_BYTES {
        return Err(ConfError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Whether `key` may be written: letters, digits, `_`, `.` and `-`, starting with a letter.
pub fn is_writable_key(key: &str) -> bool {
    key.starts_with(|c: char| c.is_ascii_alphabetic())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Whether `value` survives a write and a re-read unchanged, and is inert inside sh double
/// quotes (vm-bhyve's files are also sourced by rc scripts).
pub fn is_writable_value(value: &str) -> bool {
    !value.contains(['"', '#', '\\', '$', '`', '\n', '\r'])
}

/// Formats one `key="value"` line (without the newline).
pub fn format_line(key: &str, value: &str) -> Result<String, ConfError> {
    if !is_writable_key(key) {
        return Err(ConfError::UnwritableKey {
            key: key.to_owned(),
        });
    }
    if !is_writable_value(value) {
        return Err(ConfError::UnwritableValue {
            key: key.to_owned(),
            value: value.to_owned(),
        });
    }
    Ok(format!("{key}=\"{value}\""))
}

/// Returns `text` with `key` set to `value`, like `sysrc -f`: the line that vm-bhyve reads
/// for `key` is replaced, or a line is appended (after a newline if the text lacks one).
pub fn set_value(text: &str, key: &str, value: &str) -> Result<String, ConfError> {
    let new_line = format_line(key, value)?;
    let mut out =
        String::with_capacity(text.len().saturating_add(new_line.len()).saturating_add(1));
    let mut replaced = false;
    for piece in text.split_inclusive('\n') {
        if !replaced && line_sets_key(piece, key) {
            out.push_str(&new_line);
            out.push('\n');
            replaced = true;
        } else {
            out.push_str(piece);
        }
    }
    if !replaced {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&new_line);
        out.push('\n');
    }
    Ok(out)
}

/// Returns `text` without any line that sets `key`, like `sysrc -x`.
pub fn remove_key(text: &str, key: &str) -> String {
    text.split_inclusive('\n')
        .filter(|piece| !line_sets_key(piece, key))
        .collect()
}

fn line_sets_key(piece: &str, key: &str) -> bool {
    let line = piece.strip_suffix('\n').unwrap_or(piece);
    matches!(parse_line(line), LineKind::Entry(k, _) if k == key)
}

/// Rewrites the file at `path` through `edit`, atomically (a temporary file in the same
/// directory, then `rename`). A missing file is edited as empty text.
pub fn update_file(
    path: &Path,
    edit: impl FnOnce(&str) -> Result<String, ConfError>,
) -> Result<(), ConfError> {
    let old = match read_capped(path) {
        Ok(text) => text,
        Err(ConfError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            String::new()
        }
        Err(e) => return Err(e),
    };
    let new = edit(&old)?;
    write_atomic(path, new.as_bytes())
}

/// Writes `bytes` to `path` through a temporary file and `rename`, so readers see the old or
/// the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ConfError> {
    let write_err = |source| ConfError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_and_unquoted_values_read_the_same() {
        let conf = Conf::parse("cpu=4\nmemory=\"4G\"\n");
        assert_eq!(conf.get("cpu"), Some("4"));
        assert_eq!(conf.get("memory"), Some("4G"));
    }

    #[test]
    fn comment_lines_and_trailing_comments_are_dropped() {
        let conf = Conf::parse("# a comment\ncpu=\"2\" # two cpus\nmemory=1G#tight\n");
        assert_eq!(conf.get("cpu"), Some("2"));
        assert_eq!(conf.get("memory"), Some("1G"));
        assert_eq!(conf.entries().len(), 2);
    }

    #[test]
    fn hash_inside_quotes_still_starts_a_comment() {
        let conf = Conf::parse("linux_cmdline=\"console=ttyS0 # quiet\"\n");
        assert_eq!(conf.get("linux_cmdline"), Some("console=ttyS0"));
    }

    #[test]
    fn lines_not_starting_with_a_letter_are_ignored() {
        let conf = Conf::parse(" cpu=1\n\tcpu=2\n_cpu=3\n1cpu=4\n=5\n\ncpu=6\n");
        assert_eq!(conf.get("cpu"), Some("6"));
        assert_eq!(conf.entries().len(), 1);
    }

    #[test]
    fn first_occurrence_wins() {
        let conf = Conf::parse("cpu=1\ncpu=2\n");
        assert_eq!(conf.get("cpu"), Some("1"));
        assert_eq!(conf.entry("cpu").map(|e| e.line), Some(1));
        assert_eq!(conf.entries().len(), 2);
        assert_eq!(conf.effective_entries().count(), 1);
    }

    #[test]
    fn empty_values_are_present_but_empty() {
        let conf = Conf::parse("loader=\"\"\nuuid=\n");
        assert_eq!(conf.get("loader"), Some(""));
        assert_eq!(conf.get("uuid"), Some(""));
        assert_eq!(conf.get("cpu"), None);
    }

    #[test]
    fn spaces_around_equals_become_part_of_key_or_value() {
        let conf = Conf::parse("cpu = 4\nmemory= 1G   \n");
        assert_eq!(conf.get("cpu"), None);
        assert_eq!(conf.get("cpu "), Some(" 4"));
        assert_eq!(conf.get("memory"), Some(" 1G"));
    }

    #[test]
    fn value_keeps_later_equals_signs() {
        let conf = Conf::parse("linux_cmdline=\"root=/dev/vda1 ro\"\n");
        assert_eq!(conf.get("linux_cmdline"), Some("root=/dev/vda1 ro"));
    }

    #[test]
    fn crlf_line_endings_read_like_lf() {
        let conf = Conf::parse("cpu=2\r\nmemory=\"1G\"\r\n");
        assert_eq!(conf.get("cpu"), Some("2"));
        assert_eq!(conf.get("memory"), Some("1G"));
    }

    #[test]
    fn line_without_equals_is_stray() {
        let conf = Conf::parse("cpu=1\ngraphics\n");
        assert_eq!(conf.stray_lines(), &[(2, "graphics".to_owned())]);
        assert_eq!(conf.get("graphics"), None);
    }

    #[test]
    fn line_numbers_count_every_line() {
        let conf = Conf::parse("\n# x\n\ncpu=1\n");
        assert_eq!(conf.entry("cpu").map(|e| e.line), Some(4));
    }

    #[test]
    fn set_value_replaces_the_effective_line_in_place() {
        let text = "# t\ncpu=1\nmemory=1G\ncpu=9\n";
        let out = set_value(text, "cpu", "4").unwrap();
        assert_eq!(out, "# t\ncpu=\"4\"\nmemory=1G\ncpu=9\n");
    }

    #[test]
    fn set_value_appends_after_missing_newline() {
        let out = set_value("cpu=1", "uuid", "abc").unwrap();
        assert_eq!(out, "cpu=1\nuuid=\"abc\"\n");
        assert_eq!(set_value("", "a", "b").unwrap(), "a=\"b\"\n");
    }

    #[test]
    fn set_value_refuses_a_value_that_would_not_read_back() {
        assert!(matches!(
            set_value("", "linux_cmdline", "a # b"),
            Err(ConfError::UnwritableValue { .. })
        ));
        assert!(matches!(
            set_value("", "bad key", "x"),
            Err(ConfError::UnwritableKey { .. })
        ));
    }

    #[test]
    fn remove_key_drops_every_line_for_the_key() {
        let out = remove_key("a=1\ndisk0_size=2\nb=3\ndisk0_size=4", "disk0_size");
        assert_eq!(out, "a=1\nb=3\n");
    }

    #[test]
    fn load_of_an_oversized_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.conf");
        let big = vec![b'a'; usize::try_from(MAX_CONF_BYTES).unwrap() + 1];
        fs::write(&path, big).unwrap();
        assert!(matches!(Conf::load(&path), Err(ConfError::TooLarge { .. })));
    }

    #[test]
    fn load_of_invalid_utf8_replaces_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.conf");
        fs::write(&path, b"cpu=\xff2\n").unwrap();
        let conf = Conf::load(&path).unwrap();
        assert_eq!(conf.get("cpu"), Some("\u{fffd}2"));
    }

    #[test]
    fn load_if_exists_of_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let conf = Conf::load_if_exists(&dir.path().join("none")).unwrap();
        assert!(conf.entries().is_empty());
    }

    #[test]
    fn update_file_creates_and_edits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("system.conf");
        update_file(&path, |t| set_value(t, "datastore_list", "a")).unwrap();
        update_file(&path, |t| set_value(t, "path_a", "/x")).unwrap();
        let conf = Conf::load(&path).unwrap();
        assert_eq!(conf.get("datastore_list"), Some("a"));
        assert_eq!(conf.get("path_a"), Some("/x"));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn key() -> impl Strategy<Value = String> {
            "[a-z][a-z0-9_]{0,12}"
        }

        fn value() -> impl Strategy<Value = String> {
            // Anything writable, '=' and blanks included: the closing quote protects
            // trailing blanks from the trim.
            "[A-Za-z0-9 =:/,._-]{0,20}"
        }

        proptest! {
            #[test]
            fn parse_never_panics(text in any::<String>()) {
                let conf = Conf::parse(&text);
                for e in conf.entries() {
                    prop_assert!(e.line >= 1);
                    prop_assert!(!e.key.contains('"'));
                    prop_assert!(!e.value.contains('#'));
                }
            }

            #[test]
            fn parse_never_panics_on_config_like_text(
                lines in proptest::collection::vec("[a-z \t#\"=\r0-9]{0,30}", 0..30)
            ) {
                let text = lines.join("\n");
                let conf = Conf::parse(&text);
                prop_assert!(conf.effective_entries().count() <= conf.entries().len());
            }

            #[test]
            fn written_configs_read_back(
                pairs in proptest::collection::vec((key(), value()), 0..20),
                comments in proptest::collection::vec(any::<bool>(), 20),
            ) {
                let mut text = String::new();
                for (i, (k, v)) in pairs.iter().enumerate() {
                    if comments.get(i).copied().unwrap_or(false) {
                        text.push_str("# comment = \"x\"\n   indented=1\n");
                    }
                    text.push_str(&format_line(k, v).unwrap());
                    text.push_str(" # trailing\n");
                }
                let conf = Conf::parse(&text);
                prop_assert_eq!(conf.entries().len(), pairs.len());
                for (k, _) in &pairs {
                    let expected = pairs.iter().find(|(k2, _)| k2 == k).map(|(_, v)| v.as_str());
                    prop_assert_eq!(conf.get(k), expected);
                }
            }

            #[test]
            fn set_value_then_get_returns_it(
                pairs in proptest::collection::vec((key(), value()), 0..10),
                k in key(),
                v in value(),
            ) {
                let mut text = String::new();
                for (k2, v2) in &pairs {
                    text.push_str(&format_line(k2, v2).unwrap());
                    text.push('\n');
                }
                let out = set_value(&text, &k, &v).unwrap();
                let conf = Conf::parse(&out);
                prop_assert_eq!(conf.get(&k), Some(v.as_str()));
                for (k2, _) in &pairs {
                    if k2 != &k {
                        let before = Conf::parse(&text);
                        prop_assert_eq!(conf.get(k2), before.get(k2));
                    }
                }
            }
        }
    }
}
