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
        concat(&[&self.lock, ":gone:", token.expose()])
    }

    /// The names of `key` under `prefix`. Built with `push_str`, not
    /// `format!`: every store call builds them, and the formatting
    /// machinery cost about 4 000 instructions per call (callgrind).
    pub fn of(prefix: &str, key: &LockKey) -> Self {
        let key = key.as_str();
        let mut base = String::with_capacity(prefix.len() + key.len() + 2);
        base.push_str(prefix);
        base.push('{');
        push_escaped(&mut base, key);
        base.push('}');
        Self {
            lock: concat(&[&base, ":lock"]),
            fence: concat(&[&base, ":fence"]),
            channel: concat(&[&base, ":released"]),
        }
    }
}

/// The cluster hash slot of a Redis key.
pub(super) fn slot_of(name: &str) -> u16 {
    fred::util::redis_keyslot(name.as_bytes())
}

/// The parts, one after the other, in a string allocated once.
fn concat(parts: &[&str]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        out.push_str(part);
    }
    out
}

/// Escapes `%`, `{` and `}` so the tag has no braces and stays injective.
#[cfg(test)]
fn escape_tag(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    push_escaped(&mut out, key);
    out
}

/// [`escape_tag`] onto the end of `out`.
fn push_escaped(out: &mut String, key: &str) {
    if !key.contains(['%', '{', '}']) {
        out.push_str(key);
        return;
    }
    for c in key.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
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

/// The lock key of a lock record's name, if it is one of ours (not a
/// tombstone, a counter or a channel).
pub(super) fn key_of_lock(prefix: &str, name: &str) -> Option<String> {
    let tag = name
        .strip_prefix(prefix)?
        .strip_prefix('{')?
        .strip_suffix("}:lock")?;
    (!tag.contains(['{', '}'])).then(|| unescape_tag(tag))
}

/// A `SCAN MATCH` pattern for the records of every lock under `prefix`
/// whose key starts with `key_prefix`. Escaping keeps key prefixes (a key
/// starting with `p` has a tag starting with `p`'s tag), and glob
/// characters are matched literally.
pub(super) fn lock_pattern(prefix: &str, key_prefix: &str) -> String {
    let mut tag = String::with_capacity(key_prefix.len());
    // Char by char, whether or not the key has braces: the tag of a key
    // without braces or `%` is the key, and then so is this.
    for c in key_prefix.chars() {
        match c {
            '%' => tag.push_str("%25"),
            '{' => tag.push_str("%7B"),
            '}' => tag.push_str("%7D"),
            c => tag.push(c),
        }
    }
    let mut out = String::with_capacity(prefix.len() + tag.len() + 8);
    for part in [prefix, "{", &tag] {
        let literal = part == "{";
        for c in part.chars() {
            if !literal && matches!(c, '*' | '?' | '[' | ']' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out.push_str("*}:lock");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_and_patterns() {
        let key = LockKey::parse("a{b}*", 100).unwrap();
        let name = Names::of("p:", &key).lock;
        assert_eq!(key_of_lock("p:", &name).as_deref(), Some("a{b}*"));
        assert_eq!(key_of_lock("p:", &format!("{name}:gone:t")), None);
        assert_eq!(key_of_lock("q:", &name), None);
        assert_eq!(lock_pattern("p:", "a{"), "p:{a%7B*}:lock");
        assert_eq!(lock_pattern("p*:", "x?"), "p\\*:{x\\?*}:lock");
    }

    #[test]
    fn tags_have_no_braces_and_round_trip() {
        for key in ["plain", "{a}", "}{", "a%7Bb", "%", "ü{x}/y"] {
            let tag = escape_tag(key);
            assert!(!tag.contains(['{', '}']), "{tag}");
            assert_eq!(unescape_tag(&tag), key);
        }
        assert_ne!(escape_tag("{"), escape_tag("%7B"));
        let names = Names::of("p:", &LockKey::parse("a{b}", 100).unwrap());
        assert_eq!(names.lock, "p:{a%7Bb%7D}:lock");
        assert_eq!(names.fence, "p:{a%7Bb%7D}:fence");
        assert_eq!(names.channel, "p:{a%7Bb%7D}:released");
        assert_eq!(
            Names::of("", &LockKey::parse("k", 100).unwrap()).lock,
            "{k}:lock"
        );
        let ch = format!("p:{{{}}}:released", escape_tag("a}b"));
        assert_eq!(
            key_of_channel("p:", &ch).map(unescape_tag),
            Some("a}b".into())
        );
    }
}
