//! Desired-versus-actual diff over keyed sets: what to add, what to overwrite and what to
//! remove. Every driver (routes, neighbours, FDB) diffs through this one function.

use std::cmp::Ordering;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes<K, V> {
    /// Wanted, absent.
    pub add: Vec<(K, V)>,
    /// Present with another value; carries the wanted value.
    pub replace: Vec<(K, V)>,
    /// Present, not wanted.
    pub delete: Vec<K>,
}

impl<K, V> Changes<K, V> {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.replace.is_empty() && self.delete.is_empty()
    }

    pub fn len(&self) -> usize {
        self.add.len() + self.replace.len() + self.delete.len()
    }
}

/// One merge walk over both sorted maps: O(n + m), results in key order.
pub fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    desired: &BTreeMap<K, V>,
    actual: &BTreeMap<K, V>,
) -> Changes<K, V> {
    let mut changes = Changes {
        add: Vec::new(),
        replace: Vec::new(),
        delete: Vec::new(),
    };
    let mut want = desired.iter().peekable();
    let mut have = actual.iter().peekable();
    loop {
        match (want.peek(), have.peek()) {
            (None, None) => break,
            (Some((k, v)), None) => {
                changes.add.push(((*k).clone(), (*v).clone()));
                want.next();
            }
            (None, Some((k, _))) => {
                changes.delete.push((*k).clone());
                have.next();
            }
            (Some((wk, wv)), Some((hk, hv))) => match wk.cmp(hk) {
                Ordering::Less => {
                    changes.add.push(((*wk).clone(), (*wv).clone()));
                    want.next();
                }
                Ordering::Greater => {
                    changes.delete.push((*hk).clone());
                    have.next();
                }
                Ordering::Equal => {
                    if wv != hv {
                        changes.replace.push(((*wk).clone(), (*wv).clone()));
                    }
                    want.next();
                    have.next();
                }
            },
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(u32, &'static str)]) -> BTreeMap<u32, &'static str> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn equal_sets_need_no_change() {
        let m = map(&[(1, "a"), (2, "b")]);
        let c = diff(&m, &m);
        assert!(c.is_empty());
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn missing_keys_are_added_and_extra_keys_deleted() {
        let c = diff(
            &map(&[(1, "a"), (3, "c")]),
            &map(&[(2, "b"), (3, "c"), (4, "d")]),
        );
        assert_eq!(c.add, vec![(1, "a")]);
        assert_eq!(c.delete, vec![2, 4]);
        assert!(c.replace.is_empty());
    }

    #[test]
    fn changed_values_are_replaced_with_the_wanted_value() {
        let c = diff(
            &map(&[(1, "new"), (2, "same")]),
            &map(&[(1, "old"), (2, "same")]),
        );
        assert_eq!(c.replace, vec![(1, "new")]);
        assert!(c.add.is_empty() && c.delete.is_empty());
    }

    #[test]
    fn empty_desired_deletes_everything_and_empty_actual_adds_everything() {
        let m = map(&[(1, "a"), (2, "b")]);
        let empty = BTreeMap::new();
        assert_eq!(diff(&empty, &m).delete, vec![1, 2]);
        assert_eq!(diff(&m, &empty).add, vec![(1, "a"), (2, "b")]);
    }

    #[test]
    fn applying_the_changes_yields_the_desired_set() {
        // A small exhaustive-ish check: every pair of subsets of a 4-key universe with two
        // possible values each.
        let universe: Vec<u32> = (0..4).collect();
        let states = 3u32.pow(universe.len() as u32); // absent, "x", "y" per key
        let build = |code: u32| {
            let mut m = BTreeMap::new();
            let mut c = code;
            for k in &universe {
                match c % 3 {
                    1 => {
                        m.insert(*k, "x");
                    }
                    2 => {
                        m.insert(*k, "y");
                    }
                    _ => {}
                }
                c /= 3;
            }
            m
        };
        for d in 0..states {
            for a in 0..states {
                let (want, mut have) = (build(d), build(a));
                let c = diff(&want, &have);
                for k in &c.delete {
                    assert!(have.remove(k).is_some());
                }
                for (k, v) in c.add.iter().chain(&c.replace) {
                    have.insert(*k, *v);
                }
                assert_eq!(want, have);
            }
        }
    }
}
