//! How to reach Redis: the URL, the pool, the store timeout, TLS. Never
//! logs the URL as given: it may hold a password.

use std::sync::Arc;
use std::time::Duration;

/// How to reach Redis.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://`, `rediss://`, `redis-cluster://` or `redis-sentinel://`,
    /// with `user:password@` for an ACL user. Never logged: it may hold the
    /// password (`Debug` redacts it).
    pub url: String,
    /// Prefix of every Redis key and channel; must not contain braces.
    pub prefix: String,
    /// Connections in the command pool.
    pub pool_size: usize,
    /// Upper bound on every Redis call; past it the call is UNAVAILABLE.
    pub timeout: Duration,
    /// Trust and identity for `rediss://`; `None` trusts the system's CAs.
    pub tls: Option<RedisTls>,
    /// Replicas that must acknowledge a grant (`WAIT`) before it is
    /// answered; 0 answers as soon as the primary granted.
    pub min_replica_acks: u32,
    /// The most operations sent to a single node in one script call; 1
    /// sends each alone. Ignored on a Redis Cluster.
    pub batch_max: usize,
}

/// TLS settings for a `rediss://` URL, PEM as read from the files.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// CAs that Redis's certificate must chain to (instead of the system's).
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate chain and key, for Redis's `tls-auth-clients yes`.
    pub client_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.client_pem.is_some())
            .finish()
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .field("tls", &self.tls)
            .field("min_replica_acks", &self.min_replica_acks)
            .field("batch_max", &self.batch_max)
            .finish()
    }
}

/// `scheme://user:password@host...` with the password (or a lone
/// password) replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let user = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{scheme}://{user}{}", &rest[at..])
}

/// `--pool-size`'s default: Redis connections in the command pool.
pub const DEFAULT_POOL_SIZE: usize = 4;
/// `--redis-batch`'s default: most operations in one script call.
pub const DEFAULT_BATCH_MAX: usize = 64;

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            prefix: "leasehold:".into(),
            pool_size: DEFAULT_POOL_SIZE,
            timeout: Duration::from_secs(2),
            tls: None,
            min_replica_acks: 0,
            batch_max: DEFAULT_BATCH_MAX,
        }
    }
}

/// A rustls client configuration for fred: the given CAs (or the system's)
/// and, optionally, a client certificate. ring, the one crypto provider
/// compiled in, is named explicitly so no process-wide default is needed.
pub(super) fn redis_tls_connector(
    tls: &RedisTls,
) -> Result<fred::types::config::TlsConnector, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("--redis-tls-ca: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("--redis-tls-ca: {e}"))?;
            }
            if roots.is_empty() {
                return Err("--redis-tls-ca: no certificate in the file".into());
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs().certs;
            let (added, _) = roots.add_parsable_certificates(native);
            if added == 0 {
                return Err(
                    "rediss:// without --redis-tls-ca, and no system CA certificates found".into(),
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("redis TLS: {e}"))?
        .with_root_certificates(roots);
    let config = match &tls.client_pem {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--redis-tls-cert: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(key_pem)
                .map_err(|e| format!("--redis-tls-key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("--redis-tls-cert/--redis-tls-key: {e}"))?
        }
    };
    Ok(config.into())
}
