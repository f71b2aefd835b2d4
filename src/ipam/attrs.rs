//! The attributes recorded with an allocation (`secondary`: namespace, pod, node,
//! timestamp, ...), kept compactly: every cached block holds one set per address, so on a
//! big cluster they are a large part of the daemon's memory. A sorted slice of pairs costs
//! a third of a `BTreeMap` with the same four entries, and the usual keys (the shared
//! vocabulary) are not allocated at all.

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::api::vocab;

/// Keys every allocation repeats: stored as these statics rather than per-allocation copies.
const KNOWN_KEYS: &[&str] = &[
    vocab::ATTR_NAMESPACE,
    vocab::ATTR_POD,
    vocab::ATTR_NODE,
    vocab::ATTR_TIMESTAMP,
    vocab::ATTR_TYPE,
    vocab::ATTR_POD_UID,
];

fn key(k: String) -> Cow<'static, str> {
    match KNOWN_KEYS.iter().find(|known| **known == k) {
        Some(known) => Cow::Borrowed(known),
        None => Cow::Owned(k),
    }
}

/// Key-value attributes sorted by key, like the `BTreeMap` they replace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Attrs(Box<[(Cow<'static, str>, String)]>);

impl Attrs {
    pub fn get(&self, k: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(key, _)| key.as_ref().cmp(k))
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &String)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v))
    }

    /// As the API and callers outside the allocator take them.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }
}

impl From<BTreeMap<String, String>> for Attrs {
    fn from(m: BTreeMap<String, String>) -> Attrs {
        // A BTreeMap iterates in key order: the slice comes out sorted.
        Attrs(m.into_iter().map(|(k, v)| (key(k), v)).collect())
    }
}

impl From<&BTreeMap<String, String>> for Attrs {
    fn from(m: &BTreeMap<String, String>) -> Attrs {
        Attrs::from(m.clone())
    }
}

impl<const N: usize> From<[(&str, &str); N]> for Attrs {
    fn from(pairs: [(&str, &str); N]) -> Attrs {
        Attrs::from(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_the_map_it_came_from() {
        let m: BTreeMap<String, String> = [
            ("pod", "web-0"),
            ("namespace", "shop"),
            ("node", "n1"),
            ("custom", "x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let a = Attrs::from(&m);
        assert_eq!(a.get("pod").map(String::as_str), Some("web-0"));
        assert_eq!(a.get("custom").map(String::as_str), Some("x"));
        assert_eq!(a.get("timestamp"), None);
        assert_eq!(a.len(), 4);
        assert_eq!(a.to_map(), m, "round trip");
        let keys: Vec<&str> = a.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["custom", "namespace", "node", "pod"], "sorted");
        assert_eq!(a, Attrs::from(m.clone()), "equal sets compare equal");
        assert!(Attrs::default().is_empty());
    }

    #[test]
    fn vocabulary_keys_are_not_allocated() {
        let a = Attrs::from([("node", "n1"), ("other", "v")]);
        assert!(matches!(a.0[0].0, Cow::Borrowed(_)));
        assert!(matches!(a.0[1].0, Cow::Owned(_)));
    }
}
