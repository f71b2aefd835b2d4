//! A table of namespaced objects found by the (namespace, name) they carry themselves: no
//! key is stored beside them. The policy calculator holds one entry per pod of the cluster,
//! and a `(String, String)` key per entry (two allocations) cost more than the entry.

use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

/// What an entry is found by.
pub trait Named {
    /// (namespace, name).
    fn key(&self) -> (&str, &str);
}

pub struct ByName<T> {
    table: HashTable<T>,
    hasher: RandomState,
}

impl<T> Default for ByName<T> {
    fn default() -> Self {
        ByName {
            table: HashTable::new(),
            hasher: RandomState::new(),
        }
    }
}

impl<T: Named> ByName<T> {
    fn hash(&self, key: (&str, &str)) -> u64 {
        self.hasher.hash_one(key)
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&T> {
        let key = (namespace, name);
        self.table.find(self.hash(key), |t| t.key() == key)
    }

    /// Adds `item`, or replaces the entry of its name and gives the old one back.
    pub fn insert(&mut self, item: T) -> Option<T> {
        let hasher = &self.hasher;
        let hash = hasher.hash_one(item.key());
        match self.table.entry(
            hash,
            |t| t.key() == item.key(),
            |t| hasher.hash_one(t.key()),
        ) {
            Entry::Occupied(mut e) => Some(std::mem::replace(e.get_mut(), item)),
            Entry::Vacant(e) => {
                e.insert(item);
                None
            }
        }
    }

    pub fn remove(&mut self, namespace: &str, name: &str) -> Option<T> {
        let key = (namespace, name);
        let hash = self.hash(key);
        match self.table.find_entry(hash, |t| t.key() == key) {
            Ok(e) => Some(e.remove().0),
            Err(_) => None,
        }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.table.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Named for (String, String, u32) {
        fn key(&self) -> (&str, &str) {
            (&self.0, &self.1)
        }
    }

    fn item(ns: &str, name: &str, v: u32) -> (String, String, u32) {
        (ns.into(), name.into(), v)
    }

    #[test]
    fn entries_are_found_replaced_and_removed_by_their_own_name() {
        let mut t = ByName::default();
        assert!(t.insert(item("a", "x", 1)).is_none());
        assert!(t.insert(item("b", "x", 2)).is_none());
        assert_eq!(t.insert(item("a", "x", 3)), Some(item("a", "x", 1)));
        assert_eq!(t.len(), 2);
        assert_eq!(t.get("a", "x").map(|i| i.2), Some(3));
        assert_eq!(t.get("b", "x").map(|i| i.2), Some(2));
        assert!(t.get("a", "y").is_none());
        assert_eq!(t.remove("b", "x"), Some(item("b", "x", 2)));
        assert!(t.remove("b", "x").is_none());
        assert_eq!(t.iter().count(), 1);
    }
}
