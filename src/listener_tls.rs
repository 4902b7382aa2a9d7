//! The listener's own TLS: `wss://` and `https://` served by the proxy
//! itself (`TLS_CERT_FILE`, `TLS_KEY_FILE`, optionally `CLIENT_CA_FILE` for
//! client certificates), with rustls.
//!
//! - TLS 1.3 and 1.2 only, ALPN `http/1.1`, session resumption (tickets,
//!   and a bounded session-ID cache for TLS 1.2 clients without tickets).
//! - The files are checked at most every `CREDENTIALS_CHECK_SECONDS`, when
//!   a connection is accepted (never on the relay path). cert-manager
//!   rotates a mounted Secret by swapping the `..data` symlink: the file
//!   names stay and the inodes behind them change, which the stamps see.
//! - A changed set is loaded whole into a new `ServerConfig`: connections
//!   accepted from then on use it, open ones keep the one they started with
//!   (each holds an `Arc` of its own). Resumption state is made anew with
//!   it, so a client cannot resume its way past the new certificate.
//! - A changed set that does not load (unreadable, no key, a key that does
//!   not match) leaves the old one serving; the caller logs one ERROR line
//!   per distinct bad set and counts it.
//! - With `WORKERS` > 1 every worker uses the first one's state
//!   (`Proxy::add_worker`): one set of tickets, so a client resumes on any
//!   worker; one check per interval, so a bad rotation is one ERROR line.
//! - The METRICS_ADDR listener speaks TLS too when this is on, with the
//!   same certificate and never asking for a client certificate (kubelet's
//!   `scheme: HTTPS` probes and Prometheus present none).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::{ServerConfig, ServerConnection};

use crate::config::{Config, ConfigError};
use crate::session::Kind;
use crate::upstream::{Stamp, read_roots, read_small, stamp};

/// TLS 1.2 sessions remembered for resumption by ID (about 200 bytes each);
/// TLS 1.3, and TLS 1.2 clients that take tickets, resume from tickets and
/// cost nothing here.
const SESSION_CACHE: usize = 1024;

/// The files, in the order of their stamps.
#[derive(Debug, Clone)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

impl Files {
    fn stamps(&self) -> [Option<Stamp>; 3] {
        let of = |p: &Path| stamp(p).ok();
        [
            of(&self.cert),
            of(&self.key),
            self.client_ca.as_deref().and_then(of),
        ]
    }
}

/// What loading a set of files gave.
struct Loaded {
    main: Arc<ServerConfig>,
    probe: Arc<ServerConfig>,
    not_after: i64,
}

/// A set of files that did not load: the variable to fix and why.
#[derive(Debug)]
pub(crate) struct LoadError {
    pub var: &'static str,
    pub message: String,
}

/// The outcome of a check for rotated files.
#[derive(Debug)]
pub(crate) enum Checked {
    /// Not due yet, nothing changed, or a failure already reported.
    Unchanged,
    /// A new certificate serves new connections from now on.
    Reloaded { not_after: i64 },
    /// The files changed but do not load; the old certificate stays.
    Failed(LoadError),
}

/// The listeners' TLS, shared by the workers of a process: the state
/// behind a lock (taken once per accepted connection, never while
/// relaying), the expiry readable without it (for `/metrics` gauges).
pub(crate) struct SharedTls {
    state: Mutex<ListenerTls>,
    not_after: AtomicI64,
}

impl std::fmt::Debug for SharedTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTls")
            .field("not_after", &self.not_after())
            .finish_non_exhaustive()
    }
}

impl SharedTls {
    /// Load the files at start, if TLS is configured (see
    /// [`ListenerTls::load`]).
    pub fn load(config: &Config, now: Instant) -> Result<Option<Arc<Self>>, ConfigError> {
        Ok(ListenerTls::load(config, now)?.map(|tls| {
            Arc::new(SharedTls {
                not_after: AtomicI64::new(tls.not_after),
                state: Mutex::new(tls),
            })
        }))
    }

    /// The server side of TLS for a connection accepted by `kind`'s
    /// listener, after checking the files for rotation (what the check
    /// found is for the caller to log and count).
    pub fn accept(
        &self,
        now: Instant,
        kind: Kind,
    ) -> (Checked, Result<ServerConnection, rustls::Error>) {
        // Plain values inside: a panic elsewhere cannot leave them torn.
        let mut tls = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let checked = tls.check(now);
        if let Checked::Reloaded { not_after } = checked {
            self.not_after.store(not_after, Ordering::Relaxed);
        }
        (checked, tls.accept(kind))
    }

    /// When the certificate chain in force expires first (Unix seconds).
    pub fn not_after(&self) -> i64 {
        self.not_after.load(Ordering::Relaxed)
    }
}

/// The listener's TLS configuration in force and what it was loaded from.
struct ListenerTls {
    files: Files,
    interval: Duration,
    next_check: Instant,
    /// The stamps of the set in force.
    seen: [Option<Stamp>; 3],
    /// A changed set that did not load: its stamps and why. It is tried
    /// again at every check, as a read can fail for a moment (EMFILE on a
    /// busy proxy, a file caught half-written whose stamp then stays the
    /// same); it is reported once, not at every check.
    failing: Option<([Option<Stamp>; 3], String)>,
    main: Arc<ServerConfig>,
    probe: Arc<ServerConfig>,
    not_after: i64,
}

impl ListenerTls {
    /// Load the files at start, if TLS is configured; any problem is a
    /// configuration error naming the variable.
    fn load(config: &Config, now: Instant) -> Result<Option<Self>, ConfigError> {
        let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) else {
            return Ok(None);
        };
        let files = Files {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: config.client_ca_file.clone(),
        };
        let seen = files.stamps();
        let loaded = load(&files).map_err(|e| ConfigError {
            var: e.var.into(),
            message: e.message,
        })?;
        Ok(Some(ListenerTls {
            files,
            interval: config.credentials_check_interval,
            next_check: now + config.credentials_check_interval,
            seen,
            failing: None,
            main: loaded.main,
            probe: loaded.probe,
            not_after: loaded.not_after,
        }))
    }

    /// Reload the files if the interval has passed and they changed.
    fn check(&mut self, now: Instant) -> Checked {
        if now < self.next_check {
            return Checked::Unchanged;
        }
        self.next_check = now + self.interval;
        let stamps = self.files.stamps();
        if stamps == self.seen {
            return Checked::Unchanged;
        }
        match load(&self.files) {
            Ok(l) => {
                self.seen = stamps;
                self.failing = None;
                self.main = l.main;
                self.probe = l.probe;
                self.not_after = l.not_after;
                Checked::Reloaded {
                    not_after: l.not_after,
                }
            }
            Err(e) => {
                let failing = Some((stamps, e.message.clone()));
                if failing == self.failing {
                    return Checked::Unchanged;
                }
                self.failing = failing;
                Checked::Failed(e)
            }
        }
    }

    /// The server side of TLS for a connection accepted by `kind`'s
    /// listener.
    fn accept(&self, kind: Kind) -> Result<ServerConnection, rustls::Error> {
        let config = match kind {
            Kind::Main => &self.main,
            Kind::Metrics => &self.probe,
        };
        ServerConnection::new(config.clone())
    }
}

fn load(files: &Files) -> Result<Loaded, LoadError> {
    let err = |var: &'static str| move |message: String| LoadError { var, message };
    let cert_err = err("TLS_CERT_FILE");
    let path = |p: &Path| p.display().to_string();
    let pem = read_small(&files.cert)
        .map_err(|e| cert_err(format!("cannot read {}: {e}", path(&files.cert))))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            cert_err(format!(
                "{} is not a PEM certificate chain: {e}",
                path(&files.cert)
            ))
        })?;
    if chain.is_empty() {
        return Err(cert_err(format!(
            "{} holds no certificate",
            path(&files.cert)
        )));
    }
    // The chain is as good as its first certificate to expire: an
    // intermediate can run out before the leaf.
    let mut not_after = i64::MAX;
    for (i, cert) in chain.iter().enumerate() {
        let t = crate::x509::not_after(cert).ok_or_else(|| {
            cert_err(format!(
                "{}: the validity of certificate {} cannot be read",
                path(&files.cert),
                i + 1
            ))
        })?;
        not_after = not_after.min(t);
    }
    let key_pem = read_small(&files.key)
        .map_err(|e| err("TLS_KEY_FILE")(format!("cannot read {}: {e}", path(&files.key))))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        err("TLS_KEY_FILE")(format!(
            "{} holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
            path(&files.key)
        ))
    })?;
    let provider = Arc::new(crate::crypto::provider());
    let verifier = match &files.client_ca {
        Some(ca) => {
            let roots = read_roots(ca).map_err(err("CLIENT_CA_FILE"))?;
            Some(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| err("CLIENT_CA_FILE")(format!("{}: {e}", path(ca))))?,
            )
        }
        None => None,
    };
    let key_err = |e: rustls::Error| {
        err("TLS_KEY_FILE")(format!(
            "{} does not fit the certificate in {}: {e}",
            path(&files.key),
            path(&files.cert)
        ))
    };
    // Both versions are in the ring provider: this cannot fail, but it is
    // reported rather than unwrapped.
    let builder = || {
        ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| err("TLS_CERT_FILE")(format!("TLS setup failed: {e}")))
    };
    let main = match verifier {
        Some(v) => builder()?.with_client_cert_verifier(v),
        None => builder()?.with_no_client_auth(),
    }
    .with_single_cert(chain.clone(), key.clone_key())
    .map_err(key_err)?;
    let probe = builder()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(key_err)?;
    Ok(Loaded {
        main: Arc::new(tuned(main)?),
        probe: Arc::new(tuned(probe)?),
        not_after,
    })
}

/// ALPN and resumption, fresh for every load (see the module docs).
fn tuned(mut config: ServerConfig) -> Result<ServerConfig, LoadError> {
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| LoadError {
        var: "TLS_CERT_FILE",
        message: format!("cannot make a session-ticket key: {e}"),
    })?;
    Ok(config)
}
