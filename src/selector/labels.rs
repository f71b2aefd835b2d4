//! What a selector is evaluated against: anything that can look up a label value by key.
//! Implemented for the maps Kubernetes objects carry, so callers evaluate without copying.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

pub trait Labels {
    fn get(&self, key: &str) -> Option<&str>;
}

impl Labels for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<&str> {
        BTreeMap::get(self, key).map(String::as_str)
    }
}

impl<S: BuildHasher> Labels for HashMap<String, String, S> {
    fn get(&self, key: &str) -> Option<&str> {
        HashMap::get(self, key).map(String::as_str)
    }
}

/// `metadata.labels` is optional on Kubernetes objects: absent means no labels.
impl<L: Labels> Labels for Option<L> {
    fn get(&self, key: &str) -> Option<&str> {
        self.as_ref().and_then(|l| l.get(key))
    }
}

impl<L: Labels + ?Sized> Labels for &L {
    fn get(&self, key: &str) -> Option<&str> {
        (**self).get(key)
    }
}

/// A fixed list of pairs, handy for a handful of synthetic labels (first match wins).
impl Labels for [(&str, &str)] {
    fn get(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_metadata_labels_have_no_keys() {
        let none: Option<BTreeMap<String, String>> = None;
        assert_eq!(none.get("a"), None);
        let some = Some(BTreeMap::from([("a".to_owned(), "b".to_owned())]));
        assert_eq!(some.get("a"), Some("b"));
    }

    #[test]
    fn hash_maps_and_pair_slices_look_up_by_key() {
        let h: HashMap<String, String> = HashMap::from([("k".to_owned(), "v".to_owned())]);
        assert_eq!(Labels::get(&h, "k"), Some("v"));
        let pairs: &[(&str, &str)] = &[("x", "1"), ("y", "2")];
        assert_eq!(Labels::get(pairs, "y"), Some("2"));
        assert_eq!(Labels::get(pairs, "z"), None);
    }
}
