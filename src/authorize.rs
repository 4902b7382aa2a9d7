//! Deciding which VMI a session may reach.
//!
//! The proxy asks an [`Authorizer`] once per session, after the upgrade
//! request was read and the Origin checked, before any upstream work. The
//! built-in [`JwtAuthorizer`] reads LabOrchestrator's tokens; a host that
//! embeds the loop can plug in its own.
//!
//! An authorizer runs **on the event loop**: it must not block. One whose
//! decision needs I/O (a database, a remote policy service) answers
//! [`Decision::Pending`], keeps the [`Ticket`], and later completes it from
//! any thread with [`Handle::decide`](crate::Handle::decide); other sessions
//! are served meanwhile, and a pending session is refused with 504 if no
//! decision comes within `UPSTREAM_TIMEOUT_SECONDS`.

use std::net::SocketAddr;

use crate::auth::{AuthError, Grant, JwtVerifier, fingerprint};
use crate::config::Config;
use crate::events::{namespace_field, vmi_field};
use crate::http::{Headers, Refusal, Status};
use crate::route::{RouteError, parse_request_target};
use crate::token::{Carriers, TokenSource, find_token};

/// What an authorizer sees of a request.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct AuthRequest<'a> {
    /// The request target as sent (path and query, not decoded).
    pub target: &'a str,
    /// Every header, in order, as sent.
    pub headers: &'a Headers,
    /// The subprotocols the client offered.
    pub protocols: &'a [String],
    /// The client's address.
    pub peer: SocketAddr,
}

impl AuthRequest<'_> {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(self.target, |(p, _)| p)
    }

    /// The raw query string, if any.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }
}

/// Identifies a session waiting for a deferred decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket {
    pub(crate) key: usize,
    pub(crate) id: u64,
}

impl Ticket {
    /// The session's id (as in log lines and events).
    pub fn session_id(&self) -> u64 {
        self.id
    }
}

/// An authorizer's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// The session may reach this namespace and VMI. The proxy still checks
    /// both names against the Kubernetes rules before building any URL.
    Allow(Grant),
    /// Refuse with this status and reason (sent to the client); `log` adds
    /// context for the log line and events only (never sent).
    Deny {
        /// Status and reason for the client.
        refusal: Refusal,
        /// Extra context for the operator (e.g. a token fingerprint).
        log: Option<String>,
        /// The VMI the request asked for, when known (log line and events
        /// only, like `log`).
        vmi: Option<String>,
        /// The namespace the request would have reached, when known (e.g.
        /// from a token whose signature verified).
        namespace: Option<String>,
    },
    /// The decision comes later, through [`Handle::decide`](crate::Handle::decide).
    Pending,
}

impl Decision {
    /// A denial with `status` and `reason`.
    pub fn deny(status: Status, reason: impl Into<String>) -> Decision {
        Decision::Deny {
            refusal: Refusal::new(status, reason),
            log: None,
            vmi: None,
            namespace: None,
        }
    }
}

/// Decides, from the request, which VMI a session may reach.
///
/// Called on the event loop thread: it must return quickly and never block.
pub trait Authorizer: Send {
    /// Decide for one request. `ticket` identifies the session if the answer
    /// is [`Decision::Pending`].
    fn authorize(&mut self, request: &AuthRequest<'_>, ticket: Ticket) -> Decision;
}

/// The built-in authorizer: LabOrchestrator's JWTs from the configured token
/// sources, on the route `/[PREFIX/]TOKEN/VMI` (or `/[PREFIX/]VMI` for the
/// other sources).
#[derive(Debug)]
pub struct JwtAuthorizer {
    verifier: JwtVerifier,
    prefix: Option<String>,
    sources: Vec<TokenSource>,
    cookie: String,
}

impl JwtAuthorizer {
    /// Build it from the configuration (keys, prefix, token sources).
    pub fn new(config: &Config) -> Result<Self, crate::ConfigError> {
        let verifier = JwtVerifier::new(&config.jwt).map_err(|(var, m)| crate::ConfigError {
            var: var.into(),
            message: m,
        })?;
        Ok(JwtAuthorizer {
            verifier,
            prefix: config.path_prefix.clone(),
            sources: config.token_sources.clone(),
            cookie: config.token_cookie.clone(),
        })
    }
}

impl Authorizer for JwtAuthorizer {
    fn authorize(&mut self, req: &AuthRequest<'_>, _ticket: Ticket) -> Decision {
        let path_token = self.sources.contains(&TokenSource::Path);
        let other = self.sources.iter().any(|s| *s != TokenSource::Path);
        let route =
            match parse_request_target(req.target, self.prefix.as_deref(), path_token, other) {
                Ok(r) => r,
                Err(e @ RouteError::NotFound(_)) => {
                    return Decision::deny(Status::NotFound, e.to_string());
                }
                Err(e @ (RouteError::BadEncoding | RouteError::BadQueryValue(_))) => {
                    return Decision::deny(Status::BadRequest, e.to_string());
                }
            };
        let cookies: Vec<&str> = req.headers.get_all("cookie").collect();
        let carriers = Carriers {
            query: route.query.as_deref(),
            authorization: req.header("authorization"),
            cookies: &cookies,
            protocols: req.protocols,
        };
        let vmi = vmi_field(&route.vmi);
        let Some(token) = route
            .path_token
            .or_else(|| find_token(&self.sources, &carriers, &self.cookie))
        else {
            return Decision::Deny {
                refusal: Refusal::new(Status::Unauthorized, "token missing"),
                log: None,
                vmi,
                namespace: None,
            };
        };
        match self.verifier.authorize(&token, &route.vmi) {
            Ok(grant) => Decision::Allow(grant),
            // The token never reaches a log line: its fingerprint and id let
            // an operator match the line with a user's report.
            Err(e) => Decision::Deny {
                refusal: Refusal::new(e.status(), e.to_string()),
                log: Some(format!(
                    "token {}, id {}",
                    fingerprint(&token),
                    JwtVerifier::unverified_id(&token)
                )),
                vmi,
                // These are decided after the signature verified: the
                // namespace is the issuer's word, not the client's.
                namespace: match e {
                    AuthError::Expired | AuthError::NotYetValid | AuthError::Forbidden(_) => {
                        verified_namespace(&token)
                    }
                    _ => None,
                },
            },
        }
    }
}

/// The namespace in a token's claims, read without any check: call it only
/// for a token whose signature verified.
fn verified_namespace(token: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Claims {
        lab_instance: LabInstance,
    }
    #[derive(serde::Deserialize)]
    struct LabInstance {
        namespace_name: String,
    }
    let claims: Claims = serde_json::from_slice(&crate::auth::payload_json(token)?).ok()?;
    namespace_field(&claims.lab_instance.namespace_name)
}
