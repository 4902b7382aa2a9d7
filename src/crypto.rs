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
/// the README is measured with it, and moving to aws-lc-rs is a change to
/// measure on its own. The deprecation is the reminder. A first measurement
/// (2026-12-07, this provider swapped for rustls' aws-lc-rs default with
/// `prefer-post-quantum`, against the nginx bench's *ring* peers, which offer
/// no post-quantum group; two runs of each binary, taking turns, with
/// `BENCH_PROXY_BIN`): release binary 3.8 -> 6.0 MB, clean release build 64 ->
/// 80 s; CPU per 1,000 new sessions with a TLS upstream 0.19-0.21 -> 0.32-0.34 s
/// (an ML-KEM key share made for every handshake and not used), with TLS on
/// both sides 0.29-0.30 -> 0.43-0.44 s, with a TLS client alone unchanged
/// (0.19); idle memory per TLS session about 2-3 KiB more. Against a
/// post-quantum API server the handshake would cost more again (decapsulation).
///
/// Key exchange in the order browsers and Go's crypto/tls prefer, X25519
/// first: rustls 0.23.48 also moved P-384 to the head of *ring*'s default
/// groups, so a client would make a P-384 key share for every handshake.
/// Towards a `wss://` upstream that tripled the proxy's CPU per new session
/// (0.187 -> 0.650 s per 1,000 in the nginx bench, 2026-12-07), for a
/// group the API server would not have asked for.
#[allow(deprecated)]
pub(crate) fn provider() -> CryptoProvider {
    use rustls::crypto::ring::kx_group;
    CryptoProvider {
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1],
        ..rustls::crypto::ring::default_provider()
    }
}
