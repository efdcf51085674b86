//! TLS for the HTTP clients: the platform's CA roots, read only when the
//! first https server is to be verified (a plain-http run never reads the
//! hundred-odd files of /etc/ssl/certs, which take tens of milliseconds of
//! its start), CA certificates added to them (`--cacert`) and a client
//! certificate (`--cert`, `--key`). The option files are read and checked
//! once, before the run starts, so that a wrong path or a key that does not
//! belong to its certificate stops jobrun at once with the file's name,
//! instead of failing every URL.

use std::io::Read;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

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
    Tls(#[from] rustls::Error),
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

/// What a client adds to the platform's TLS defaults.
#[derive(Default)]
pub struct ClientTls {
    /// Trusted in addition to the platform's roots.
    roots: Vec<CertificateDer<'static>>,
    /// Presented to servers that ask for a client certificate.
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
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

    /// The TLS settings every client of a run shares: HTTP/2 or HTTP/1.1 by
    /// ALPN, servers verified against the platform's roots and `--cacert`'s
    /// (read when first needed), or not at all (`--insecure`), and the
    /// client certificate. Also the roots, to read before a request needs
    /// them (`Roots::ready`).
    pub fn client_config(self, insecure: bool) -> Result<(rustls::ClientConfig, Arc<Roots>)> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(Roots {
            extra: self.roots,
            provider: provider.clone(),
            verifier: OnceLock::new(),
            insecure,
        });
        let verifier: Arc<dyn ServerCertVerifier> = roots.clone();
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::ALL_VERSIONS)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match self.identity {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok((config, roots))
    }
}

/// The roots servers' certificates are verified against: the platform's,
/// read the first time they are needed, and `--cacert`'s.
pub struct Roots {
    extra: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
    /// The platform's verifier with the extra roots, or why there is none.
    verifier: OnceLock<Result<rustls_platform_verifier::Verifier, String>>,
    /// `--insecure`: any certificate is accepted, and no root is read.
    insecure: bool,
}

impl std::fmt::Debug for Roots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Roots")
            .field("extra", &self.extra.len())
            .field("insecure", &self.insecure)
            .finish_non_exhaustive()
    }
}

impl Roots {
    /// Reads the platform's roots unless done already; why they cannot be
    /// used, if they cannot. Called before an https request, so that a
    /// system without usable roots stops the run with this message rather
    /// than failing every https URL.
    pub fn ready(&self) -> Result<(), String> {
        if self.insecure {
            return Ok(());
        }
        self.verifier().map(|_| ())
    }

    fn verifier(&self) -> Result<&rustls_platform_verifier::Verifier, String> {
        self.verifier
            .get_or_init(|| {
                rustls_platform_verifier::Verifier::new_with_extra_roots(
                    self.extra.iter().cloned(),
                    self.provider.clone(),
                )
                .map_err(|e| {
                    format!(
                        "cannot verify https servers: {e}; install the system's CA \
                         certificates (SSL_CERT_FILE and SSL_CERT_DIR, when set, say where \
                         they are) or give --cacert FILE"
                    )
                })
            })
            .as_ref()
            .map_err(String::clone)
    }
}

impl ServerCertVerifier for Roots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.insecure {
            return Ok(ServerCertVerified::assertion());
        }
        self.verifier()
            .map_err(rustls::Error::General)?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    // The signatures of the handshake are checked with the provider's
    // algorithms alone, as the platform's verifier does: no root needed.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if self.insecure {
            return Ok(HandshakeSignatureValid::assertion());
        }
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if self.insecure {
            return Ok(HandshakeSignatureValid::assertion());
        }
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The CA certificates of a PEM file, each checked to be usable as a root.
fn load_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_pem_file(path, "--cacert")?;
    let certs = certificates(&pem, path, "--cacert")?;
    for (index, der) in certs.iter().enumerate() {
        rustls::RootCertStore::empty()
            .add(der.clone())
            .map_err(|e| {
                Error::Invalid(format!(
                    "--cacert {}: certificate #{} cannot be used as a CA: {e}",
                    path.display(),
                    index + 1
                ))
            })?;
    }
    Ok(certs)
}

/// The client certificate chain and its private key, checked to belong
/// together.
fn load_identity(
    cert_path: &Path,
    key_path: Option<&Path>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
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
    rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(
        |e| {
            Error::Invalid(format!(
                "--cert {} and {key_option} {}: the key cannot be used with the certificate: {e}",
                cert_path.display(),
                key_path.display()
            ))
        },
    )?;
    Ok((chain, key))
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

#[cfg(test)]
mod tests {
    use super::*;

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
