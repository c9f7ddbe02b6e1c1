//! HTTP and HTTPS through ureq, with the trust set of the module documentation.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use url::Url;

use super::{CONNECT_TIMEOUT, FetchError, MAX_REDIRECTS, READ_TIMEOUT, printable};

/// Environment variable naming a PEM file of extra trust anchors.
pub(super) const CA_FILE_ENV: &str = "CAPVM_CA_FILE";

/// Sends the GET and returns the body and the announced length, if any.
pub(super) fn get(url: &Url) -> Result<(Box<dyn Read + Send + Sync>, Option<u64>), FetchError> {
    let agent = agent()?;
    // `identity`: a server must not compress the body in transit, so what is stored is the
    // resource itself and Content-Length counts its bytes.
    let response = match agent
        .request_url("GET", url)
        .set("Accept-Encoding", "identity")
        .call()
    {
        Ok(response) => response,
        Err(ureq::Error::Status(code, response)) => {
            return Err(FetchError::HttpStatus {
                code,
                reason: printable(response.status_text()),
            });
        }
        Err(ureq::Error::Transport(transport)) => {
            return Err(FetchError::HttpRequest(TransportError(Box::new(transport))));
        }
    };
    if response.status() != 200 {
        return Err(FetchError::HttpStatus {
            code: response.status(),
            reason: printable(response.status_text()),
        });
    }
    let encoded = response
        .header("Content-Encoding")
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"));
    let length = if encoded {
        None
    } else {
        response
            .header("Content-Length")
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Ok((response.into_reader(), length))
}

/// ureq's transport error, shown without the URL: a URL may carry a password.
pub struct TransportError(Box<ureq::Transport>);

impl TransportError {
    /// What went wrong (connect, DNS, TLS, too many redirects, ...).
    pub fn kind(&self) -> ureq::ErrorKind {
        self.0.kind()
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.kind())?;
        if let Some(message) = self.0.message() {
            write!(f, ": {}", printable(message))?;
        }
        Ok(())
    }
}

impl fmt::Debug for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportError")
            .field("kind", &self.0.kind())
            .field("message", &self.0.message())
            .field("source", &std::error::Error::source(&*self.0))
            .finish()
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}

fn agent() -> Result<ureq::Agent, FetchError> {
    let mut builder = ureq::AgentBuilder::new()
        .timeout_connect(CONNECT_TIMEOUT)
        .timeout_read(READ_TIMEOUT)
        .timeout_write(READ_TIMEOUT)
        .redirects(MAX_REDIRECTS)
        .user_agent(concat!("capvm/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = std::env::var_os(CA_FILE_ENV).filter(|v| !v.is_empty()) {
        builder = builder.tls_config(tls_config(Path::new(&path))?);
    }
    Ok(builder.build())
}

/// The webpki roots plus every certificate in the PEM file `ca_file`.
fn tls_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, FetchError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let load_error = |source| FetchError::LoadCaFile {
        path: PathBuf::from(ca_file),
        source,
    };
    let mut added = 0usize;
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(load_error)? {
        let cert = cert.map_err(load_error)?;
        roots.add(cert).map_err(|source| FetchError::AddCa {
            path: ca_file.to_owned(),
            source,
        })?;
        added = added.saturating_add(1);
    }
    if added == 0 {
        return Err(FetchError::NoCa(ca_file.to_owned()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(FetchError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "no pem here\n").unwrap();

        assert!(matches!(tls_config(&path), Err(FetchError::NoCa(_))));
    }

    #[test]
    fn missing_ca_file_is_a_load_error() {
        assert!(matches!(
            tls_config(Path::new("/nonexistent/capvm-ca.pem")),
            Err(FetchError::LoadCaFile { .. })
        ));
    }

    #[test]
    fn ca_file_with_garbage_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.pem");
        std::fs::write(
            &path,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();

        assert!(matches!(tls_config(&path), Err(FetchError::AddCa { .. })));
    }
}
