//! The TLS cryptography the proxy uses, on both of its sides: one choice,
//! made here.

use rustls::crypto::CryptoProvider;

/// rustls over *ring*, for the listener's `wss://` and the upstream's.
///
/// rustls 0.23.48 deprecates this provider because *ring* has no
/// post-quantum key exchange: with it a handshake agrees on X25519, P-256 or
/// P-384, never the hybrid X25519MLKEM768 that current browsers offer first
/// and Go's crypto/tls (the API server's) prefers, and which rustls has only
/// over aws-lc-rs. We keep *ring* for now: it builds with a C compiler alone and
/// links statically into the scratch image (`deploy/`), every TLS figure in
/// the README is measured with it, and moving to aws-lc-rs (a larger build,
/// a larger binary, a larger ClientHello and more CPU per handshake) is a
/// change to measure on its own. The deprecation is the reminder.
#[allow(deprecated)]
pub(crate) fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}
