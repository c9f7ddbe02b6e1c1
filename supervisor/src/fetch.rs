//! The downloader behind `vm iso URL` and `vm img URL`: fetches install media and cloud images
//! into the datastore's `.iso/` and `.img/` directories.
//!
//! [`download`] takes an `http://`, `https://`, `ftp://` or `file://` URL, or a plain local path,
//! and stores the resource in a directory under the last path segment of the URL. With
//! [`Options::decompress`] a `.gz` or `.xz` resource is decompressed on the fly and stored without
//! its suffix.
//!
//! # What is trusted
//!
//! Nothing the server sends.
//! - The file name comes from the URL the caller gave, never from the server (no
//!   `Content-Disposition`, no redirect target). It is percent-decoded and then must be UTF-8, not
//!   empty, not `.` or `..`, free of `/`, NUL and control characters, and at most
//!   [`MAX_NAME_LEN`] bytes (so that the temporary name `.NAME.part` fits in 255).
//! - An existing file is never overwritten: the name is checked before the transfer and the final
//!   rename refuses to replace (`RENAME_NOREPLACE`).
//! - A length the server announces (`Content-Length`, FTP `SIZE`) only feeds the progress total
//!   and the check that the transfer is complete: fewer bytes than announced is an error.
//! - FTP: the data connection goes only to the control connection's peer address; the address a
//!   `PASV` reply names is ignored (the FTP bounce / SSRF safeguard). Reply lines and the number of
//!   lines per reply are bounded. User, password and path never carry CR, LF or NUL into a command.
//! - Compressed data is untrusted input to the decoders: corrupt or truncated data is an error,
//!   and the xz decoder's memory is capped.
//! - Server text shown in an error (HTTP reason, FTP reply) is cut short and stripped of control
//!   characters before it reaches a terminal.
//! - TLS: the webpki root set, plus the certificates in the PEM file named by `CAPVM_CA_FILE` when
//!   that variable is set (meant for tests and private mirrors).
//!
//! # Bounds
//!
//! | what | bound |
//! |---|---|
//! | TCP connect | [`CONNECT_TIMEOUT`] (30 s) per address |
//! | no data received | [`READ_TIMEOUT`] (60 s), then an error |
//! | HTTP redirects | [`MAX_REDIRECTS`] (5) |
//! | FTP reply line | [`ftp::MAX_LINE`] (8 KiB) |
//! | FTP lines per reply | [`ftp::MAX_REPLY_LINES`] (1000) |
//! | xz decoder memory | [`XZ_MEMLIMIT`] (512 MiB) |
//! | size of the result | none but the disk: a full disk is an error like any other |
//!
//! # What it touches
//!
//! Only the destination directory: the hidden temporary `.NAME.part` (created with `O_EXCL`,
//! mode 0644 before the umask), then `NAME` by an atomic rename after `fsync`, so no half file
//! ever carries the final name. On every error, and on SIGINT, SIGTERM or SIGHUP, the temporary
//! file is removed. While a download runs, handlers for those three signals are installed (a
//! signal that was ignored stays ignored); the previous handlers come back afterwards. Progress
//! goes to stderr when asked for. A `SIGKILL` can leave a `.NAME.part` behind; the next download
//! of that name then refuses to start and names the file to remove.
//!
//! Interruption latency: once connected, FTP and local copies notice a signal within a second.
//! HTTP reads notice it at once when the signal lands on the downloading thread (the usual case
//! for the CLI, whose main thread downloads), otherwise with the next data received or at the read
//! timeout. A TCP connect in progress runs to its end or its timeout first.

mod ftp;
mod http;
mod output;
mod progress;
mod signals;

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

use self::output::{Compression, Output, PartFile};
use self::progress::Progress;

pub use self::ftp::FtpError;
pub use self::http::TransportError;

/// Longest accepted file name: 255 minus the 6 bytes `.part` and the leading dot add.
pub const MAX_NAME_LEN: usize = 249;
/// Timeout of each TCP connect attempt.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the next byte from a server.
pub const READ_TIMEOUT: Duration = Duration::from_mins(1);
/// Most HTTP redirects followed.
pub const MAX_REDIRECTS: u32 = 5;
/// Memory the xz decoder may use; `xz -9` streams need 65 MiB.
pub const XZ_MEMLIMIT: u64 = 512 << 20;

/// How [`download`] stores and reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Decompress a `.gz` / `.xz` resource and store it without the suffix (`vm img`).
    pub decompress: bool,
    /// Show progress on stderr: a bar on a terminal, otherwise a line per 10 %.
    pub progress: bool,
}

/// Why a download failed. Whatever the variant, nothing is left in the destination directory.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    // URL errors do not repeat the URL: it may carry a password, and the caller has it.
    #[error("Cannot parse the URL")]
    ParseUrl(#[source] url::ParseError),
    #[error("Unsupported URL scheme {0:?} (use http, https, ftp, file or a local path)")]
    UnsupportedScheme(String),
    #[error("Unusable URL: {0}")]
    InvalidUrl(&'static str),
    #[error("File name {name:?} from the URL is unusable: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("{0} already exists")]
    Exists(PathBuf),
    #[error(
        "Partial download {0} exists: another download of it is running, or a killed one left it \
         (remove it to retry)"
    )]
    PartialExists(PathBuf),
    #[error("Cannot open destination directory {path}")]
    OpenDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot create {path}")]
    CreateTemp {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot flush {path} to disk")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot rename {from} to {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot open {path}")]
    OpenSource {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a regular file")]
    NotRegularFile(PathBuf),
    #[error("Cannot read {path}")]
    ReadSource {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot load the extra trust anchors from CAPVM_CA_FILE={path}")]
    LoadCaFile {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("CAPVM_CA_FILE={path} holds a certificate that is no usable trust anchor")]
    AddCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("CAPVM_CA_FILE={0} holds no certificate")]
    NoCa(PathBuf),
    #[error("Cannot set up TLS")]
    Tls(#[source] rustls::Error),
    #[error("HTTP request failed")]
    HttpRequest(#[source] TransportError),
    #[error("Server answered HTTP {code} {reason}")]
    HttpStatus { code: u16, reason: String },
    #[error("Reading the HTTP body failed")]
    HttpBody(#[source] io::Error),
    #[error("FTP transfer failed")]
    Ftp(#[from] FtpError),
    #[error("Cannot set up the xz decoder")]
    XzInit(#[source] xz2::stream::Error),
    #[error("Decompressing failed (corrupt or truncated data)")]
    Decompress(#[source] io::Error),
    #[error("Transfer ended after {received} of {expected} announced bytes")]
    Truncated { received: u64, expected: u64 },
    #[error("Cannot install the signal handlers")]
    Signals(#[source] nix::Error),
    #[error("Download interrupted by a signal")]
    Interrupted,
}

/// Downloads `url` into `dest_dir` and returns the path of the stored file.
///
/// The name is the URL's last path segment (without `.gz` / `.xz` when `opts.decompress`); an
/// existing file of that name is an error. See the module documentation for what is checked.
pub fn download(url: &str, dest_dir: &Path, opts: &Options) -> Result<PathBuf, FetchError> {
    let location = Location::parse(url)?;
    let remote_name = location.file_name()?;
    let (name, compression) = stored_name(&remote_name, opts.decompress)?;
    let target = dest_dir.join(&name);
    if target.symlink_metadata().is_ok() {
        return Err(FetchError::Exists(target));
    }

    let _signals = signals::install().map_err(FetchError::Signals)?;
    let result = fetch_into(&location, dest_dir, &name, compression, opts.progress);
    match result {
        Err(_) if signals::caught() => Err(FetchError::Interrupted),
        Err(e) => Err(e),
        Ok(path) => {
            tracing::info!(source = %location, path = %path.display(), "download complete");
            Ok(path)
        }
    }
}

fn fetch_into(
    location: &Location,
    dest_dir: &Path,
    name: &str,
    compression: Compression,
    show_progress: bool,
) -> Result<PathBuf, FetchError> {
    let (part, file) = PartFile::create(dest_dir, name)?;
    let mut output = Output::new(file, part.temp_path(), compression)?;
    let mut source = location.open()?;
    let mut progress = Progress::start(name, source.expected_len(), show_progress);
    let copied = copy(&mut source, &mut output, &mut progress);
    progress.finish(copied.is_ok());
    copied?;
    let file = output.finish()?;
    part.commit(file)
}

/// Moves the bytes from `source` into `output`, checking for signals between reads.
fn copy(
    source: &mut Source,
    output: &mut Output,
    progress: &mut Progress,
) -> Result<(), FetchError> {
    let mut buf = vec![0u8; 128 * 1024];
    let mut received: u64 = 0;
    loop {
        if signals::caught() {
            return Err(FetchError::Interrupted);
        }
        let n = source.read(&mut buf)?;
        if n == 0 {
            break;
        }
        // `Read` promises n <= buf.len(); the fallback only avoids a panic path.
        let chunk = buf.get(..n).unwrap_or(&buf);
        received = received.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        output.write_all(chunk)?;
        progress.advance(received);
    }
    source.finish()?;
    match source.expected_len() {
        Some(expected) if received < expected => Err(FetchError::Truncated { received, expected }),
        _ => Ok(()),
    }
}

/// Where the bytes come from, as the caller named it.
#[derive(Debug)]
enum Location {
    Http(Url),
    Ftp(Url),
    Local(PathBuf),
}

/// Shown in logs without a password.
impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Http(url) | Location::Ftp(url) => {
                let mut shown = url.clone();
                if shown.password().is_some() {
                    let _ = shown.set_password(Some("***"));
                }
                write!(f, "{shown}")
            }
            Location::Local(path) => write!(f, "{}", path.display()),
        }
    }
}

impl Location {
    fn parse(input: &str) -> Result<Self, FetchError> {
        if !input.contains("://") {
            return Ok(Location::Local(PathBuf::from(input)));
        }
        let url = Url::parse(input).map_err(FetchError::ParseUrl)?;
        match url.scheme() {
            "http" | "https" => Ok(Location::Http(url)),
            "ftp" => Ok(Location::Ftp(url)),
            "file" => {
                let path = url.to_file_path().map_err(|()| {
                    FetchError::InvalidUrl("a file URL must name a local absolute path")
                })?;
                Ok(Location::Local(path))
            }
            other => Err(FetchError::UnsupportedScheme(other.to_owned())),
        }
    }

    /// The last path segment, percent-decoded and validated.
    fn file_name(&self) -> Result<String, FetchError> {
        let raw = match self {
            Location::Http(url) | Location::Ftp(url) => {
                let segment = url
                    .path_segments()
                    .and_then(|mut s| s.next_back())
                    .unwrap_or("");
                let segment = if matches!(self, Location::Ftp(_)) {
                    ftp::strip_type_suffix(segment)
                } else {
                    segment
                };
                let bytes = percent_decode(segment);
                String::from_utf8(bytes).map_err(|e| FetchError::InvalidName {
                    name: String::from_utf8_lossy(e.as_bytes()).into_owned(),
                    reason: "not UTF-8",
                })?
            }
            Location::Local(path) => match path.file_name() {
                Some(name) => name
                    .to_str()
                    .ok_or_else(|| FetchError::InvalidName {
                        name: name.to_string_lossy().into_owned(),
                        reason: "not UTF-8",
                    })?
                    .to_owned(),
                None => String::new(),
            },
        };
        validate_name(&raw)?;
        Ok(raw)
    }

    fn open(&self) -> Result<Source, FetchError> {
        match self {
            Location::Http(url) => {
                let (body, length) = http::get(url)?;
                Ok(Source::Http { body, length })
            }
            Location::Ftp(url) => Ok(Source::Ftp(ftp::retrieve(url)?)),
            Location::Local(path) => {
                let file = File::open(path).map_err(|source| FetchError::OpenSource {
                    path: path.clone(),
                    source,
                })?;
                let meta = file.metadata().map_err(|source| FetchError::OpenSource {
                    path: path.clone(),
                    source,
                })?;
                if !meta.is_file() {
                    return Err(FetchError::NotRegularFile(path.clone()));
                }
                Ok(Source::Local {
                    file,
                    path: path.clone(),
                    length: meta.len(),
                })
            }
        }
    }
}

/// An open transfer.
enum Source {
    Http {
        body: Box<dyn Read + Send + Sync>,
        length: Option<u64>,
    },
    Ftp(ftp::Retrieval),
    Local {
        file: File,
        path: PathBuf,
        length: u64,
    },
}

impl Source {
    fn expected_len(&self) -> Option<u64> {
        match self {
            Source::Http { length, .. } => *length,
            Source::Ftp(retrieval) => retrieval.size(),
            Source::Local { length, .. } => Some(*length),
        }
    }

    /// Reads the next bytes; 0 at the end. A read cut short by a signal is retried unless the
    /// signal asked to stop.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, FetchError> {
        loop {
            let result = match self {
                Source::Ftp(retrieval) => return Ok(retrieval.read(buf)?),
                Source::Http { body, length } => match body.read(buf) {
                    // With a Content-Length, ureq reports a short body as UnexpectedEof; the
                    // length check after the loop turns it into `Truncated` with the numbers.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && length.is_some() => Ok(0),
                    other => other.map_err(FetchError::HttpBody),
                },
                Source::Local { file, path, .. } => {
                    file.read(buf).map_err(|source| FetchError::ReadSource {
                        path: path.clone(),
                        source,
                    })
                }
            };
            match result {
                Err(FetchError::HttpBody(e) | FetchError::ReadSource { source: e, .. })
                    if e.kind() == io::ErrorKind::Interrupted && !signals::caught() => {}
                other => return other,
            }
        }
    }

    /// Completes the transfer after the last byte (FTP: the server's final reply).
    fn finish(&mut self) -> Result<(), FetchError> {
        match self {
            Source::Ftp(retrieval) => Ok(retrieval.finish()?),
            Source::Http { .. } | Source::Local { .. } => Ok(()),
        }
    }
}

/// The name to store under and the decoder to use.
fn stored_name(remote: &str, decompress: bool) -> Result<(String, Compression), FetchError> {
    if !decompress {
        return Ok((remote.to_owned(), Compression::None));
    }
    let (stem, compression) = if let Some(stem) = strip_suffix_ignore_case(remote, ".gz") {
        (stem, Compression::Gzip)
    } else if let Some(stem) = strip_suffix_ignore_case(remote, ".xz") {
        (stem, Compression::Xz)
    } else {
        return Ok((remote.to_owned(), Compression::None));
    };
    validate_name(stem)?;
    Ok((stem.to_owned(), compression))
}

fn strip_suffix_ignore_case<'a>(name: &'a str, suffix: &str) -> Option<&'a str> {
    let cut = name.len().checked_sub(suffix.len())?;
    let tail = name.get(cut..)?;
    tail.eq_ignore_ascii_case(suffix)
        .then(|| name.get(..cut))
        .flatten()
}

fn validate_name(name: &str) -> Result<(), FetchError> {
    let reason = if name.is_empty() {
        "empty (the URL must end in a file name)"
    } else if name == "." || name == ".." {
        "a directory reference"
    } else if name.contains('/') {
        "contains '/'"
    } else if name.contains('\0') {
        "contains NUL"
    } else if name.chars().any(char::is_control) {
        "contains a control character"
    } else if name.len() > MAX_NAME_LEN {
        "longer than 249 bytes"
    } else {
        return Ok(());
    };
    Err(FetchError::InvalidName {
        name: name.to_owned(),
        reason,
    })
}

/// Decodes `%XX` escapes; a `%` not followed by two hex digits stays as it is.
fn percent_decode(input: &str) -> Vec<u8> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'%'
            && let [hi, lo, after @ ..] = tail
            && let (Some(hi), Some(lo)) = (hex_value(*hi), hex_value(*lo))
        {
            out.push(hi << 4 | lo);
            rest = after;
            continue;
        }
        out.push(first);
        rest = tail;
    }
    out
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|v| u8::try_from(v).ok())
}

/// Server text made safe to print: at most 200 characters, control characters replaced.
fn printable(text: &str) -> String {
    text.chars()
        .take(200)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_of_http_url_is_its_last_segment_percent_decoded() {
        let location = Location::parse("https://example.org/pub/my%20image.iso?x=1#frag").unwrap();

        assert_eq!(location.file_name().unwrap(), "my image.iso");
    }

    #[test]
    fn url_ending_in_slash_has_no_name() {
        let location = Location::parse("http://example.org/pub/").unwrap();

        assert!(matches!(
            location.file_name(),
            Err(FetchError::InvalidName { .. })
        ));
    }

    #[test]
    fn url_without_path_has_no_name() {
        let location = Location::parse("http://example.org").unwrap();

        assert!(matches!(
            location.file_name(),
            Err(FetchError::InvalidName { .. })
        ));
    }

    #[test]
    fn encoded_slash_in_last_segment_is_rejected() {
        let location = Location::parse("http://example.org/a%2F..%2Fetc").unwrap();

        assert!(matches!(
            location.file_name(),
            Err(FetchError::InvalidName { .. })
        ));
    }

    #[test]
    fn encoded_dot_dot_is_rejected() {
        let location = Location::parse("http://example.org/a/%2E%2E").unwrap();

        assert!(matches!(
            location.file_name(),
            Err(FetchError::InvalidName { .. })
        ));
    }

    #[test]
    fn encoded_nul_and_newline_are_rejected() {
        for url in ["http://example.org/a%00b", "http://example.org/a%0Ab"] {
            let location = Location::parse(url).unwrap();

            assert!(
                matches!(location.file_name(), Err(FetchError::InvalidName { .. })),
                "{url}"
            );
        }
    }

    #[test]
    fn invalid_utf8_name_is_rejected() {
        let location = Location::parse("http://example.org/%FF%FE").unwrap();

        assert!(matches!(
            location.file_name(),
            Err(FetchError::InvalidName {
                reason: "not UTF-8",
                ..
            })
        ));
    }

    #[test]
    fn name_of_249_bytes_passes_and_250_fails() {
        let ok = format!("http://example.org/{}", "a".repeat(249));
        let long = format!("http://example.org/{}", "a".repeat(250));

        assert_eq!(
            Location::parse(&ok).unwrap().file_name().unwrap().len(),
            249
        );
        assert!(matches!(
            Location::parse(&long).unwrap().file_name(),
            Err(FetchError::InvalidName { .. })
        ));
    }

    #[test]
    fn ftp_type_suffix_is_not_part_of_the_name() {
        let location = Location::parse("ftp://example.org/pub/disk.img;type=i").unwrap();

        assert_eq!(location.file_name().unwrap(), "disk.img");
    }

    #[test]
    fn plain_path_and_file_url_are_local() {
        let plain = Location::parse("/srv/media/x.iso").unwrap();
        let file = Location::parse("file:///srv/media/y%20z.iso").unwrap();

        assert!(matches!(&plain, Location::Local(p) if p == Path::new("/srv/media/x.iso")));
        assert!(matches!(&file, Location::Local(p) if p == Path::new("/srv/media/y z.iso")));
        assert_eq!(file.file_name().unwrap(), "y z.iso");
    }

    #[test]
    fn file_url_with_remote_host_is_rejected() {
        assert!(matches!(
            Location::parse("file://elsewhere.example/x.iso"),
            Err(FetchError::InvalidUrl(_))
        ));
    }

    #[test]
    fn location_is_logged_without_password() {
        let location = Location::parse("ftp://alice:s3cret@example.org/x.iso").unwrap();

        assert_eq!(location.to_string(), "ftp://alice:***@example.org/x.iso");
    }

    #[test]
    fn unknown_scheme_is_rejected() {
        assert!(matches!(
            Location::parse("gopher://example.org/x.iso"),
            Err(FetchError::UnsupportedScheme(s)) if s == "gopher"
        ));
    }

    #[test]
    fn decompress_strips_gz_and_xz_suffixes_case_insensitively() {
        let (gz, gz_kind) = stored_name("disk.img.gz", true).unwrap();
        let (xz, xz_kind) = stored_name("disk.raw.XZ", true).unwrap();

        assert_eq!((gz.as_str(), gz_kind), ("disk.img", Compression::Gzip));
        assert_eq!((xz.as_str(), xz_kind), ("disk.raw", Compression::Xz));
    }

    #[test]
    fn without_decompress_suffix_is_kept() {
        let (name, kind) = stored_name("disk.img.xz", false).unwrap();

        assert_eq!((name.as_str(), kind), ("disk.img.xz", Compression::None));
    }

    #[test]
    fn decompressing_a_bare_suffix_leaves_no_name() {
        assert!(matches!(
            stored_name(".xz", true),
            Err(FetchError::InvalidName { .. })
        ));
    }

    #[test]
    fn percent_decode_keeps_malformed_escapes() {
        assert_eq!(percent_decode("a%41%4"), b"aA%4");
        assert_eq!(percent_decode("%zz%"), b"%zz%");
        assert_eq!(percent_decode("%e2%82%AC"), "€".as_bytes());
    }

    #[test]
    fn printable_replaces_control_characters_and_cuts_long_text() {
        let text = format!("bad\x1b[31m{}", "x".repeat(500));

        let shown = printable(&text);

        assert!(shown.starts_with("bad?[31m"));
        assert_eq!(shown.chars().count(), 200);
    }
}
