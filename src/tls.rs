//! TLS beyond the defaults: CA certificates added to the platform's roots
//! (`--cacert`) and a client certificate (`--cert`, `--key`). The files are
//! read and checked once, before the run starts, so that a wrong path or a
//! key that does not belong to its certificate stops jobrun at once with the
//! file's name, instead of failing every URL.

use std::io::Read;
use std::path::Path;

use reqwest::ClientBuilder;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// No certificate file is this large; a larger one is a mistake (a disk
/// image, `/dev/zero`), not something to read into memory.
const MAX_PEM_BYTES: u64 = 16 << 20;

/// A TLS file that cannot be used, named with its option.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Client(#[from] reqwest::Error),
    /// `source`, met while doing what `context` says.
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
}

type Result<T, E = Error> = std::result::Result<T, E>;

crate::context::define_context!(Error, Error::Invalid);

/// What a client adds to reqwest's TLS defaults.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// Trusted in addition to the platform's roots.
    roots: Vec<reqwest::Certificate>,
    /// Presented to servers that ask for a client certificate.
    identity: Option<reqwest::Identity>,
}

impl ClientTls {
    /// Reads `--cacert`, `--cert` and `--key`. `--key` may be left out when
    /// the `--cert` file holds the key too.
    pub fn load(cacert: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Result<Self> {
        let roots = match cacert {
            Some(path) => load_roots(path)?,
            None => Vec::new(),
        };
        let identity = match (cert, key) {
            (Some(cert), key) => Some(load_identity(cert, key)?),
            (None, Some(_)) => {
                return Err(Error::Invalid(
                    "--key needs --cert: give the client certificate too".into(),
                ));
            }
            (None, None) => None,
        };
        Ok(ClientTls { roots, identity })
    }

    /// Adds the roots (to the platform's, not instead of them) and the
    /// client certificate to a client being built.
    pub fn apply(self, mut builder: ClientBuilder) -> ClientBuilder {
        if !self.roots.is_empty() {
            builder = builder.tls_certs_merge(self.roots);
        }
        if let Some(identity) = self.identity {
            builder = builder.identity(identity);
        }
        builder
    }
}

/// The CA certificates of a PEM file, each checked to be usable as a root.
fn load_roots(path: &Path) -> Result<Vec<reqwest::Certificate>> {
    let pem = read_pem_file(path, "--cacert")?;
    let certs = certificates(&pem, path, "--cacert")?;
    let mut roots = Vec::with_capacity(certs.len());
    for (index, der) in certs.into_iter().enumerate() {
        rustls::RootCertStore::empty()
            .add(der.clone())
            .map_err(|e| {
                Error::Invalid(format!(
                    "--cacert {}: certificate #{} cannot be used as a CA: {e}",
                    path.display(),
                    index + 1
                ))
            })?;
        roots.push(
            reqwest::Certificate::from_der(&der)
                .with_context(|| format!("--cacert {}", path.display()))?,
        );
    }
    Ok(roots)
}

/// The client certificate chain and its private key, checked to belong
/// together.
fn load_identity(cert_path: &Path, key_path: Option<&Path>) -> Result<reqwest::Identity> {
    let cert_pem = read_pem_file(cert_path, "--cert")?;
    let chain = certificates(&cert_pem, cert_path, "--cert")?;
    let (key_pem, key_path, key_option) = match key_path {
        Some(path) => (read_pem_file(path, "--key")?, path, "--key"),
        None => (cert_pem.clone(), cert_path, "--cert"),
    };
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        let hint = if key_option == "--cert" {
            "; give the key file with --key"
        } else {
            ""
        };
        Error::Invalid(format!(
            "{key_option} {}: no unencrypted private key found (PEM: BEGIN PRIVATE KEY, \
             RSA PRIVATE KEY or EC PRIVATE KEY){hint}",
            key_path.display()
        ))
    })?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
        Error::Invalid(format!(
            "--cert {} and {key_option} {}: the key cannot be used with the certificate: {e}",
            cert_path.display(),
            key_path.display()
        ))
    })?;
    // reqwest takes the identity as PEM and refuses sections it does not
    // know (the `EC PARAMETERS` openssl writes before an EC key): hand it
    // the certificates and the key only.
    let mut pem = pem_sections(&cert_pem, &["CERTIFICATE"]);
    pem.extend(pem_sections(
        &key_pem,
        &["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"],
    ));
    reqwest::Identity::from_pem(&pem).with_context(|| {
        format!(
            "--cert {} and {key_option} {}: not a usable client identity",
            cert_path.display(),
            key_path.display()
        )
    })
}

/// Every certificate of a PEM file; at least one.
fn certificates(pem: &[u8], path: &Path, option: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Invalid(format!("{option} {}: not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Invalid(format!(
            "{option} {}: no certificate in it (a PEM file with BEGIN CERTIFICATE blocks is needed)",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_pem_file(path: &Path, option: &str) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("{option} {}: cannot open it", path.display()))?;
    let mut pem = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut pem)
        .with_context(|| format!("{option} {}: cannot read it", path.display()))?;
    if pem.len() as u64 > MAX_PEM_BYTES {
        return Err(Error::Invalid(format!(
            "{option} {}: larger than {} MiB, so not a certificate file",
            path.display(),
            MAX_PEM_BYTES >> 20
        )));
    }
    Ok(pem)
}

/// The `-----BEGIN LABEL-----` … `-----END LABEL-----` blocks of `pem`
/// whose label is one of `labels`, as they are written.
fn pem_sections(pem: &[u8], labels: &[&str]) -> Vec<u8> {
    let text = String::from_utf8_lossy(pem);
    let mut kept = String::new();
    let mut inside: Option<&str> = None;
    for line in text.lines() {
        let line = line.trim_end();
        match inside {
            None => {
                inside = labels
                    .iter()
                    .find(|label| line == format!("-----BEGIN {label}-----"))
                    .copied();
                if inside.is_some() {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
            Some(label) => {
                kept.push_str(line);
                kept.push('\n');
                if line == format!("-----END {label}-----") {
                    inside = None;
                }
            }
        }
    }
    kept.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_asked_for_pem_sections_are_kept() {
        let pem = b"-----BEGIN EC PARAMETERS-----\nBggq\n-----END EC PARAMETERS-----\n\
                    -----BEGIN EC PRIVATE KEY-----\r\nMHcC\r\nAQEE\r\n-----END EC PRIVATE KEY-----\r\n";
        let kept = pem_sections(pem, &["EC PRIVATE KEY"]);
        assert_eq!(
            String::from_utf8(kept).unwrap(),
            "-----BEGIN EC PRIVATE KEY-----\nMHcC\nAQEE\n-----END EC PRIVATE KEY-----\n"
        );
    }

    #[test]
    fn a_key_without_a_certificate_is_refused() {
        let err = ClientTls::load(None, None, Some(Path::new("k.pem")))
            .err()
            .unwrap();
        assert!(err.to_string().contains("--key needs --cert"), "{err}");
    }

    #[test]
    fn missing_and_empty_files_are_named() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let missing = dir.join("missing.pem");
        for (result, expected) in [
            (
                ClientTls::load(Some(&missing), None, None),
                format!("--cacert {}: cannot open it", missing.display()),
            ),
            (
                ClientTls::load(Some(&empty), None, None),
                format!("--cacert {}: no certificate in it", empty.display()),
            ),
            (
                ClientTls::load(Some(dir), None, None),
                format!("--cacert {}: cannot read it", dir.display()),
            ),
            (
                ClientTls::load(None, Some(&empty), None),
                format!("--cert {}: no certificate in it", empty.display()),
            ),
        ] {
            let err = format!("{:#}", result.err().unwrap());
            assert!(err.starts_with(&expected), "{err}");
        }
    }
}
