//! What the proxy needs to reach the upstream: the TLS client configuration
//! built from the trusted CA file, and the bearer token, both re-read when
//! the files change (bound service-account tokens rotate about hourly).
//!
//! Files are checked at most every `CREDENTIALS_CHECK_SECONDS`, when a new
//! session needs them, never on the relay path. A file that was fine at start
//! and later disappears fails new sessions with 502 (and one log line), while
//! the sessions already open keep running.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use log::{info, warn};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

use crate::config::{Config, ConfigError};

/// Identity of a file's current content, cheap to compare: Kubernetes
/// replaces projected files by swapping a symlink, so the inode changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
}

pub(crate) fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = fs::metadata(path)?;
    Ok(Stamp {
        inode: m.ino(),
        len: m.len(),
        modified: m.modified().ok(),
    })
}

/// The most a key, certificate or token file may hold: a Kubernetes
/// Secret's limit. Past it the file is not one (`/dev/zero` by mistake, a
/// log), and reading on would fill memory, on the loop when it rotates.
pub(crate) const MAX_FILE_BYTES: u64 = 1 << 20;

/// The whole of a key, certificate or token file, if it is at most
/// [`MAX_FILE_BYTES`].
pub(crate) fn read_small(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "larger than 1 MiB, so not a key, certificate or token file",
        ));
    }
    Ok(bytes)
}

/// The credentials in force for new sessions.
#[derive(Clone)]
pub(crate) struct Current {
    /// TLS client configuration (for a `wss://` upstream).
    pub tls: Option<Arc<ClientConfig>>,
    /// The bearer token, if one is configured.
    pub bearer: Option<String>,
}

/// The upstream's credentials and when they were last checked.
pub(crate) struct Credentials {
    ca_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
    interval: Duration,
    next_check: Instant,
    ca_stamp: Option<Stamp>,
    token_stamp: Option<Stamp>,
    current: Current,
    /// Why new sessions cannot get credentials right now.
    error: Option<String>,
    /// The server name the TLS certificate must match.
    pub server_name: Option<ServerName<'static>>,
}

impl Credentials {
    /// Load everything at start; any problem is a configuration error.
    pub fn load(config: &Config, now: Instant) -> Result<Self, ConfigError> {
        // The files default to the service-account directory; the message
        // names the path, so the operator sees which one is wrong.
        let (ca_var, token_var) = ("UPSTREAM_CA_FILE", "UPSTREAM_TOKEN_FILE");
        let server_name = if config.upstream.tls {
            Some(
                ServerName::try_from(config.upstream.host.clone()).map_err(|e| ConfigError {
                    var: "WS_REMOTE_URL".into(),
                    message: format!(
                        "'{}' is not a valid TLS server name: {e}",
                        config.upstream.host
                    ),
                })?,
            )
        } else {
            None
        };
        let mut c = Credentials {
            ca_file: config.ca_file.clone().filter(|_| config.upstream.tls),
            token_file: config.token_file.clone(),
            interval: config.credentials_check_interval,
            next_check: now + config.credentials_check_interval,
            ca_stamp: None,
            token_stamp: None,
            current: Current {
                tls: None,
                bearer: None,
            },
            error: None,
            server_name,
        };
        if config.upstream.tls && c.ca_file.is_none() {
            return Err(ConfigError {
                var: "UPSTREAM_CA_FILE".into(),
                message: "a wss:// upstream needs a CA file".into(),
            });
        }
        if let Some(path) = c.ca_file.clone() {
            let (tls, st) = load_ca(&path).map_err(|m| ConfigError {
                var: ca_var.into(),
                message: m,
            })?;
            c.current.tls = Some(tls);
            c.ca_stamp = Some(st);
        }
        if let Some(path) = c.token_file.clone() {
            let (token, st) = load_token(&path).map_err(|m| ConfigError {
                var: token_var.into(),
                message: m,
            })?;
            c.current.bearer = Some(token);
            c.token_stamp = Some(st);
        }
        Ok(c)
    }

    /// The credentials for a new session, re-checking the files if the
    /// interval has passed. `Err` carries the reason for a 502.
    pub fn current(&mut self, now: Instant) -> Result<Current, String> {
        if now >= self.next_check {
            self.next_check = now + self.interval;
            self.refresh();
        }
        match &self.error {
            Some(e) => Err(e.clone()),
            None => Ok(self.current.clone()),
        }
    }

    fn refresh(&mut self) {
        let mut errors = Vec::new();
        if let Some(path) = &self.ca_file
            && let Err(e) = reload(
                path,
                "CA",
                &mut self.ca_stamp,
                load_ca,
                &mut self.current.tls,
            )
        {
            errors.push(e);
        }
        if let Some(path) = &self.token_file
            && let Err(e) = reload(
                path,
                "token",
                &mut self.token_stamp,
                load_token,
                &mut self.current.bearer,
            )
        {
            errors.push(e);
        }
        let error = (!errors.is_empty()).then(|| errors.join("; "));
        if error != self.error {
            match &error {
                Some(e) => warn!("upstream credentials unavailable, new sessions will fail: {e}"),
                None => info!("upstream credentials available again"),
            }
            // A failed reload must not leave a half-changed stamp behind:
            // forget the stamps so the next check reloads both.
            if error.is_some() {
                self.ca_stamp = None;
                self.token_stamp = None;
            }
            self.error = error;
        }
    }
}

/// Re-read `path` into `slot` if its stamp changed since the last load.
fn reload<T>(
    path: &Path,
    what: &str,
    last: &mut Option<Stamp>,
    load: fn(&Path) -> Result<(T, Stamp), String>,
    slot: &mut Option<T>,
) -> Result<(), String> {
    let now = stamp(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if Some(now) == *last {
        return Ok(());
    }
    let (value, st) = load(path)?;
    info!("upstream {what} reloaded from {}", path.display());
    *slot = Some(value);
    *last = Some(st);
    Ok(())
}

fn load_ca(path: &Path) -> Result<(Arc<ClientConfig>, Stamp), String> {
    let st = stamp(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let roots = read_roots(path)?;
    let provider = Arc::new(crate::crypto::provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((Arc::new(config), st))
}

/// The certificates of a PEM bundle as trust anchors (the upstream's CA,
/// or `CLIENT_CA_FILE` for client certificates).
pub(crate) fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let pem = read_small(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert =
            cert.map_err(|e| format!("{} is not a PEM certificate bundle: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(roots)
}

fn load_token(path: &Path) -> Result<(String, Stamp), String> {
    let st = stamp(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let raw = read_small(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
        .and_then(|b| {
            String::from_utf8(b).map_err(|_| format!("{} is not UTF-8 text", path.display()))
        })?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        // It goes into a header line: refuse anything that could break it.
        return Err(format!(
            "{} holds whitespace or control characters",
            path.display()
        ));
    }
    Ok((token.to_owned(), st))
}
