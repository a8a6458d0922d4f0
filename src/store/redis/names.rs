//! The Redis names of one lock, all in one hash slot: a hash tag built from
//! the lock key with `%`, `{` and `}` percent-escaped, so a key holding
//! braces can never move its Redis keys to different slots.

use crate::lock::LockKey;

/// The Redis names of one lock: its record, its fencing counter and its
/// release channel, all with the same hash tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The lock record (a hash).
    pub lock: String,
    /// The fencing counter.
    pub fence: String,
    /// The sharded pub/sub channel releases are published on.
    pub channel: String,
}

impl Names {
    /// The tombstone of `token`'s release of this lock (same hash slot):
    /// lets a retried Release answer true.
    pub fn gone(&self, token: &crate::lock::Token) -> String {
        format!("{}:gone:{}", self.lock, token.expose())
    }

    /// The names of `key` under `prefix`.
    pub fn of(prefix: &str, key: &LockKey) -> Self {
        let base = format!("{prefix}{{{}}}", escape_tag(key.as_str()));
        Self {
            lock: format!("{base}:lock"),
            fence: format!("{base}:fence"),
            channel: format!("{base}:released"),
        }
    }
}

/// The cluster hash slot of a Redis key.
pub(super) fn slot_of(name: &str) -> u16 {
    fred::util::redis_keyslot(name.as_bytes())
}

/// Escapes `%`, `{` and `}` so the tag has no braces and stays injective.
pub(super) fn escape_tag(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for c in key.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    out
}

pub(super) fn unescape_tag(tag: &str) -> String {
    tag.replace("%7B", "{")
        .replace("%7D", "}")
        .replace("%25", "%")
}

/// The lock key of a release channel name, if it is one of ours.
pub(super) fn key_of_channel<'a>(prefix: &str, channel: &'a str) -> Option<&'a str> {
    channel
        .strip_prefix(prefix)?
        .strip_prefix('{')?
        .strip_suffix("}:released")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_have_no_braces_and_round_trip() {
        for key in ["plain", "{a}", "}{", "a%7Bb", "%", "ü{x}/y"] {
            let tag = escape_tag(key);
            assert!(!tag.contains(['{', '}']), "{tag}");
            assert_eq!(unescape_tag(&tag), key);
        }
        assert_ne!(escape_tag("{"), escape_tag("%7B"));
        let ch = format!("p:{{{}}}:released", escape_tag("a}b"));
        assert_eq!(
            key_of_channel("p:", &ch).map(unescape_tag),
            Some("a}b".into())
        );
    }
}
