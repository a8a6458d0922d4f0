//! Certificates made at test time (rcgen): a CA, server certificates for
//! 127.0.0.1 and localhost, client certificates with a chosen CN, all
//! written as PEM files into a temporary directory; and a redis-server
//! that speaks only TLS and knows only one ACL user.

#![allow(dead_code)]

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::common::{RedisServer, free_port};

/// A test certificate authority and the directory its files live in.
pub struct Pki {
    dir: tempfile::TempDir,
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub ca_pem: String,
    pub ca_path: PathBuf,
}

/// A certificate and its key, as PEM strings and as files.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl Pki {
    /// A fresh CA named `name`.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("leasehold-pki-")
            .tempdir()
            .expect("tempdir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("CA certificate");
        let ca_pem = issuer.pem();
        let ca_path = dir.path().join(format!("{name}-ca.pem"));
        std::fs::write(&ca_path, &ca_pem).expect("write CA");
        Self {
            dir,
            issuer,
            ca_pem,
            ca_path,
        }
    }

    fn leaf(&self, file: &str, cn: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Leaf {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let leaf = Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_path: self.dir.path().join(format!("{file}.pem")),
            key_path: self.dir.path().join(format!("{file}-key.pem")),
        };
        std::fs::write(&leaf.cert_path, &leaf.cert_pem).expect("write cert");
        std::fs::write(&leaf.key_path, &leaf.key_pem).expect("write key");
        leaf
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self) -> Leaf {
        self.leaf(
            "server",
            "leasehold test server",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate with subject CN `cn` and DNS names `dns`.
    pub fn client(&self, cn: &str, dns: &[&str]) -> Leaf {
        self.leaf(
            &format!("client-{cn}"),
            cn,
            dns,
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    /// Somewhere to write other files that live as long as this CA.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

/// The ACL user the TLS Redis knows, and its password.
pub const REDIS_USER: &str = "leasehold";
pub const REDIS_PASSWORD: &str = "redis-pw-7f3a9c2e51d04b68";

/// A key prefix the ACL user may use, unique to one server.
pub fn acl_prefix() -> String {
    format!("leasehold:{}", crate::common::unique_prefix())
}

/// A redis-server whose TLS port requires the ACL user [`REDIS_USER`] (the
/// default user is off) and, with `client_certs`, a client certificate
/// signed by `pki`. Its plain port is bound to 127.0.0.1 but needs the same
/// credentials. Returns the server and its TLS port.
pub fn tls_acl_redis(pki: &Pki, client_certs: bool) -> (RedisServer, u16) {
    let server = pki.server();
    let tls_port = free_port().to_string();
    let password = format!(">{REDIS_PASSWORD}");
    let cert = server.cert_path.to_string_lossy().to_string();
    let key = server.key_path.to_string_lossy().to_string();
    let ca = pki.ca_path.to_string_lossy().to_string();
    let auth_clients = if client_certs { "yes" } else { "no" };
    let redis = RedisServer::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        auth_clients,
        // redis-server quotes each argument on its own: one word each.
        // As documentation/security.md recommends: its own keys and
        // channels, nothing administrative or dangerous.
        "--user",
        REDIS_USER,
        "on",
        &password,
        "~leasehold:*",
        "&leasehold:*",
        "+@all",
        "-@admin",
        "-@dangerous",
        "--user",
        "default",
        "off",
    ]);
    (redis, tls_port.parse().expect("port"))
}

/// `rediss://USER:PASSWORD@127.0.0.1:PORT`.
pub fn rediss_url(port: u16, password: &str) -> String {
    format!("rediss://{REDIS_USER}:{password}@127.0.0.1:{port}")
}
