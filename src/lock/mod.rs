//! Domain types: what a lock, a lease and their limits are, independent of
//! gRPC and of the store. Everything that came over the wire is validated
//! into these types before it reaches a store, so stores never re-check input.

mod error;
mod limits;
mod metadata;

use std::fmt;

pub use error::LockError;
pub use limits::{
    DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_METADATA_BYTES, DEFAULT_MAX_METADATA_ENTRIES,
    DEFAULT_MAX_OWNER_BYTES, Limits,
};
pub use metadata::Metadata;

/// A validated lock name: 1..=max bytes of UTF-8 without control characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockKey(String);

impl LockKey {
    /// Validates `key` (documentation/semantics.md): non-empty, at most
    /// `max_bytes`, and no Unicode control character (C0, DEL, C1).
    pub fn parse(key: impl Into<String>, max_bytes: usize) -> Result<Self, LockError> {
        let key = key.into();
        if key.is_empty() {
            return Err(LockError::invalid("key", "must not be empty"));
        }
        if key.len() > max_bytes {
            return Err(LockError::invalid(
                "key",
                format!("is {} bytes, the limit is {max_bytes}", key.len()),
            ));
        }
        no_control_characters("key", &key)?;
        Ok(Self(key))
    }

    /// The key as the client sent it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Gives back the owned string, for echoing in replies.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// INVALID_ARGUMENT naming `field` if `text` holds a Unicode control
/// character (C0, DEL, C1): such text would break log lines and tables.
pub fn no_control_characters(field: &'static str, text: &str) -> Result<(), LockError> {
    match text.chars().find(|c| c.is_control()) {
        Some(c) => Err(LockError::invalid(
            field,
            format!("contains the control character U+{:04X}", c as u32),
        )),
        None => Ok(()),
    }
}

impl fmt::Debug for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The secret that proves ownership of a lease: 128 random bits, hex-encoded.
///
/// `Debug` and `Display` redact it, so that a token never reaches a log line
/// by accident; use [`Token::expose`] where the value itself is needed.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Token(String);

impl Token {
    /// Longest token a client may present. Server tokens are 32 bytes; the
    /// slack admits other formats without letting a client send megabytes.
    pub const MAX_BYTES: usize = 256;

    /// A fresh random token from the OS-seeded thread RNG (a CSPRNG).
    /// Encoded into a byte buffer: `hex::encode` builds its string a `char`
    /// at a time, about 980 instructions per token (callgrind), and every
    /// Acquire makes one.
    pub fn generate() -> Self {
        let mut text = [0u8; 32];
        hex::encode_to_slice(rand::random::<[u8; 16]>(), &mut text)
            .expect("16 bytes fill 32 hex digits");
        Self(String::from_utf8(text.to_vec()).expect("hex digits are ASCII"))
    }

    /// Validates a token a client presented. An empty token is a malformed
    /// request; any other token is merely "wrong" and handled by the store.
    pub fn parse(token: impl Into<String>) -> Result<Self, LockError> {
        let token = token.into();
        if token.is_empty() {
            return Err(LockError::invalid("token", "must not be empty"));
        }
        if token.len() > Self::MAX_BYTES {
            return Err(LockError::invalid(
                "token",
                format!("is {} bytes, the limit is {}", token.len(), Self::MAX_BYTES),
            ));
        }
        Ok(Self(token))
    }

    /// The secret itself, for the store and for the reply to its owner.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Consumes the token into its secret string, for the reply to its owner.
    pub fn into_secret(self) -> String {
        self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// What a client asks for when it takes a lock, validated.
#[derive(Debug, Clone)]
pub struct AcquireSpec {
    /// The lock.
    pub key: LockKey,
    /// The token the lease gets if this call grants it (the store may answer
    /// with an earlier token instead, for a retried `request_id`).
    pub token: Token,
    /// TTL to grant, already bounded by [`Limits`].
    pub ttl_ms: u32,
    /// Free text shown by Describe.
    pub owner: String,
    /// Small key/value pairs shown by Describe.
    pub metadata: Metadata,
    /// Makes a retried Acquire return the lease it already got.
    pub request_id: Option<String>,
    /// Exclusive (the default) or shared with a limit.
    pub mode: Mode,
    /// The call waits (`wait_ms > 0`). An EXCLUSIVE one that finds the lock
    /// held marks the key for a short while, so that SHARED Acquires that
    /// begin later queue behind it instead of starving it.
    pub waiting: bool,
}

/// How a lock is held (documentation/semantics.md, "Modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// One holder at a time: the mutex every client gets unless it asks.
    #[default]
    Exclusive,
    /// Holders coexist up to `limit` (0 = no limit), never beside an
    /// exclusive holder: a semaphore of `limit` permits, or the readers
    /// of a read/write lock.
    Shared {
        /// Most holders at once, 0 for no limit. Set by the first holder
        /// of a free key; every later shared Acquire must ask for the same.
        limit: u32,
    },
}

/// A granted lease as the store reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The token that now holds the lock.
    pub token: Token,
    /// Larger than every earlier grant's of the same key.
    pub fencing_token: u64,
    /// The TTL granted.
    pub ttl_ms: u32,
    /// An instant no later than the one at which the store set the lease's
    /// current expiry (the send time of the store call that granted or
    /// replayed it).
    pub at: std::time::Instant,
    /// The TTL the lease had left at the store when it was granted (the
    /// TTL granted) or replayed (what was left of it): the lease is sure to
    /// last until `at + valid_ms`, which is what a client may believe
    /// (`Lease.valid_for_ms`).
    pub valid_ms: u32,
}

impl Grant {
    /// A fresh grant of `token` for `ttl_ms`, made by a store call sent at
    /// `at`.
    pub fn fresh(token: Token, fencing_token: u64, ttl_ms: u32, at: std::time::Instant) -> Self {
        Self {
            token,
            fencing_token,
            ttl_ms,
            at,
            valid_ms: ttl_ms,
        }
    }
}

/// Which KeepAlive stream a lock was last attached through: the server's
/// random id and the stream's number on it. The end of a stream releases a
/// lock only while that stream is its latest attachment, so a lock the
/// client re-attached on another server survives the old stream's end.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attachment(String);

impl Attachment {
    /// A fresh attachment id, unique across servers and streams.
    pub fn generate() -> Self {
        use std::sync::OnceLock;
        use std::sync::atomic::{AtomicU64, Ordering};
        static SERVER: OnceLock<String> = OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let server = SERVER.get_or_init(|| hex::encode(rand::random::<[u8; 8]>()));
        Self(format!("{server}.{}", NEXT.fetch_add(1, Ordering::Relaxed)))
    }

    /// The id as the store records it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The result of one attempt to take a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcquireOutcome {
    /// The lock is ours.
    Acquired(Grant),
    /// Someone else holds it for at least this long (always >= 1 ms).
    Held {
        /// The holder's remaining TTL.
        retry_after_ms: u32,
    },
}

/// What Describe shows about a held lock: its mode and every holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    /// The mode of the current holders (and the shared limit they set).
    pub mode: Mode,
    /// Every current holder, oldest grant first; exactly one when the
    /// mode is exclusive, at least one otherwise.
    pub holders: Vec<HolderInfo>,
}

impl LockInfo {
    /// The fencing token of the latest grant among the holders.
    pub fn latest_fence(&self) -> u64 {
        self.holders
            .iter()
            .map(|h| h.fencing_token)
            .max()
            .unwrap_or(0)
    }
}

/// One holder as Describe shows it. Deliberately has no token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderInfo {
    /// The holder's free-text owner.
    pub owner: String,
    /// This holder's grant's fencing token.
    pub fencing_token: u64,
    /// Remaining TTL.
    pub ttl_ms: u32,
    /// The holder's metadata.
    pub metadata: Metadata,
}

/// Clamps a Redis/remaining-TTL millisecond count into the wire's `u32`,
/// never below 1 so that "held" is never reported with a zero wait.
pub fn remaining_ms(ms: i64) -> u32 {
    ms.clamp(1, i64::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_rules() {
        assert!(LockKey::parse("a", 512).is_ok());
        assert!(LockKey::parse("ü{x}/y", 512).is_ok());
        assert!(LockKey::parse("", 512).is_err());
        assert!(LockKey::parse("a".repeat(513), 512).is_err());
        assert!(LockKey::parse("a".repeat(512), 512).is_ok());
        for bad in ["a\nb", "\u{7f}", "x\u{85}", "\0"] {
            let err = LockKey::parse(bad, 512).unwrap_err();
            assert!(err.to_string().contains("key"), "{err}");
        }
    }

    #[test]
    fn tokens_are_random_and_redacted() {
        let a = Token::generate();
        let b = Token::generate();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 32);
        assert!(
            a.expose()
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "lower-case hex"
        );
        assert!(!format!("{a:?}").contains(a.expose()));
        assert!(Token::parse("").is_err());
        assert!(Token::parse("x".repeat(257)).is_err());
    }
}
