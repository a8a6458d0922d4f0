//! The auth file: tenants, the credentials that identify each, and the key
//! prefixes each may use. Parsed and checked whole, so that a bad file is
//! refused at start-up or on reload and never half-applied.
//!
//! ```toml
//! [[tenant]]
//! name = "team-a"
//! prefixes = ["team-a/"]
//! # Plain tokens (at least 16 bytes; hashed on load) or their SHA-256,
//! # hex: `sha256:...` (the prefix in any case).
//! tokens = ["sha256:71bde61b94e0af088c3468f6e5489249525b35e7dd61c400c16778f9614e9a25"]
//! # Over mutual TLS: client certificates whose subject CN, or a DNS name
//! # in their subject alternative names, is one of these.
//! certificate_names = ["team-a-worker"]
//! # Operators: may call the AdminService (List, ForceRelease), still
//! # only on keys under their prefixes. Off unless set.
//! admin = false
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
    #[serde(default)]
    quotas: TenantQuotas,
    #[serde(default)]
    admin: bool,
}

/// A tenant's own shares of one server, where they differ from the
/// server's `--max-*-per-caller` flags (`[tenant.quotas]` in the auth file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuotas {
    /// Waiting Acquire calls at once.
    pub waiters: Option<usize>,
    /// KeepAlive and Watch streams at once.
    pub streams: Option<usize>,
    /// Locks kept alive over KeepAlive streams at once.
    pub locks: Option<usize>,
    /// Acquire calls a second (which bounds how fast it can create lock
    /// names, each of which costs Redis a fencing counter for a while).
    pub acquires_per_second: Option<u32>,
}

/// One tenant: a name for logs and errors, and the key prefixes it may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// Shown in logs and in PERMISSION_DENIED messages.
    pub name: String,
    /// A key is the tenant's if it starts with one of these; `""` is every key.
    pub prefixes: Vec<String>,
    /// Its own quotas, where they differ from the server's defaults.
    pub quotas: TenantQuotas,
    /// May call the AdminService (`admin = true`): list locks and take
    /// them from their holders, within its prefixes.
    pub admin: bool,
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
            // toml's message quotes the offending line and value, either
            // of which may be a token.
            let message = redact_parser_message(e.message());
            match e.span() {
                Some(span) => {
                    let line = text.get(..span.start).unwrap_or(text).matches('\n').count() + 1;
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
                quotas: entry.quotas,
                admin: entry.admin,
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

/// Field names of the file: the only quoted words a parser message may
/// keep (`expected one of `name`, `prefixes`, ...`).
const FIELDS: [&str; 7] = [
    "tenant",
    "name",
    "prefixes",
    "tokens",
    "certificate_names",
    "quotas",
    "admin",
];

/// A parser message fit to show: the first line only (toml quotes the
/// offending line below it), every quoted piece replaced by `<redacted>`
/// unless it is a field name, whichever quote the parser used (`"..."`,
/// `'...'` or `` `...` ``: serde quotes an unknown field's name, which may
/// be a token written as a key, with backticks), and, in case a value
/// reached it unquoted, every word long enough to be a token.
fn redact_parser_message(message: &str) -> String {
    let first = message.lines().next().unwrap_or_default();
    let mut out = String::with_capacity(first.len());
    let mut rest = first;
    while let Some(open) = rest.find(['"', '\'', '`']) {
        let quote = rest[open..].chars().next().unwrap_or('"');
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find(quote) {
            Some(close) => {
                let quoted = &after[..close];
                out.push(quote);
                // Field names and punctuation (`]`) stay; anything else may be a value.
                let keep = FIELDS.contains(&quoted) || !quoted.chars().any(char::is_alphanumeric);
                out.push_str(if keep { quoted } else { "<redacted>" });
                out.push(quote);
                rest = &after[close + 1..];
            }
            None => {
                // An unbalanced quote: what follows may be a value.
                out.push(quote);
                out.push_str("<redacted>");
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out.split(' ')
        .map(|word| {
            let bare = word.trim_matches(|c: char| !c.is_alphanumeric() && c != '_');
            if bare.len() >= MIN_TOKEN_BYTES && !FIELDS.contains(&bare) && bare != "<redacted>" {
                word.replace(bare, "<redacted>")
            } else {
                word.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Digest entries start with this, in any case.
const DIGEST_SCHEME: &str = "sha256";

/// Tokens anyone would try first: the empty one, the words earlier
/// versions of the documentation used as examples, and their like. A
/// digest's token cannot be measured, but these digests can be refused.
const GUESSABLE: [&str; 12] = [
    "",
    "secret",
    "password",
    "token",
    "changeme",
    "admin",
    "test",
    "leasehold",
    "123456",
    "12345678",
    "letmein",
    "Bearer",
];

/// At least this many hex digits after a scheme, or alone, look like a
/// digest rather than a token.
const DIGEST_LIKE_HEX: usize = 32;

fn parse_token(token: &str) -> Result<TokenHash, String> {
    if let Some((scheme, hex_digest)) = token.split_once(':')
        && scheme.trim().eq_ignore_ascii_case(DIGEST_SCHEME)
    {
        let bytes = hex::decode(hex_digest.trim())
            .map_err(|_| "a sha256: entry must be 64 hex digits".to_string())?;
        let hash = <TokenHash>::try_from(bytes.as_slice())
            .map_err(|_| "a sha256: entry must be 64 hex digits".to_string())?;
        if GUESSABLE.iter().any(|w| hash_token(w) == hash) {
            return Err(
                "the digest of a word anyone would guess; use a long random token \
                 (openssl rand -base64 32) and its digest"
                    .into(),
            );
        }
        return Ok(hash);
    }
    if let Some(why) = looks_like_digest(token) {
        return Err(why.into());
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

/// Why a plain token that looks like a digest is refused: loaded as a
/// token, the digest string itself would authenticate.
fn looks_like_digest(token: &str) -> Option<&'static str> {
    let hex = |s: &str| s.len() >= DIGEST_LIKE_HEX && s.chars().all(|c| c.is_ascii_hexdigit());
    if token.len() == 64 && hex(token) {
        return Some(
            "64 hex digits, like a SHA-256 digest: write a digest as sha256:<hex>; \
             for a token, use another form (openssl rand -base64 32)",
        );
    }
    let (scheme, rest) = token.split_once([':', '='])?;
    let scheme_like = (2..=12).contains(&scheme.len())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    (scheme_like && hex(rest.trim()))
        .then_some("looks like a digest of another kind: only sha256:<64 hex digits> is a digest")
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
tokens = ["SHA256:71BDE61B94E0AF088C3468F6E5489249525B35E7DD61C400C16778F9614E9A25"]
"#;

    /// The token whose digest is in [`FILE`], random like a real one.
    const TEAM_B: &str = "3s0RzoSkpOPdIkhYo-Uren1eZWn3R_Oi";

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
        // The upper-case prefix and digits are a digest all the same: the
        // token authenticates, the digest string itself does not.
        let b = p.by_token(&hash_token(TEAM_B)).unwrap();
        assert!(
            p.by_token(&hash_token(
                "SHA256:71BDE61B94E0AF088C3468F6E5489249525B35E7DD61C400C16778F9614E9A25"
            ))
            .is_none()
        );
        assert!(b.permits(&key("shared/y")));
        assert!(p.by_token(&hash_token("nope")).is_none());
        let names = vec!["team-a-worker".to_string()];
        assert_eq!(p.by_certificate(&names).unwrap().unwrap().name, "team-a");
        assert!(p.by_certificate(&["x".into()]).unwrap().is_none());
        assert!(!format!("{p:?}").contains("team-a-token"));
        assert!(!a.admin && !b.admin);
        let admin = Policy::parse(
            "[[tenant]]\nname = \"ops\"\nprefixes = [\"\"]\nadmin = true\ntokens = [\"ops-token-0123456789\"]",
        )
        .unwrap();
        assert!(
            admin
                .by_token(&hash_token("ops-token-0123456789"))
                .unwrap()
                .admin
        );
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

    fn file_with_token(token: &str) -> String {
        format!("[[tenant]]\nname = \"a\"\nprefixes = [\"a/\"]\ntokens = [{token:?}]")
    }

    #[test]
    fn digest_prefixes_in_any_case_and_digest_lookalikes() {
        let digest = "71bde61b94e0af088c3468f6e5489249525b35e7dd61c400c16778f9614e9a25";
        for prefix in ["sha256:", "SHA256:", "Sha256:", "sHa256:"] {
            let p = Policy::parse(&file_with_token(&format!("{prefix}{digest}"))).unwrap();
            assert!(p.by_token(&hash_token(TEAM_B)).is_some(), "{prefix}");
        }
        let refused = [
            (digest.to_string(), "64 hex digits"),
            (digest.to_uppercase(), "64 hex digits"),
            (format!("sha512:{digest}{digest}"), "another kind"),
            (format!("sha-256:{digest}"), "another kind"),
            (format!("SHA1={}", &digest[..40]), "another kind"),
            (format!("md5:{}", &digest[..32]), "another kind"),
            ("SHA256:not-hex-at-all-0123456789".to_string(), "64 hex"),
        ];
        for (token, expected) in refused {
            let err = Policy::parse(&file_with_token(&token)).unwrap_err();
            assert!(err.contains(expected), "{token}: {err}");
            assert!(
                !err.contains(&token) && !err.contains(&digest[..16]),
                "{err}"
            );
        }
        // openssl rand -hex 16: 32 hex digits, a token.
        assert!(Policy::parse(&file_with_token(&digest[..32])).is_ok());
    }

    #[test]
    fn digests_of_guessable_words_are_refused() {
        for word in GUESSABLE {
            let entry = format!("sha256:{}", hex::encode(hash_token(word)));
            let err = Policy::parse(&file_with_token(&entry)).unwrap_err();
            assert!(err.contains("anyone would guess"), "{word:?}: {err}");
        }
    }

    #[test]
    fn parser_errors_never_echo_a_value_whatever_its_quoting() {
        let secret = "SuperSecretToken0123456789";
        let head = "[[tenant]]\nname = \"a\"\nprefixes = [\"a/\"]\n";
        let cases = [
            // A token written as a key: serde names it with backticks.
            format!("{head}{secret} = 1"),
            format!("{head}\"{secret}\" = 1"),
            format!("{head}'{secret}' = 1"),
            format!("{head}tokens = '{secret}'"),
            format!("{head}tokens = \"{secret}\""),
            format!("{head}tokens = \"\"\"{secret}\"\"\""),
            format!("{head}tokens = '''{secret}'''"),
            format!("{head}tokens = [{secret}]"),
            format!("{head}tokens = [\"{secret}"),
            format!("{head}tokens = [`{secret}`]"),
            format!("{head}tokens = [\"{secret}\", 7]"),
            format!("[[tenant]]\nname = {secret}\nprefixes = [\"a/\"]"),
            format!("[tenant]\nname = \"a\"\ntokens = [\"{secret}\"]"),
            format!("[[{secret}]]\nname = \"a\""),
        ];
        for text in &cases {
            let err = Policy::parse(text).unwrap_err();
            assert!(!err.contains("SuperSecret"), "{text:?}: {err}");
            assert!(!err.contains("0123456789"), "{text:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
            assert!(err.contains("line "), "{text:?}: {err}");
            if text.starts_with(head) {
                assert!(err.starts_with("line 4:"), "{text:?}: {err}");
            }
        }
        // What the message keeps: the field names it expected.
        let err = Policy::parse(&cases[0]).unwrap_err();
        assert!(
            err.contains("`name`") && err.contains("`certificate_names`"),
            "{err}"
        );
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
