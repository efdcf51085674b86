//! Connecting: the URL's TLS mode, the session settings, and the schema,
//! brought up to date by the SQL files under `migrations/postgres/`, each
//! applied in one transaction and recorded in `jobrun_migrations`.

use std::collections::VecDeque;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::store::{Context, Error, Result};
use include_dir::{Dir, include_dir};
use postgres::config::{Host, SslMode, SslNegotiation};
use postgres::{Client, Config};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::bounded::{self, AnswerLimit, BoundedConnect, UnixRelay};
use super::{PgResult, no_jobrun_tables};
use crate::store::Open;

static MIGRATIONS: Dir = include_dir!("$CARGO_MANIFEST_DIR/migrations/postgres");

/// `url` with any password left out, for messages.
pub fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(user, _)| user);
            format!("{user}@{host}")
        }
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let kept: Vec<&str> = query
                .split('&')
                .filter(|pair| !pair.starts_with("password="))
                .collect();
            if kept.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{}", kept.join("&"))
            }
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// How TLS is used, as libpq's `sslmode` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    Disable,
    /// Encrypted when the server offers it (`prefer`, the default) or
    /// always (`require`), the certificate not checked: what libpq does.
    Encrypt {
        required: bool,
    },
    /// Encrypted, and the certificate checked against the platform's roots
    /// (`verify-ca`, `verify-full`).
    Verify,
}

/// Takes `sslmode` out of the URL (the client knows only some of libpq's
/// modes) and says what it asked for.
fn split_ssl_mode(url: &str) -> Result<(String, Tls)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), Tls::Encrypt { required: false }));
    };
    let mut tls = Tls::Encrypt { required: false };
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair.strip_prefix("sslmode=") {
            Some("disable") => tls = Tls::Disable,
            Some("allow" | "prefer") => tls = Tls::Encrypt { required: false },
            Some("require") => tls = Tls::Encrypt { required: true },
            Some("verify-ca" | "verify-full") => tls = Tls::Verify,
            Some(other) => {
                return Err(Error::Invalid(format!(
                    "sslmode={other} in --db is not a TLS mode: use disable, prefer, require, \
                     verify-ca or verify-full"
                )));
            }
            None => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, tls))
}

/// Opens a connection to `url`, with statements waiting at most
/// `lock_wait` for another transaction's locks, and every wait for the
/// server (connecting included) at most what `limit` says.
pub fn connect(url: &str, lock_wait: Duration, limit: Arc<AnswerLimit>) -> Result<Client> {
    let name = without_password(url);
    let (url, tls) = split_ssl_mode(url)?;
    let mut config = Config::from_str(&url).map_err(|e| {
        Error::Invalid(format!(
            "--db {name} is not a PostgreSQL URL jobrun can use: {e}"
        ))
    })?;
    config
        .application_name("jobrun")
        .connect_timeout(Duration::from_secs(10));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = match tls {
        Tls::Disable => None,
        Tls::Encrypt { required } => {
            let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
                .with_no_client_auth();
            Some((MakeRustlsConnect::new(tls), required))
        }
        Tls::Verify => {
            let verifier = rustls_platform_verifier::Verifier::new(provider.clone())?;
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            Some((MakeRustlsConnect::new(tls), true))
        }
    };
    let mut relays = VecDeque::new();
    if config
        .get_hosts()
        .iter()
        .any(|host| !matches!(host, Host::Tcp(_)))
    {
        // No TLS over a Unix socket, as in libpq; and the client hands the
        // connector no socket then: it connects to a relay instead.
        (config, relays) = through_relays(&config).map_err(|e| {
            Error::Invalid(format!(
                "cannot prepare the connection to {name}'s Unix socket: {e}"
            ))
        })?;
        config.ssl_mode(SslMode::Disable);
    } else {
        // The connector asks for TLS itself, as `sslmode` says: the client
        // hands it the socket before sending anything.
        config
            .ssl_mode(SslMode::Require)
            .ssl_negotiation(SslNegotiation::Direct);
    }
    let client = config.connect(BoundedConnect {
        tls,
        limit: limit.clone(),
        relays,
    });
    let unanswered = |error: &postgres::Error| {
        bounded::unanswered(error)
            .cloned()
            .or_else(|| bounded::relay_gave_up(error))
    };
    let mut client = client.map_err(|error| match unanswered(&error) {
        Some(unanswered) => Error::from(unanswered),
        None => match bounded::relay_unreachable() {
            Some(unreachable) => Error::from(unreachable),
            None => Error::from(error),
        }
        .context(format!(
            "cannot connect to PostgreSQL at {name}: is the server running and reachable, \
             and are the user, password and database right?"
        )),
    })?;
    let wait = lock_wait.as_millis().max(1);
    // Plans made for each batch's own arrays and limits: a generic plan
    // guesses their sizes and may scan where an index finds a batch.
    client
        .batch_execute(&format!(
            "SET lock_timeout = '{wait}ms'; SET TIME ZONE 'UTC'; SET client_min_messages = warning;
             SET plan_cache_mode = force_custom_plan"
        ))
        .at(&name)?;
    Ok(client)
}

/// `config` with each Unix socket's folder replaced by that of a relay to
/// it (see `bounded`), and the relays, in the order of the hosts.
fn through_relays(config: &Config) -> std::io::Result<(Config, VecDeque<UnixRelay>)> {
    let mut relayed = Config::new();
    let mut relays = VecDeque::new();
    let ports = config.get_ports();
    for (at, host) in config.get_hosts().iter().enumerate() {
        match host {
            Host::Tcp(host) => {
                relayed.host(host);
            }
            Host::Unix(dir) => {
                let port = ports.get(at).or(ports.first()).copied().unwrap_or(5432);
                let relay = UnixRelay::new(dir, port)?;
                relayed.host_path(relay.dir());
                relays.push_back(relay);
            }
        }
    }
    for &port in ports {
        relayed.port(port);
    }
    for &address in config.get_hostaddrs() {
        relayed.hostaddr(address);
    }
    if let Some(user) = config.get_user() {
        relayed.user(user);
    }
    if let Some(password) = config.get_password() {
        relayed.password(password);
    }
    if let Some(dbname) = config.get_dbname() {
        relayed.dbname(dbname);
    }
    if let Some(options) = config.get_options() {
        relayed.options(options);
    }
    if let Some(application_name) = config.get_application_name() {
        relayed.application_name(application_name);
    }
    if let Some(&timeout) = config.get_connect_timeout() {
        relayed.connect_timeout(timeout);
    }
    if let Some(&timeout) = config.get_tcp_user_timeout() {
        relayed.tcp_user_timeout(timeout);
    }
    if let Some(interval) = config.get_keepalives_interval() {
        relayed.keepalives_interval(interval);
    }
    if let Some(retries) = config.get_keepalives_retries() {
        relayed.keepalives_retries(retries);
    }
    relayed
        .keepalives(config.get_keepalives())
        .keepalives_idle(config.get_keepalives_idle())
        .ssl_negotiation(config.get_ssl_negotiation())
        .target_session_attrs(config.get_target_session_attrs())
        .channel_binding(config.get_channel_binding())
        .load_balance_hosts(config.get_load_balance_hosts());
    Ok((relayed, relays))
}

/// The server's certificate is not checked, only its signatures on the
/// handshake: `sslmode=prefer` and `require`, as in libpq.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The migrations this build knows, in order: (version, name, SQL).
fn known() -> Result<Vec<(i32, &'static str, &'static str)>> {
    let mut dirs: Vec<&Dir<'static>> = MIGRATIONS.dirs().collect();
    dirs.sort_by_key(|dir| dir.path());
    dirs.iter()
        .enumerate()
        .map(|(i, dir)| {
            let name = dir.path().to_str().unwrap_or_default();
            let sql = dir
                .get_file(dir.path().join("up.sql"))
                .and_then(|file| file.contents_utf8())
                .with_context(|| format!("migration {name} has no up.sql"))?;
            Ok((i as i32 + 1, name, sql))
        })
        .collect()
}

/// Makes sure the database holds jobrun's schema at this build's version:
/// applies missing migrations (one transaction each, under a lock so that
/// two processes starting at once do not both apply one), unless `mode`
/// only reads. A schema of a newer jobrun is refused.
pub fn check_schema(client: &mut Client, name: &str, mode: Open) -> Result<()> {
    let known = known()?;
    let has_table: bool = client
        .query_one("SELECT to_regclass('jobrun_migrations') IS NOT NULL", &[])
        .at(name)?
        .get(0);
    if !has_table {
        if mode != Open::CreateIfMissing {
            return Err(no_jobrun_tables(name));
        }
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS jobrun_migrations (
                     version    integer PRIMARY KEY,
                     name       text NOT NULL,
                     applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .at(name)?;
    }
    let mut tx = client.transaction().at(name)?;
    if mode != Open::ReadOnly {
        tx.batch_execute("LOCK TABLE jobrun_migrations IN EXCLUSIVE MODE")
            .at(name)?;
    }
    let applied: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM jobrun_migrations",
            &[],
        )
        .at(name)?
        .get(0);
    let newest = known.len() as i32;
    if applied > newest {
        return Err(Error::Refused(format!(
            "{name} was written by a newer jobrun (schema version {applied}; this one knows up \
             to {newest}). Use that jobrun or a newer one; nothing was changed"
        )));
    }
    if applied == newest {
        return Ok(());
    }
    if mode == Open::ReadOnly {
        if applied == 0 {
            return Err(no_jobrun_tables(name));
        }
        return Err(Error::Refused(format!(
            "{name} was written by an older jobrun (schema version {applied} of {newest}); \
             reading it needs its schema brought up to date: run `jobrun --db {name} import` \
             or `run` once, then read it"
        )));
    }
    for (version, migration, sql) in &known[applied as usize..] {
        tx.batch_execute(sql)
            .at(name)
            .with_context(|| format!("cannot apply migration {migration} to {name}"))?;
        tx.execute(
            "INSERT INTO jobrun_migrations (version, name) VALUES ($1, $2)",
            &[version, migration],
        )
        .at(name)?;
    }
    tx.commit().at(name)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_left_out() {
        assert_eq!(
            without_password("postgres://u:secret@h:5/db?password=x&sslmode=require"),
            "postgres://u@h:5/db?sslmode=require"
        );
        assert_eq!(without_password("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn ssl_modes_of_libpq_are_understood() {
        let (url, tls) = split_ssl_mode("postgres://h/db?sslmode=verify-full&a=b").unwrap();
        assert_eq!((url.as_str(), tls), ("postgres://h/db?a=b", Tls::Verify));
        let (_, tls) = split_ssl_mode("postgres://h/db").unwrap();
        assert_eq!(tls, Tls::Encrypt { required: false });
        let err = split_ssl_mode("postgres://h/db?sslmode=maybe").unwrap_err();
        assert!(err.to_string().contains("sslmode=maybe"), "{err}");
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        let known = known().unwrap();
        assert!(!known.is_empty());
        assert!(known.iter().all(|(_, _, sql)| !sql.is_empty()));
    }
}
