//! Lock metadata and its compact encoding for the store.

/// Small string pairs shown by Describe, kept sorted by key so that the
/// encoding (and so the stored record) is deterministic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata(Vec<(String, String)>);

impl Metadata {
    /// Sum of the byte lengths of all keys and values.
    pub fn byte_len(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries, sorted by key.
    pub fn entries(&self) -> &[(String, String)] {
        &self.0
    }

    /// Encodes as length-prefixed strings (`3:key5:value...`), opaque to the
    /// Lua scripts, cheap to write and to parse, safe for any UTF-8.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(self.byte_len() + 8 * self.0.len());
        for (k, v) in &self.0 {
            for s in [k, v] {
                out.push_str(&s.len().to_string());
                out.push(':');
                out.push_str(s);
            }
        }
        out
    }

    /// Parses what [`Metadata::encode`] wrote; `None` if it is corrupt.
    pub fn decode(mut s: &str) -> Option<Self> {
        let mut items = Vec::new();
        while !s.is_empty() {
            let (k, rest) = take(s)?;
            let (v, rest) = take(rest)?;
            items.push((k.to_owned(), v.to_owned()));
            s = rest;
        }
        Some(Self(items))
    }
}

fn take(s: &str) -> Option<(&str, &str)> {
    let (len, rest) = s.split_once(':')?;
    let len: usize = len.parse().ok()?;
    if !rest.is_char_boundary(len.min(rest.len())) || rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

impl FromIterator<(String, String)> for Metadata {
    fn from_iter<T: IntoIterator<Item = (String, String)>>(iter: T) -> Self {
        let mut items: Vec<_> = iter.into_iter().collect();
        items.sort();
        items.dedup_by(|a, b| a.0 == b.0);
        Self(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m: Metadata = [("b:1", "x:2:"), ("a", ""), ("ü", "∑")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(Metadata::decode(&m.encode()), Some(m.clone()));
        assert_eq!(m.entries()[0].0, "a");
        assert_eq!(Metadata::decode(""), Some(Metadata::default()));
        assert_eq!(Metadata::decode("5:ab"), None);
        assert_eq!(Metadata::decode("1:a"), None);
        assert_eq!(Metadata::decode("x:"), None);
    }
}
