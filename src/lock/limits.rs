//! Server-configured bounds on what a request may ask for (the README's
//! configuration table, documentation/semantics.md). Past a bound the answer is INVALID_ARGUMENT naming
//! the field and the bound: never silent clamping.

use super::{LockError, LockKey, Metadata};

/// The bounds one server enforces. All configurable from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// TTL used when a request says 0.
    pub default_ttl_ms: u32,
    /// Smallest TTL a request may ask for.
    pub min_ttl_ms: u32,
    /// Largest TTL a request may ask for.
    pub max_ttl_ms: u32,
    /// Longest server-side wait a request may ask for.
    pub max_wait_ms: u32,
    /// Longest key, in bytes.
    pub max_key_bytes: usize,
    /// Longest owner, in bytes.
    pub max_owner_bytes: usize,
    /// Most metadata entries.
    pub max_metadata_entries: usize,
    /// Most metadata bytes, keys and values together.
    pub max_metadata_bytes: usize,
    /// Longest request id, in bytes.
    pub max_request_id_bytes: usize,
}

/// Defaults of the field limits, shared with `leasehold serve`'s flags.
pub const DEFAULT_MAX_KEY_BYTES: usize = 512;
/// See [`DEFAULT_MAX_KEY_BYTES`].
pub const DEFAULT_MAX_OWNER_BYTES: usize = 256;
/// See [`DEFAULT_MAX_KEY_BYTES`].
pub const DEFAULT_MAX_METADATA_ENTRIES: usize = 16;
/// See [`DEFAULT_MAX_KEY_BYTES`].
pub const DEFAULT_MAX_METADATA_BYTES: usize = 4096;

impl Default for Limits {
    fn default() -> Self {
        Self {
            default_ttl_ms: 30_000,
            min_ttl_ms: 100,
            max_ttl_ms: 3_600_000,
            max_wait_ms: 300_000,
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_owner_bytes: DEFAULT_MAX_OWNER_BYTES,
            max_metadata_entries: DEFAULT_MAX_METADATA_ENTRIES,
            max_metadata_bytes: DEFAULT_MAX_METADATA_BYTES,
            max_request_id_bytes: 128,
        }
    }
}

impl Limits {
    /// Checks that the limits make sense together, for start-up.
    pub fn check(&self) -> Result<(), String> {
        if self.min_ttl_ms == 0 {
            return Err("min TTL must be at least 1 ms".into());
        }
        if self.min_ttl_ms > self.max_ttl_ms {
            return Err(format!(
                "min TTL {} ms is above max TTL {} ms",
                self.min_ttl_ms, self.max_ttl_ms
            ));
        }
        if !(self.min_ttl_ms..=self.max_ttl_ms).contains(&self.default_ttl_ms) {
            return Err(format!(
                "default TTL {} ms is outside [{}, {}] ms",
                self.default_ttl_ms, self.min_ttl_ms, self.max_ttl_ms
            ));
        }
        if self.max_key_bytes == 0 {
            return Err("max key bytes must be at least 1".into());
        }
        Ok(())
    }

    /// Validates a key.
    pub fn key(&self, key: impl Into<String>) -> Result<LockKey, LockError> {
        LockKey::parse(key, self.max_key_bytes)
    }

    /// Resolves a requested TTL: 0 means the default; anything else must lie
    /// within [min, max].
    pub fn ttl(&self, ttl_ms: u32) -> Result<u32, LockError> {
        if ttl_ms == 0 {
            return Ok(self.default_ttl_ms);
        }
        self.explicit_ttl(ttl_ms).map(|ttl| ttl.unwrap_or(0))
    }

    /// Validates a TTL where 0 means "keep the TTL granted" (Renew,
    /// KeepAlive): `None` for 0, else the bounded TTL.
    pub fn renew_ttl(&self, ttl_ms: u32) -> Result<Option<u32>, LockError> {
        if ttl_ms == 0 {
            return Ok(None);
        }
        self.explicit_ttl(ttl_ms)
    }

    fn explicit_ttl(&self, ttl_ms: u32) -> Result<Option<u32>, LockError> {
        if ttl_ms < self.min_ttl_ms || ttl_ms > self.max_ttl_ms {
            return Err(LockError::invalid(
                "ttl_ms",
                format!(
                    "{ttl_ms} is outside the server's bounds [{}, {}] ms",
                    self.min_ttl_ms, self.max_ttl_ms
                ),
            ));
        }
        Ok(Some(ttl_ms))
    }

    /// Validates a requested wait.
    pub fn wait(&self, wait_ms: u32) -> Result<u32, LockError> {
        if wait_ms > self.max_wait_ms {
            return Err(LockError::invalid(
                "wait_ms",
                format!(
                    "{wait_ms} is above the server's maximum {} ms",
                    self.max_wait_ms
                ),
            ));
        }
        Ok(wait_ms)
    }

    /// Validates an owner string.
    pub fn owner(&self, owner: String) -> Result<String, LockError> {
        if owner.len() > self.max_owner_bytes {
            return Err(LockError::invalid(
                "owner",
                format!(
                    "is {} bytes, the limit is {}",
                    owner.len(),
                    self.max_owner_bytes
                ),
            ));
        }
        Ok(owner)
    }

    /// Validates metadata: entry count and total size.
    pub fn metadata<I>(&self, entries: I) -> Result<Metadata, LockError>
    where
        I: IntoIterator<Item = (String, String)>,
        I::IntoIter: ExactSizeIterator,
    {
        let entries = entries.into_iter();
        if entries.len() > self.max_metadata_entries {
            return Err(LockError::invalid(
                "metadata",
                format!(
                    "has {} entries, the limit is {}",
                    entries.len(),
                    self.max_metadata_entries
                ),
            ));
        }
        let metadata = Metadata::from_iter(entries);
        if metadata.byte_len() > self.max_metadata_bytes {
            return Err(LockError::invalid(
                "metadata",
                format!(
                    "is {} bytes, the limit is {}",
                    metadata.byte_len(),
                    self.max_metadata_bytes
                ),
            ));
        }
        Ok(metadata)
    }

    /// Validates an optional request id ("" means none).
    pub fn request_id(&self, request_id: String) -> Result<Option<String>, LockError> {
        if request_id.is_empty() {
            return Ok(None);
        }
        if request_id.len() > self.max_request_id_bytes {
            return Err(LockError::invalid(
                "request_id",
                format!(
                    "is {} bytes, the limit is {}",
                    request_id.len(),
                    self.max_request_id_bytes
                ),
            ));
        }
        Ok(Some(request_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_bounds() {
        let l = Limits::default();
        assert_eq!(l.ttl(0), Ok(30_000));
        assert_eq!(l.ttl(100), Ok(100));
        assert!(
            l.ttl(99)
                .unwrap_err()
                .to_string()
                .contains("[100, 3600000]")
        );
        assert!(l.ttl(3_600_001).is_err());
        assert_eq!(l.renew_ttl(0), Ok(None));
        assert_eq!(l.renew_ttl(500), Ok(Some(500)));
        assert!(l.wait(300_001).is_err());
        assert!(l.check().is_ok());
    }

    #[test]
    fn metadata_bounds() {
        let l = Limits::default();
        let many: Vec<_> = (0..17).map(|i| (i.to_string(), String::new())).collect();
        assert!(
            l.metadata(many)
                .unwrap_err()
                .to_string()
                .contains("17 entries")
        );
        let big = vec![("k".to_string(), "v".repeat(4096))];
        assert!(l.metadata(big).is_err());
    }
}
