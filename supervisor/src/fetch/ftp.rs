//! A passive-mode FTP client for one retrieval: RFC 959 (replies, USER/PASS, TYPE, CWD, PASV,
//! RETR), RFC 2428 (EPSV) and RFC 3659 (SIZE), with the URL form of RFC 1738 §3.2.
//!
//! The server is hostile: replies are read line by line with a bounded line length and a bounded
//! number of lines, the data connection goes only to the control connection's peer (a PASV
//! reply's address is ignored — the FTP bounce / SSRF safeguard), and no argument taken from the
//! URL may carry CR, LF or NUL into a command. Sockets read in one-second slices so that a stop
//! signal is seen within a second, while a server may stay silent for up to
//! [`READ_TIMEOUT`](super::READ_TIMEOUT).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use url::Url;

use super::{CONNECT_TIMEOUT, READ_TIMEOUT, percent_decode, printable, signals};

/// Longest reply line accepted, CRLF included.
pub const MAX_LINE: usize = 8192;
/// Most lines in one (multi-line) reply.
pub const MAX_REPLY_LINES: usize = 1000;
/// "120 Service ready in nnn minutes" replies tolerated before the greeting.
const MAX_PRELIMINARY: usize = 3;
/// How long one blocking read waits before the signal flag is checked again.
const POLL_SLICE: Duration = Duration::from_secs(1);

/// Why an FTP retrieval failed.
#[derive(Debug, thiserror::Error)]
pub enum FtpError {
    #[error("Unusable FTP URL: {0}")]
    Url(&'static str),
    #[error("Cannot resolve {host}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot connect to {host}")]
    Connect {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot send {command}")]
    Send {
        command: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("Cannot read from the server")]
    Receive(#[source] io::Error),
    #[error("No data from the server for {} s", READ_TIMEOUT.as_secs())]
    TimedOut,
    #[error("Server closed the control connection")]
    Closed,
    #[error("Server sent a reply line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("Server sent a reply of more than {MAX_REPLY_LINES} lines")]
    TooManyLines,
    #[error("Server sent a malformed reply {0:?}")]
    Malformed(String),
    #[error("Server refused {command}: {code} {text}")]
    Refused {
        command: &'static str,
        code: u16,
        text: String,
    },
    #[error("Cannot parse the passive-mode reply {0:?}")]
    Passive(String),
    #[error("Cannot open the data connection to {addr}")]
    DataConnect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("Interrupted by a signal")]
    Interrupted,
}

/// What the URL asks for.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    user: String,
    password: String,
    dirs: Vec<String>,
    file: String,
}

/// A running retrieval: read the file's bytes, then [`Retrieval::finish`].
#[derive(Debug)]
pub(super) struct Retrieval {
    control: Control,
    data: Option<TcpStream>,
    size: Option<u64>,
    finished: bool,
}

/// Logs in, changes to the file's directory and starts `RETR` of `url`.
pub(super) fn retrieve(url: &Url) -> Result<Retrieval, FtpError> {
    let request = request(url)?;
    let mut control = Control::connect(url)?;
    control.greeting()?;
    control.login(&request.user, &request.password)?;
    control.expect_completion("TYPE", Some("I"))?;
    for dir in &request.dirs {
        control.expect_completion("CWD", Some(dir))?;
    }
    let size = control.size(&request.file)?;
    let port = control.passive_port()?;
    let addr = SocketAddr::new(control.peer, port);
    let data = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .and_then(|stream| {
            stream.set_read_timeout(Some(POLL_SLICE))?;
            Ok(stream)
        })
        .map_err(|source| FtpError::DataConnect { addr, source })?;
    let reply = control.command("RETR", Some(&request.file))?;
    if !reply.is_preliminary() {
        return Err(reply.refused("RETR"));
    }
    Ok(Retrieval {
        control,
        data: Some(data),
        size,
        finished: false,
    })
}

impl Retrieval {
    /// The length the server gave for the file (`SIZE`), if it did.
    pub(super) fn size(&self) -> Option<u64> {
        self.size
    }

    /// Reads file bytes from the data connection; 0 once the server closed it.
    pub(super) fn read(&mut self, buf: &mut [u8]) -> Result<usize, FtpError> {
        let Some(data) = self.data.as_mut() else {
            return Ok(0);
        };
        let n = patient_read(data, buf)?;
        if n == 0 {
            self.data = None;
        }
        Ok(n)
    }

    /// Checks the server's verdict on the transfer (226 / 250) and says goodbye.
    pub(super) fn finish(&mut self) -> Result<(), FtpError> {
        if self.finished {
            return Ok(());
        }
        self.data = None;
        let reply = self.control.reply()?;
        if !reply.is_completion() {
            return Err(reply.refused("the transfer"));
        }
        self.finished = true;
        // Courtesy only: the transfer is complete whatever happens to QUIT.
        let _ = self.control.send("QUIT", None);
        Ok(())
    }
}

fn request(url: &Url) -> Result<Request, FtpError> {
    let user = if url.username().is_empty() {
        "anonymous".to_owned()
    } else {
        decode_arg(url.username())?
    };
    let password = match url.password() {
        Some(password) => decode_arg(password)?,
        None if user == "anonymous" => "anonymous@".to_owned(),
        None => String::new(),
    };
    let mut segments: Vec<&str> = url
        .path_segments()
        .map(Iterator::collect)
        .unwrap_or_default();
    let last = segments.pop().unwrap_or("");
    let file = decode_arg(strip_type_suffix(last))?;
    if file.is_empty() {
        return Err(FtpError::Url("no file name"));
    }
    let dirs = segments
        .into_iter()
        .filter(|s| !s.is_empty())
        .map(decode_arg)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Request {
        user,
        password,
        dirs,
        file,
    })
}

/// Drops RFC 1738's `;type=a|i|d` from the last path segment.
pub(super) fn strip_type_suffix(segment: &str) -> &str {
    match segment.rsplit_once(";type=") {
        Some((head, "a" | "A" | "i" | "I" | "d" | "D")) => head,
        _ => segment,
    }
}

/// A percent-decoded URL part that is safe to put in a command line.
fn decode_arg(raw: &str) -> Result<String, FtpError> {
    let text = String::from_utf8(percent_decode(raw)).map_err(|_| FtpError::Url("not UTF-8"))?;
    if text.contains(['\r', '\n', '\0']) {
        return Err(FtpError::Url(
            "user, password or path contains CR, LF or NUL",
        ));
    }
    Ok(text)
}

/// One reply: its code and the text of its first line.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    code: u16,
    text: String,
}

impl Reply {
    fn is_preliminary(&self) -> bool {
        (100..200).contains(&self.code)
    }

    fn is_completion(&self) -> bool {
        (200..300).contains(&self.code)
    }

    fn refused(&self, command: &'static str) -> FtpError {
        FtpError::Refused {
            command,
            code: self.code,
            text: printable(&self.text),
        }
    }
}

/// The control connection.
#[derive(Debug)]
struct Control {
    stream: TcpStream,
    /// The only address data connections go to.
    peer: IpAddr,
    /// Received bytes not yet consumed as lines; never more than `MAX_LINE` plus one read.
    pending: Vec<u8>,
}

impl Control {
    fn connect(url: &Url) -> Result<Self, FtpError> {
        let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
            return Err(FtpError::Url("no host"));
        };
        let host = format!("{host}:{}", url.port().unwrap_or(21));
        let addrs = url
            .socket_addrs(|| Some(21))
            .map_err(|source| FtpError::Resolve {
                host: host.clone(),
                source,
            })?;
        let mut last_error = io::Error::new(io::ErrorKind::NotFound, "no address");
        for addr in addrs {
            if signals::caught() {
                return Err(FtpError::Interrupted);
            }
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(stream) => {
                    return Self::over(stream, addr.ip()).map_err(|source| FtpError::Connect {
                        host: host.clone(),
                        source,
                    });
                }
                Err(e) => last_error = e,
            }
        }
        Err(FtpError::Connect {
            host,
            source: last_error,
        })
    }

    fn over(stream: TcpStream, peer: IpAddr) -> io::Result<Self> {
        stream.set_read_timeout(Some(POLL_SLICE))?;
        stream.set_write_timeout(Some(READ_TIMEOUT))?;
        Ok(Control {
            stream,
            peer,
            pending: Vec::new(),
        })
    }

    fn greeting(&mut self) -> Result<(), FtpError> {
        for _ in 0..=MAX_PRELIMINARY {
            let reply = self.reply()?;
            if reply.code == 120 {
                continue;
            }
            if reply.is_completion() {
                return Ok(());
            }
            return Err(reply.refused("the connection"));
        }
        Err(FtpError::Refused {
            command: "the connection",
            code: 120,
            text: "server not ready".to_owned(),
        })
    }

    fn login(&mut self, user: &str, password: &str) -> Result<(), FtpError> {
        let reply = self.command("USER", Some(user))?;
        match reply.code {
            230 => Ok(()),
            331 => {
                let reply = self.command("PASS", Some(password))?;
                match reply.code {
                    202 | 230 => Ok(()),
                    _ => Err(reply.refused("PASS")),
                }
            }
            _ => Err(reply.refused("USER")),
        }
    }

    /// `SIZE file`: the length when the server knows it; any refusal just means unknown.
    fn size(&mut self, file: &str) -> Result<Option<u64>, FtpError> {
        let reply = self.command("SIZE", Some(file))?;
        if reply.code != 213 {
            return Ok(None);
        }
        Ok(reply
            .text
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok()))
    }

    /// The data port from EPSV, or from PASV where EPSV is refused.
    fn passive_port(&mut self) -> Result<u16, FtpError> {
        let reply = self.command("EPSV", None)?;
        if reply.code == 229 {
            return parse_epsv(&reply.text)
                .ok_or_else(|| FtpError::Passive(printable(&reply.text)));
        }
        let reply = self.command("PASV", None)?;
        if reply.code == 227 {
            return parse_pasv(&reply.text)
                .ok_or_else(|| FtpError::Passive(printable(&reply.text)));
        }
        Err(reply.refused("PASV"))
    }

    fn expect_completion(
        &mut self,
        command: &'static str,
        arg: Option<&str>,
    ) -> Result<(), FtpError> {
        let reply = self.command(command, arg)?;
        if reply.is_completion() {
            Ok(())
        } else {
            Err(reply.refused(command))
        }
    }

    fn command(&mut self, command: &'static str, arg: Option<&str>) -> Result<Reply, FtpError> {
        self.send(command, arg)?;
        self.reply()
    }

    fn send(&mut self, command: &'static str, arg: Option<&str>) -> Result<(), FtpError> {
        if arg.is_some_and(|a| a.contains(['\r', '\n', '\0'])) {
            return Err(FtpError::Url(
                "user, password or path contains CR, LF or NUL",
            ));
        }
        if command == "PASS" {
            tracing::debug!(command, "ftp command");
        } else {
            tracing::debug!(command, arg, "ftp command");
        }
        let line = match arg {
            Some(arg) => format!("{command} {arg}\r\n"),
            None => format!("{command}\r\n"),
        };
        self.stream
            .write_all(line.as_bytes())
            .map_err(|source| FtpError::Send { command, source })
    }

    /// Reads one reply, single- or multi-line (RFC 959 §4.2).
    fn reply(&mut self) -> Result<Reply, FtpError> {
        let first = self.read_line()?;
        let (code, multi_line, text) = parse_reply_line(&first)?;
        if multi_line {
            let mut lines = 1usize;
            loop {
                if lines >= MAX_REPLY_LINES {
                    return Err(FtpError::TooManyLines);
                }
                let line = self.read_line()?;
                lines = lines.saturating_add(1);
                // Only "ddd " with the same code ends the reply; any other line is text.
                if let Ok((last_code, false, _)) = parse_reply_line(&line)
                    && last_code == code
                {
                    break;
                }
            }
        }
        tracing::trace!(code, "ftp reply");
        Ok(Reply { code, text })
    }

    /// One line without its line end.
    fn read_line(&mut self) -> Result<Vec<u8>, FtpError> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                if end >= MAX_LINE {
                    return Err(FtpError::LineTooLong);
                }
                let mut line: Vec<u8> = self.pending.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.pending.len() >= MAX_LINE {
                return Err(FtpError::LineTooLong);
            }
            let n = patient_read(&mut self.stream, &mut chunk)?;
            if n == 0 {
                return Err(FtpError::Closed);
            }
            self.pending
                .extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    }
}

/// Splits "ddd text" / "ddd-text" into the code, whether more lines follow, and the text.
fn parse_reply_line(line: &[u8]) -> Result<(u16, bool, String), FtpError> {
    let malformed = || FtpError::Malformed(printable(&String::from_utf8_lossy(line)));
    let [a, b, c, rest @ ..] = line else {
        return Err(malformed());
    };
    if !(b'1'..=b'5').contains(a) || !b.is_ascii_digit() || !c.is_ascii_digit() {
        return Err(malformed());
    }
    let code = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
    let (multi_line, text) = match rest {
        [] => (false, &[][..]),
        [b' ', text @ ..] => (false, text),
        [b'-', text @ ..] => (true, text),
        _ => return Err(malformed()),
    };
    Ok((code, multi_line, String::from_utf8_lossy(text).into_owned()))
}

/// The port of "229 Entering Extended Passive Mode (|||port|)" (RFC 2428 §3).
fn parse_epsv(text: &str) -> Option<u16> {
    let (_, after) = text.split_once('(')?;
    let (inner, _) = after.split_once(')')?;
    let delimiter = inner.chars().next()?;
    if !delimiter.is_ascii_graphic() || delimiter.is_ascii_digit() {
        return None;
    }
    let mut fields = inner.split(delimiter);
    match (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) {
        (Some(""), Some(""), Some(""), Some(port), Some(""), None) => {
            port.parse().ok().filter(|&p: &u16| p != 0)
        }
        _ => None,
    }
}

/// The port of "227 Entering Passive Mode (h1,h2,h3,h4,p1,p2)"; the host part is ignored.
fn parse_pasv(text: &str) -> Option<u16> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let tail = text.get(start..)?;
    let end = tail
        .find(|c: char| !(c.is_ascii_digit() || c == ','))
        .unwrap_or(tail.len());
    let numbers = tail
        .get(..end)?
        .split(',')
        .map(|n| n.parse::<u8>().ok())
        .collect::<Option<Vec<u8>>>()?;
    let [_, _, _, _, high, low] = numbers.as_slice() else {
        return None;
    };
    let port = u16::from(*high) << 8 | u16::from(*low);
    (port != 0).then_some(port)
}

/// A read that waits up to `READ_TIMEOUT` for data, checking for a stop signal every slice.
fn patient_read(stream: &mut TcpStream, buf: &mut [u8]) -> Result<usize, FtpError> {
    let started = Instant::now();
    loop {
        if signals::caught() {
            return Err(FtpError::Interrupted);
        }
        match stream.read(buf) {
            Ok(n) => return Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if started.elapsed() >= READ_TIMEOUT {
                    return Err(FtpError::TimedOut);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FtpError::Receive(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A control connection whose server sends `bytes` and then closes.
    fn control_reading(bytes: &[u8]) -> Control {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let bytes = bytes.to_vec();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let _ = stream.write_all(&bytes);
        });
        let stream = TcpStream::connect(addr).unwrap();
        server.join().unwrap();
        Control::over(stream, addr.ip()).unwrap()
    }

    fn url(text: &str) -> Url {
        Url::parse(text).unwrap()
    }

    #[test]
    fn single_line_reply_gives_code_and_text() {
        let mut control = control_reading(b"213 4096\r\n");

        assert_eq!(
            control.reply().unwrap(),
            Reply {
                code: 213,
                text: "4096".into()
            }
        );
    }

    #[test]
    fn multi_line_reply_ends_at_same_code_with_space() {
        let mut control = control_reading(
            b"220-Welcome\r\n220-still\r\n 230 not the end\r\n220 ready\r\n331 next\r\n",
        );

        let first = control.reply().unwrap();
        let second = control.reply().unwrap();

        assert_eq!((first.code, first.text.as_str()), (220, "Welcome"));
        assert_eq!(second.code, 331);
    }

    #[test]
    fn bare_lf_line_ends_are_accepted() {
        let mut control = control_reading(b"200 ok\n");

        assert_eq!(control.reply().unwrap().code, 200);
    }

    #[test]
    fn overlong_reply_line_is_refused() {
        let mut line = b"220 ".to_vec();
        line.resize(MAX_LINE + 10, b'x');
        line.extend_from_slice(b"\r\n");
        let mut control = control_reading(&line);

        assert!(matches!(control.reply(), Err(FtpError::LineTooLong)));
    }

    #[test]
    fn endless_multi_line_reply_is_refused() {
        let mut bytes = b"220-start\r\n".to_vec();
        for _ in 0..MAX_REPLY_LINES {
            bytes.extend_from_slice(b"220-more\r\n");
        }
        let mut control = control_reading(&bytes);

        assert!(matches!(control.reply(), Err(FtpError::TooManyLines)));
    }

    #[test]
    fn reply_cut_off_by_close_is_an_error() {
        let mut control = control_reading(b"220-start\r\n");

        assert!(matches!(control.reply(), Err(FtpError::Closed)));
    }

    #[test]
    fn reply_line_without_code_is_malformed() {
        for bytes in [&b"hello\r\n"[..], b"22\r\n", b"620 six\r\n", b"220x\r\n"] {
            let mut control = control_reading(bytes);

            assert!(
                matches!(control.reply(), Err(FtpError::Malformed(_))),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn epsv_reply_gives_port() {
        assert_eq!(
            parse_epsv("Entering Extended Passive Mode (|||6446|)"),
            Some(6446)
        );
        assert_eq!(parse_epsv("ok (!!!21!)"), Some(21));
    }

    #[test]
    fn epsv_reply_with_address_or_bad_port_is_refused() {
        assert_eq!(parse_epsv("(|1|10.0.0.1|6446|)"), None);
        assert_eq!(parse_epsv("(|||0|)"), None);
        assert_eq!(parse_epsv("(|||70000|)"), None);
        assert_eq!(parse_epsv("(1112341)"), None);
        assert_eq!(parse_epsv("no parens"), None);
    }

    #[test]
    fn pasv_reply_gives_port_and_ignores_address() {
        assert_eq!(
            parse_pasv("Entering Passive Mode (198,18,0,1,19,137)"),
            Some(19 * 256 + 137)
        );
        assert_eq!(parse_pasv("=127,0,0,1,0,21"), Some(21));
    }

    #[test]
    fn pasv_reply_with_wrong_field_count_or_range_is_refused() {
        assert_eq!(parse_pasv("(127,0,0,1,4)"), None);
        assert_eq!(parse_pasv("(127,0,0,1,4,5,6)"), None);
        assert_eq!(parse_pasv("(127,0,0,1,256,5)"), None);
        assert_eq!(parse_pasv("(127,0,0,1,0,0)"), None);
        assert_eq!(parse_pasv("nothing"), None);
    }

    #[test]
    fn anonymous_request_splits_directories_and_file() {
        let request = request(&url("ftp://example.org/pub//iso%20s/disk.iso;type=i")).unwrap();

        assert_eq!(
            request,
            Request {
                user: "anonymous".into(),
                password: "anonymous@".into(),
                dirs: vec!["pub".into(), "iso s".into()],
                file: "disk.iso".into(),
            }
        );
    }

    #[test]
    fn credentials_in_url_are_percent_decoded() {
        let request = request(&url("ftp://alice:s3cr%40t@example.org/f")).unwrap();

        assert_eq!(
            (request.user.as_str(), request.password.as_str()),
            ("alice", "s3cr@t")
        );
    }

    #[test]
    fn crlf_in_path_or_credentials_is_refused() {
        for text in [
            "ftp://example.org/pub%0D%0ADELE%20x/f",
            "ftp://example.org/f%0A",
            "ftp://a%0Db@example.org/f",
            "ftp://a:b%00@example.org/f",
        ] {
            assert!(
                matches!(request(&url(text)), Err(FtpError::Url(_))),
                "{text}"
            );
        }
    }

    #[test]
    fn directory_url_is_refused() {
        assert!(matches!(
            request(&url("ftp://example.org/pub/")),
            Err(FtpError::Url(_))
        ));
    }
}
