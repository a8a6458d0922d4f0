//! Authentication and per-tenant key scopes.
//!
//! [`AuthLayer`] runs in front of every gRPC service. It works out who is
//! calling — a bearer token from the `authorization` header, or else the
//! subject of a mutual-TLS client certificate — and refuses a call without
//! valid credentials with UNAUTHENTICATED before its body is even decoded.
//! It hands its decision to the service as an [`Access`] in the request's
//! extensions; the lock service then checks every key against it
//! ([`Access::authorize`]), KeepAlive once per message, and answers
//! PERMISSION_DENIED for a key outside the caller's prefixes.
//!
//! An [`Access::Caller`] remembers the credential, not the scope: each
//! check looks the credential up in the policy in force, so a token removed
//! from the auth file (reloaded on SIGHUP) stops working on streams that
//! are already open, at their next message.
//!
//! This module decides who and which keys; it never touches locks or the
//! store, and never logs or prints a token.

mod layer;
mod policy;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tonic::transport::CertificateDer;

pub use layer::{Auth, AuthLayer};
pub use policy::{MIN_TOKEN_BYTES, Policy, Tenant, TenantQuotas, TokenHash, hash_token};

use crate::lock::{LockError, LockKey};

/// The auth policy of one server, swappable at run time.
pub struct Authenticator {
    policy: ArcSwap<Policy>,
    file: Option<PathBuf>,
    protect_health: bool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("file", &self.file)
            .field("tenants", &self.policy.load().len())
            .field("protect_health", &self.protect_health)
            .finish()
    }
}

impl Authenticator {
    /// Loads the auth file at `path` (see [`Policy::parse`] for its format).
    /// `protect_health` also requires credentials for health and reflection,
    /// which are otherwise open so that probes and tools need no token.
    pub fn from_file(path: impl Into<PathBuf>, protect_health: bool) -> Result<Self, String> {
        let path = path.into();
        let policy = read_policy(&path)?;
        Ok(Self {
            policy: ArcSwap::from_pointee(policy),
            file: Some(path),
            protect_health,
        })
    }

    /// An authenticator over an already parsed policy (nothing to reload).
    pub fn new(policy: Policy, protect_health: bool) -> Self {
        Self {
            policy: ArcSwap::from_pointee(policy),
            file: None,
            protect_health,
        }
    }

    /// Re-reads the auth file. On any error the policy in force stays, and
    /// the error says why; on success the new policy applies to the next
    /// call and the next KeepAlive message. Returns the tenant count.
    pub fn reload(&self) -> Result<usize, String> {
        let Some(path) = &self.file else {
            return Err("no auth file to reload".into());
        };
        let policy = read_policy(path)?;
        let tenants = policy.len();
        self.policy.store(Arc::new(policy));
        Ok(tenants)
    }

    /// The auth file, if the policy came from one.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Whether health and reflection need credentials too.
    pub fn protects_health(&self) -> bool {
        self.protect_health
    }

    /// Works out the credential of a call and checks that it belongs to a
    /// tenant now. A bearer token, when present, decides alone (a wrong
    /// token is refused even over mutual TLS); without one, the client
    /// certificate's subject CN and DNS names are looked up.
    fn identify(
        &self,
        headers: &http::HeaderMap,
        certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<(Credential, String), LockError> {
        let credential = match headers.get(http::header::AUTHORIZATION) {
            Some(value) => Credential::Token(bearer(value)?),
            None => match certs.and_then(|c| c.first()) {
                Some(leaf) => Credential::Certificate(certificate_names(leaf)?),
                None => {
                    return Err(LockError::Unauthenticated(
                        "missing credentials: send `authorization: Bearer <token>`".into(),
                    ));
                }
            },
        };
        let tenant = credential.tenant(&self.policy.load())?.name.clone();
        Ok((credential, tenant))
    }
}

fn read_policy(path: &Path) -> Result<Policy, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read auth file {}: {e}", path.display()))?;
    Policy::parse(&text).map_err(|e| format!("auth file {}: {e}", path.display()))
}

/// The token of an `authorization: Bearer <token>` header, hashed at once.
fn bearer(value: &http::HeaderValue) -> Result<TokenHash, LockError> {
    let malformed =
        || LockError::Unauthenticated("the authorization header must be `Bearer <token>`".into());
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(malformed());
    }
    Ok(hash_token(token))
}

/// The subject CN and the DNS subject alternative names of a certificate.
fn certificate_names(der: &CertificateDer<'_>) -> Result<Vec<String>, LockError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|_| {
        LockError::Unauthenticated("the client certificate could not be parsed".into())
    })?;
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push((*dns).to_string());
            }
        }
    }
    Ok(names)
}

/// What identifies a caller, kept for later checks against the policy.
enum Credential {
    /// SHA-256 of the bearer token; the token itself is not kept.
    Token(TokenHash),
    /// The client certificate's CN and DNS names.
    Certificate(Vec<String>),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Token(_) => f.write_str("Token(<redacted>)"),
            Credential::Certificate(names) => f.debug_tuple("Certificate").field(names).finish(),
        }
    }
}

impl Credential {
    fn tenant<'p>(&self, policy: &'p Policy) -> Result<&'p Tenant, LockError> {
        match self {
            Credential::Token(hash) => policy
                .by_token(hash)
                .ok_or_else(|| LockError::Unauthenticated("unknown bearer token".into())),
            Credential::Certificate(names) => policy
                .by_certificate(names)
                .map_err(LockError::Unauthenticated)?
                .ok_or_else(|| {
                    LockError::Unauthenticated(
                        "no bearer token, and the client certificate maps to no tenant".into(),
                    )
                }),
        }
    }
}

/// What the auth layer decided about a call; the service reads it from the
/// request's extensions.
#[derive(Clone)]
pub enum Access {
    /// Authentication is off: every key is allowed.
    Open,
    /// An authenticated caller, limited to its tenant's prefixes.
    Caller(Arc<Caller>),
}

/// An authenticated caller.
pub struct Caller {
    auth: Arc<Authenticator>,
    credential: Credential,
    /// The tenant when the call was authenticated, for logs.
    tenant: String,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Access::Open => f.write_str("Open"),
            Access::Caller(c) => f.debug_tuple("Caller").field(&c.tenant).finish(),
        }
    }
}

impl Access {
    /// The decision the auth layer attached to a request. Its absence is a
    /// bug in the server's assembly, and fails closed.
    pub fn of(extensions: &http::Extensions) -> Result<Access, LockError> {
        extensions.get::<Access>().cloned().ok_or_else(|| {
            LockError::Internal("no authentication decision reached the service".into())
        })
    }

    /// The tenant's name, for logs (`None` when authentication is off).
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Access::Open => None,
            Access::Caller(c) => Some(&c.tenant),
        }
    }

    /// The tenant's own quotas in the policy in force now (none when
    /// authentication is off, or the credential was revoked).
    pub fn quotas(&self) -> TenantQuotas {
        match self {
            Access::Open => Default::default(),
            Access::Caller(c) => {
                let policy = c.auth.policy.load();
                c.credential
                    .tenant(&policy)
                    .map(|t| t.quotas)
                    .unwrap_or_default()
            }
        }
    }

    /// Checks that this caller has the admin grant (`admin = true` on its
    /// tenant) in the policy in force now. Without authentication every
    /// caller passes: the server then serves the AdminService only when
    /// `--admin` asked for it.
    pub fn authorize_admin(&self) -> Result<(), LockError> {
        let Access::Caller(caller) = self else {
            return Ok(());
        };
        let policy = caller.auth.policy.load();
        let tenant = caller.credential.tenant(&policy)?;
        if tenant.admin {
            return Ok(());
        }
        Err(LockError::PermissionDenied(format!(
            "tenant {:?} has no admin grant (`admin = true` in the auth file)",
            tenant.name
        )))
    }

    /// Whether this caller may see `key` (for List, which skips keys out
    /// of scope rather than failing on them). Nothing is logged.
    pub fn permits(&self, key: &LockKey) -> bool {
        let Access::Caller(caller) = self else {
            return true;
        };
        let policy = caller.auth.policy.load();
        caller
            .credential
            .tenant(&policy)
            .is_ok_and(|t| t.permits(key))
    }

    /// The prefix a listing of `requested` needs to scan for this caller:
    /// narrowed to the one tenant prefix that extends it (an admin of
    /// `team-a/` listing everything scans only `team-a/`), `None` when no
    /// key it may see can start with `requested`. Keys are still checked
    /// one by one ([`Access::permits`]): this only saves scanning.
    pub fn list_prefix(&self, requested: &str) -> Option<String> {
        let Access::Caller(caller) = self else {
            return Some(requested.to_owned());
        };
        let policy = caller.auth.policy.load();
        let tenant = caller.credential.tenant(&policy).ok()?;
        if tenant
            .prefixes
            .iter()
            .any(|p| requested.starts_with(p.as_str()))
        {
            return Some(requested.to_owned());
        }
        let mut longer = tenant.prefixes.iter().filter(|p| p.starts_with(requested));
        match (longer.next(), longer.next()) {
            (None, _) => None,
            (Some(only), None) => Some(only.clone()),
            (Some(_), Some(_)) => Some(requested.to_owned()),
        }
    }

    /// Checks that this caller may use `key`, against the policy in force
    /// now: UNAUTHENTICATED if its credential no longer belongs to any
    /// tenant, PERMISSION_DENIED if the key is outside its prefixes.
    pub fn authorize(&self, key: &LockKey) -> Result<(), LockError> {
        let Access::Caller(caller) = self else {
            return Ok(());
        };
        let policy = caller.auth.policy.load();
        let tenant = caller.credential.tenant(&policy)?;
        if tenant.permits(key) {
            return Ok(());
        }
        tracing::debug!(
            tenant = tenant.name.as_str(),
            key = key.as_str(),
            "permission denied"
        );
        Err(LockError::PermissionDenied(format!(
            "key {:?} is outside the prefixes of tenant {:?} ({})",
            key.as_str(),
            tenant.name,
            tenant
                .prefixes
                .iter()
                .map(|p| format!("{p:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn bearer_tokens_identify_tenants() {
        let policy = Policy::parse(
            "[[tenant]]\nname = \"a\"\nprefixes = [\"a/\"]\ntokens = [\"tok-a-0123456789abcdef\"]",
        )
        .unwrap();
        let auth = Arc::new(Authenticator::new(policy, false));
        let (credential, tenant) = auth
            .identify(&headers("Bearer tok-a-0123456789abcdef"), None)
            .unwrap();
        assert_eq!(tenant, "a");
        let access = Access::Caller(Arc::new(Caller {
            auth: auth.clone(),
            credential,
            tenant,
        }));
        assert!(
            access
                .authorize(&LockKey::parse("a/1", 512).unwrap())
                .is_ok()
        );
        let denied = access
            .authorize(&LockKey::parse("b/1", 512).unwrap())
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        for bad in [
            "Bearer nope-0123456789abcdef",
            "Basic abc",
            "Bearer ",
            "tok",
        ] {
            let err = auth.identify(&headers(bad), None).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad}");
            assert!(!err.to_string().contains("0123456789"), "{err}");
        }
        let err = auth.identify(&http::HeaderMap::new(), None).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(format!("{access:?}").contains("\"a\""));
        assert_eq!(access.list_prefix("").as_deref(), Some("a/"));
        assert_eq!(access.list_prefix("a").as_deref(), Some("a/"));
        assert_eq!(access.list_prefix("a/x").as_deref(), Some("a/x"));
        assert_eq!(access.list_prefix("b"), None);
        assert_eq!(Access::Open.list_prefix("b").as_deref(), Some("b"));
    }
}
