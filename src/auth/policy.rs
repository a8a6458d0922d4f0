//! The auth file: tenants, the credentials that identify each, and the key
//! prefixes each may use. Parsed and checked whole, so that a bad file is
//! refused at start-up or on reload and never half-applied.
//!
//! ```toml
//! [[tenant]]
//! name = "team-a"
//! prefixes = ["team-a/"]
//! # Plain tokens (hashed on load) or their SHA-256, hex: `sha256:...`.
//! tokens = ["sha256:2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"]
//! # Over mutual TLS: client certificates whose subject CN, or a DNS name
//! # in their subject alternative names, is one of these.
//! certificate_names = ["team-a-worker"]
//! ```

use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::lock::LockKey;

/// Shortest plain token accepted: anything shorter can be guessed.
pub const MIN_TOKEN_BYTES: usize = 16;

/// A SHA-256 digest of a bearer token. Only digests are kept in memory, so
/// the plain tokens of a file that holds `sha256:` entries never exist in
/// the server at all.
pub type TokenHash = [u8; 32];

/// SHA-256 of a presented token.
pub fn hash_token(token: &str) -> TokenHash {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tenant: Vec<TenantEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    name: String,
    prefixes: Vec<String>,
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default)]
    certificate_names: Vec<String>,
}

/// One tenant: a name for logs and errors, and the key prefixes it may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// Shown in logs and in PERMISSION_DENIED messages.
    pub name: String,
    /// A key is the tenant's if it starts with one of these; `""` is every key.
    pub prefixes: Vec<String>,
}

impl Tenant {
    /// Whether this tenant may use `key`.
    pub fn permits(&self, key: &LockKey) -> bool {
        self.prefixes.iter().any(|p| key.as_str().starts_with(p))
    }
}

/// A parsed, checked auth file.
#[derive(Default)]
pub struct Policy {
    tenants: Vec<Tenant>,
    /// Token digests and the index of their tenant.
    tokens: Vec<(TokenHash, usize)>,
    /// Certificate names and the index of their tenant.
    certificates: Vec<(String, usize)>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("tenants", &self.tenants)
            .field("tokens", &self.tokens.len())
            .field("certificates", &self.certificates.len())
            .finish()
    }
}

impl Policy {
    /// Parses and checks the TOML text of an auth file. Errors name the
    /// tenant and the field, never a token.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| {
            // toml's message quotes the offending line, which may be a
            // token: keep only the first line (what and where).
            let message = redact_quoted(e.message());
            match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].lines().count().max(1);
                    format!("line {line}: {message}")
                }
                None => message,
            }
        })?;
        let mut policy = Policy::default();
        for (i, entry) in file.tenant.into_iter().enumerate() {
            let name = entry.name.trim().to_string();
            if name.is_empty() {
                return Err(format!("tenant #{}: name must not be empty", i + 1));
            }
            if policy.tenants.iter().any(|t| t.name == name) {
                return Err(format!("tenant {name:?} is defined twice"));
            }
            if entry.prefixes.is_empty() {
                return Err(format!(
                    "tenant {name:?}: prefixes is empty, so it could use no key (\"\" allows every key)"
                ));
            }
            if entry.tokens.is_empty() && entry.certificate_names.is_empty() {
                return Err(format!(
                    "tenant {name:?}: no tokens and no certificate_names, so nobody can be it"
                ));
            }
            for (n, token) in entry.tokens.iter().enumerate() {
                let hash = parse_token(token)
                    .map_err(|e| format!("tenant {name:?}: token #{}: {e}", n + 1))?;
                let duplicate = policy
                    .tokens
                    .iter()
                    .any(|(h, _)| bool::from(h.ct_eq(&hash)));
                if duplicate {
                    return Err(format!(
                        "tenant {name:?}: token #{} is also another entry's token",
                        n + 1
                    ));
                }
                policy.tokens.push((hash, i));
            }
            for cert in &entry.certificate_names {
                if cert.is_empty() {
                    return Err(format!(
                        "tenant {name:?}: certificate_names holds an empty name"
                    ));
                }
                if policy.certificates.iter().any(|(c, _)| c == cert) {
                    return Err(format!(
                        "tenant {name:?}: certificate name {cert:?} is mapped twice"
                    ));
                }
                policy.certificates.push((cert.clone(), i));
            }
            policy.tenants.push(Tenant {
                name,
                prefixes: entry.prefixes,
            });
        }
        if policy.tenants.is_empty() {
            return Err("no [[tenant]] entries: nobody could call the lock service".into());
        }
        Ok(policy)
    }

    /// How many tenants the file defines.
    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    /// Whether the file defines no tenant (never true of a parsed file).
    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    /// The tenant a token digest belongs to. Every entry is compared, in
    /// constant time, whatever matches: the time taken says nothing about
    /// which entry, if any, matched or how much of it did.
    pub fn by_token(&self, hash: &TokenHash) -> Option<&Tenant> {
        let mut found = None;
        for (candidate, tenant) in &self.tokens {
            if bool::from(candidate.ct_eq(hash)) {
                found = Some(*tenant);
            }
        }
        found.and_then(|i| self.tenants.get(i))
    }

    /// The tenant a client certificate's names map to. `Err` when they map
    /// to several tenants: an ambiguous certificate is refused, not guessed.
    pub fn by_certificate(&self, names: &[String]) -> Result<Option<&Tenant>, String> {
        let mut found: Option<usize> = None;
        for (name, tenant) in &self.certificates {
            if names.iter().any(|n| n == name) {
                match found {
                    Some(other) if other != *tenant => {
                        return Err(
                            "the client certificate's names map to more than one tenant".into()
                        );
                    }
                    _ => found = Some(*tenant),
                }
            }
        }
        Ok(found.and_then(|i| self.tenants.get(i)))
    }
}

/// Replaces every `"..."` in a parser message with `"<redacted>"`: serde
/// quotes the offending value ("invalid type: string \"...\""), and that
/// value may be a token.
fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut parts = message.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    for (i, part) in parts.enumerate() {
        if i % 2 == 0 {
            out.push_str("\"<redacted>\"");
        } else {
            out.push_str(part);
        }
    }
    out.lines().next().unwrap_or_default().to_string()
}

fn parse_token(token: &str) -> Result<TokenHash, String> {
    if let Some(hex_digest) = token.strip_prefix("sha256:") {
        let bytes = hex::decode(hex_digest.trim())
            .map_err(|_| "a sha256: entry must be 64 hex digits".to_string())?;
        return <TokenHash>::try_from(bytes.as_slice())
            .map_err(|_| "a sha256: entry must be 64 hex digits".to_string());
    }
    if token.len() < MIN_TOKEN_BYTES {
        return Err(format!(
            "shorter than {MIN_TOKEN_BYTES} bytes; use a long random token"
        ));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or a control character".into());
    }
    Ok(hash_token(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[tenant]]
name = "team-a"
prefixes = ["team-a/"]
tokens = ["team-a-token-0123456789"]
certificate_names = ["team-a-worker"]

[[tenant]]
name = "team-b"
prefixes = ["team-b/", "shared/"]
tokens = ["sha256:2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"]
"#;

    fn key(k: &str) -> LockKey {
        LockKey::parse(k, 512).unwrap()
    }

    #[test]
    fn tokens_and_hashes_map_to_tenants() {
        let p = Policy::parse(FILE).unwrap();
        assert_eq!(p.len(), 2);
        let a = p.by_token(&hash_token("team-a-token-0123456789")).unwrap();
        assert_eq!(a.name, "team-a");
        assert!(a.permits(&key("team-a/x")));
        assert!(!a.permits(&key("team-b/x")));
        // sha256("secret") as in the file.
        let b = p.by_token(&hash_token("secret")).unwrap();
        assert!(b.permits(&key("shared/y")));
        assert!(p.by_token(&hash_token("nope")).is_none());
        let names = vec!["team-a-worker".to_string()];
        assert_eq!(p.by_certificate(&names).unwrap().unwrap().name, "team-a");
        assert!(p.by_certificate(&["x".into()]).unwrap().is_none());
        assert!(!format!("{p:?}").contains("team-a-token"));
    }

    #[test]
    fn bad_files_are_refused_without_echoing_tokens() {
        let cases = [
            ("", "no [[tenant]]"),
            (
                "[[tenant]]\nname = \"a\"\nprefixes = []\ntokens = [\"0123456789abcdefgh\"]",
                "prefixes is empty",
            ),
            (
                "[[tenant]]\nname = \"a\"\nprefixes = [\"a/\"]\ntokens = [\"short-secret\"]",
                "shorter than",
            ),
            (
                "[[tenant]]\nname = \"a\"\nprefixes = [\"a/\"]\ntokens = [\"sha256:zz\"]",
                "64 hex",
            ),
            (
                "[[tenant]]\nname = \"a\"\nprefixes = [\"a/\"]",
                "nobody can be it",
            ),
            (
                "[[tenant]]\nname = \"a\"\nprefixes = [\"a/\"]\ntoken = [\"0123456789abcdefgh\"]",
                "line",
            ),
            (
                "[[tenant]]\nname = \"a\"\nprefixes = [\"a/\"]\ntokens = [\"0123456789abcdefgh\"]\n[[tenant]]\nname = \"b\"\nprefixes = [\"b/\"]\ntokens = [\"0123456789abcdefgh\"]",
                "another entry",
            ),
            (
                "[[tenant]]\nname = \"a\"\nprefixes = [\"a/\"]\ntokens = [\"0123456789abcdefgh\"]\n[[tenant]]\nname = \"a\"\nprefixes = [\"b/\"]\ntokens = [\"0123456789abcdefgX\"]",
                "twice",
            ),
            (
                "[[tenant]]\nname = \"a\"\nprefixes = [\"a/\"]\ntokens = [\"0123456789abcdefgh\" ",
                "line",
            ),
            (
                "[[tenant]]\nname = \"a\"\nprefixes = [\"a/\"]\ntokens = \"0123456789abcdefgh\"",
                "line 4",
            ),
        ];
        for (text, expected) in cases {
            let err = Policy::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(!err.contains("0123456789abcdefg"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn ambiguous_certificates_are_refused() {
        let p = Policy::parse(
            "[[tenant]]\nname = \"a\"\nprefixes = [\"a/\"]\ncertificate_names = [\"x\"]\n\
             [[tenant]]\nname = \"b\"\nprefixes = [\"b/\"]\ncertificate_names = [\"y\"]",
        )
        .unwrap();
        assert!(p.by_certificate(&["x".into(), "y".into()]).is_err());
        assert_eq!(p.by_certificate(&["y".into()]).unwrap().unwrap().name, "b");
    }
}
