//! What every client subcommand shares: the flags that say which servers to
//! talk to, the exit codes, and turning an SDK error into one line on
//! stderr and its exit code.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use crate::client::{Client, Error};

/// Exit codes of the client subcommands (documented in the README).
pub mod exit {
    /// Released, renewed, described, or CMD exited 0.
    pub const OK: i32 = 0;
    /// Any other error (a limit hit, a deadline, a server bug).
    pub const FAILURE: i32 = 1;
    /// The command line itself is wrong (clap's own code, as for `serve`).
    pub const USAGE: i32 = 2;
    /// The server rejected an argument (invalid key, TTL out of bounds,
    /// too much metadata) (EX_USAGE).
    pub const INVALID: i32 = 64;
    /// No server could be reached or all were unavailable (EX_UNAVAILABLE).
    pub const UNAVAILABLE: i32 = 69;
    /// The lock was not acquired within `--wait` (EX_TEMPFAIL).
    pub const NOT_ACQUIRED: i32 = 75;
    /// The lock was lost while CMD ran (CMD was stopped), or the token no
    /// longer holds the lock (`release`, `renew`).
    pub const LOST: i32 = 76;
    /// Not authenticated or not permitted (EX_NOPERM).
    pub const DENIED: i32 = 77;
    /// The local configuration is wrong: a malformed endpoint, a file
    /// that cannot be read (`--tls-ca`, ...), `https://` to a plaintext
    /// server or `http://` to a TLS one (EX_CONFIG). Retrying cannot help.
    pub const CONFIG: i32 = 78;
    /// CMD could not be executed (as in shells).
    pub const CANNOT_EXECUTE: i32 = 126;
    /// CMD was not found (as in shells).
    pub const NOT_FOUND: i32 = 127;
}

/// Which servers to talk to, and for how long to retry them.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Leasehold server URL (`http://host:port` or `host:port`). Repeat the
    /// flag, or separate URLs with commas, to fail over between servers.
    #[arg(
        long = "endpoint",
        value_name = "URL",
        env = "LEASEHOLD_ENDPOINT",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:50051"
    )]
    pub endpoints: Vec<String>,
    /// How long to keep retrying (with backoff, across endpoints) while no
    /// server is available, before giving up with exit code 69.
    #[arg(long, env = "LEASEHOLD_RETRY_FOR", default_value = "10s", value_parser = humantime::parse_duration)]
    pub retry_for: Duration,
    /// Bound on each connection attempt to one server.
    #[arg(long, env = "LEASEHOLD_CONNECT_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// PEM CA bundle to verify `https://` servers with (default: the
    /// system's CAs).
    #[arg(long, env = "LEASEHOLD_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for servers that require mutual TLS.
    #[arg(
        long,
        env = "LEASEHOLD_TLS_CLIENT_CERT",
        value_name = "PEM",
        requires = "tls_client_key"
    )]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert.
    #[arg(
        long,
        env = "LEASEHOLD_TLS_CLIENT_KEY",
        value_name = "PEM",
        requires = "tls_client_cert"
    )]
    pub tls_client_key: Option<PathBuf>,
    /// Name to verify the server's certificate against, instead of the
    /// endpoint's host.
    #[arg(long, env = "LEASEHOLD_TLS_DOMAIN", value_name = "NAME")]
    pub tls_domain: Option<String>,
    /// File holding the bearer token to authenticate with (first line), for
    /// servers with an auth file. Prefer this or LEASEHOLD_AUTH_TOKEN to
    /// --auth-token: a flag's value shows in `ps`.
    #[arg(long, env = "LEASEHOLD_AUTH_TOKEN_FILE", value_name = "PATH")]
    pub auth_token_file: Option<PathBuf>,
    /// The bearer token itself (never printed). Not the lease token that
    /// `release` and `renew` take.
    #[arg(
        long,
        env = "LEASEHOLD_AUTH_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        conflicts_with = "auth_token_file"
    )]
    pub auth_token: Option<AuthToken>,
}

/// A bearer token given on the command line or in the environment; its
/// `Debug` never shows it.
#[derive(Clone)]
pub struct AuthToken(String);

impl std::str::FromStr for AuthToken {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// An error in a local flag's value, found before any server was asked.
/// It names the flag first (`--tls-ca ...`), which no server message does;
/// [`code_of`] tells it from a server's INVALID_ARGUMENT that way, as the
/// SDK's error type has no variant for local configuration.
fn local(flag: &str, what: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("--{flag} {what}"))
}

fn is_local(error: &Error) -> bool {
    matches!(error, Error::InvalidArgument(m) if m.starts_with("--"))
}

fn read_file(flag: &str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| local(flag, format_args!("{}: {e}", path.display())))
}

/// How long a connection may take before looking for a TLS/plaintext
/// mismatch: the happy path never probes.
const MISMATCH_PROBE_AFTER: Duration = Duration::from_millis(300);

/// Pends until it finds an endpoint whose scheme does not match what its
/// server speaks (`https://` to plaintext HTTP/2, `http://` to TLS), then
/// says which and how to fix it. Pends forever if none does.
async fn mismatch(endpoints: &[String], timeout: Duration) -> Error {
    tokio::time::sleep(MISMATCH_PROBE_AFTER).await;
    for endpoint in endpoints {
        if let Some(reason) = probe(endpoint, timeout).await {
            return Error::InvalidEndpoint {
                endpoint: endpoint.clone(),
                reason,
            };
        }
    }
    std::future::pending().await
}

/// Sends the HTTP/2 client preface to `endpoint` and reads what comes
/// back: an HTTP/2 SETTINGS frame means plaintext HTTP/2, a TLS alert
/// record means TLS. `Some(hint)` when that contradicts the scheme.
async fn probe(endpoint: &str, timeout: Duration) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let uri: http::Uri = endpoint.parse().ok()?;
    let tls = uri.scheme_str() == Some("https");
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let exchange = async {
        let mut socket = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        // The preface, then an empty SETTINGS frame.
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        socket.write_all(&hello).await.ok()?;
        let mut head = [0u8; 9];
        let mut got = 0;
        while got < head.len() {
            match socket.read(&mut head[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        Some((head, got))
    };
    let (head, got) = tokio::time::timeout(timeout, exchange).await.ok()??;
    let plaintext_h2 = got == head.len() && head[3] == 4;
    let tls_alert = got >= 3 && head[0] == 0x15 && head[1] == 3;
    let authority = uri.authority()?.as_str();
    if tls && plaintext_h2 {
        Some(format!(
            "the server speaks plaintext HTTP/2, not TLS: use http://{authority}, \
             or start the server with --tls-cert and --tls-key"
        ))
    } else if !tls && tls_alert {
        Some(format!(
            "the server speaks TLS: use https://{authority} (with --tls-ca if its \
             certificate is not signed by a system CA)"
        ))
    } else {
        None
    }
}

impl ConnectArgs {
    /// A client connected to the first serving endpoint.
    pub async fn connect(&self) -> Result<Client, Error> {
        let mut builder = Client::builder()
            .endpoints(self.endpoints.clone())
            .retry_for(self.retry_for)
            .connect_timeout(self.connect_timeout);
        if let Some(path) = &self.tls_ca {
            builder = builder.tls_ca_pem(read_file("tls-ca", path)?);
        }
        if let (Some(cert), Some(key)) = (&self.tls_client_cert, &self.tls_client_key) {
            builder = builder.tls_identity_pem(
                read_file("tls-client-cert", cert)?,
                read_file("tls-client-key", key)?,
            );
        }
        if let Some(domain) = &self.tls_domain {
            builder = builder.tls_domain(domain.clone());
        }
        if let Some(path) = &self.auth_token_file {
            let text = String::from_utf8(read_file("auth-token-file", path)?).map_err(|_| {
                local(
                    "auth-token-file",
                    format_args!("{}: not UTF-8", path.display()),
                )
            })?;
            let token = text.lines().next().unwrap_or_default().trim().to_string();
            if token.is_empty() {
                return Err(local(
                    "auth-token-file",
                    format_args!("{}: the file is empty", path.display()),
                ));
            }
            builder = builder.bearer_token(token);
        } else if let Some(AuthToken(token)) = &self.auth_token {
            builder = builder.bearer_token(token.clone());
        }
        tokio::select! {
            connected = builder.connect() => connected,
            wrong = mismatch(&self.endpoints, self.connect_timeout) => Err(wrong),
        }
    }
}

/// The exit code for an SDK error.
pub fn code_of(error: &Error) -> i32 {
    match error {
        Error::InvalidEndpoint { .. } => exit::CONFIG,
        e if is_local(e) => exit::CONFIG,
        Error::InvalidArgument(_) => exit::INVALID,
        Error::Unavailable { .. } => exit::UNAVAILABLE,
        Error::NotAcquired { .. } => exit::NOT_ACQUIRED,
        Error::Lost { .. } => exit::LOST,
        Error::Unauthenticated(_) | Error::PermissionDenied(_) => exit::DENIED,
        _ => exit::FAILURE,
    }
}

/// Prints `error` as one line, `leasehold SUBCOMMAND: ...`, and gives its
/// exit code.
pub fn fail(subcommand: &str, error: &Error) -> i32 {
    eprintln!("leasehold {subcommand}: {error}");
    code_of(error)
}

/// The default owner shown by Describe: `HOST:PID`, with the pid of the
/// process that holds the lock (`leasehold lock` itself; for `acquire`, the
/// script that called it).
pub fn default_owner(pid: u32) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{host}:{pid}")
}

/// Parses a `--ttl`: a duration above zero (`0` would silently mean the
/// server's default; leaving the flag out says that). Takes a leading `-`
/// (the flag allows hyphen values) to say that a TTL cannot be negative,
/// rather than clap's hint to pass `-- -5s`, which would end the flags.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let d = parse_duration_not_negative(text)?;
    if d.is_zero() {
        return Err("must be more than 0; leave --ttl out for the server's default TTL".into());
    }
    Ok(d)
}

/// Parses a duration flag that may be `0s` but not negative.
pub fn parse_duration_not_negative(text: &str) -> Result<Duration, String> {
    if let Some(positive) = text.strip_prefix('-') {
        return Err(format!(
            "a duration cannot be negative (did you mean {positive}?)"
        ));
    }
    humantime::parse_duration(text).map_err(|e| format!("{e} (e.g. 500ms, 30s, 5m)"))
}

/// Parses `KEY=VALUE` for `--metadata`.
pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_code_and_one_line() {
        let cases = [
            (Error::InvalidArgument("key: must not be empty".into()), 64),
            (local("tls-ca", "/nope.pem: No such file or directory"), 78),
            (
                Error::InvalidEndpoint {
                    endpoint: "https://127.0.0.1:1".into(),
                    reason: "the server speaks plaintext HTTP/2".into(),
                },
                78,
            ),
            (
                Error::Unavailable {
                    endpoints: "http://127.0.0.1:1".into(),
                    retried_for: Duration::from_secs(1),
                    cause: "Connection refused (os error 111)".into(),
                },
                69,
            ),
            (
                Error::NotAcquired {
                    key: "k".into(),
                    waited: Duration::ZERO,
                    retry_after: Duration::from_secs(1),
                },
                75,
            ),
            (
                Error::Lost {
                    key: "k".into(),
                    reason: crate::client::LostReason::Expired,
                },
                76,
            ),
            (Error::PermissionDenied("key \"a\" is not yours".into()), 77),
            (Error::Unauthenticated("no token".into()), 77),
            (Error::ResourceExhausted("too many waiters".into()), 1),
        ];
        for (error, code) in cases {
            assert_eq!(code_of(&error), code, "{error}");
            let line = error.to_string();
            assert!(!line.contains('\n') && !line.contains("Status {"), "{line}");
        }
        assert_eq!(
            fail("acquire", &Error::PermissionDenied("denied".into())),
            exit::DENIED
        );
    }

    #[test]
    fn every_subcommand_parses() {
        // clap's own consistency checks: unique argument names across the
        // flattened ConnectArgs and each subcommand's arguments, and more.
        use clap::CommandFactory;
        crate::cli::Cli::command().debug_assert();
    }

    #[test]
    fn ttl_flags() {
        assert_eq!(parse_ttl("30s"), Ok(Duration::from_secs(30)));
        assert!(parse_ttl("0").unwrap_err().contains("leave --ttl out"));
        assert!(parse_ttl("0s").unwrap_err().contains("more than 0"));
        assert!(parse_ttl("-5s").unwrap_err().contains("did you mean 5s"));
        assert!(parse_ttl("10").unwrap_err().contains("e.g. 500ms"));
        assert_eq!(parse_duration_not_negative("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn metadata_pairs() {
        assert_eq!(parse_kv("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_kv("=x").is_err());
        assert!(parse_kv("x").is_err());
    }
}
