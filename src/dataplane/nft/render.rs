//! Sans-IO: from a desired table and the table the kernel is known to hold to one nft
//! transaction script (`nft -f -` syntax). Set and map elements are added and deleted in
//! place, a chain whose rules changed is flushed and refilled alone, named counters come
//! and go with the rules that name them, and the whole table is rewritten only when nothing
//! is known (start-up, after drift) or a set, map or base chain changed shape (the kernel
//! cannot retype them in place).

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::desired::nft::{Chain, Element, Map, RULE_COMMENT_PREFIX, Table};

/// The script replacing the whole table in one transaction: `add` makes the `delete` valid
/// when the table is absent (nft 1.0.6 has no `destroy`), and the kernel applies all or none.
pub fn full(want: &Table) -> String {
    let (family, name) = (want.family, &want.name);
    let mut s = format!("add table {family} {name}\ndelete table {family} {name}\n");
    let _ = writeln!(s, "table {family} {name} {{");
    for counter in want.counters() {
        let _ = writeln!(s, "  counter {counter} {{ }}");
    }
    for (set_name, set) in &want.sets {
        let _ = writeln!(s, "  set {set_name} {{");
        let _ = writeln!(s, "    type {}", set.kind);
        if !set.flags.is_empty() {
            let _ = writeln!(s, "    flags {}", set.flags.join(","));
        }
        if !set.elements.is_empty() {
            let _ = writeln!(s, "    elements = {{ {} }}", join(set.elements.iter()));
        }
        s.push_str("  }\n");
    }
    for (map_name, map) in &want.maps {
        let _ = writeln!(s, "  map {map_name} {{");
        let _ = writeln!(s, "    type {} : verdict", map.key);
        if !map.elements.is_empty() {
            let _ = writeln!(s, "    elements = {{ {} }}", map_elements(map, None));
        }
        s.push_str("  }\n");
    }
    for (chain_name, chain) in &want.chains {
        let _ = writeln!(s, "  chain {chain_name} {{");
        if let Some(h) = &chain.hook {
            let _ = writeln!(
                s,
                "    type {} hook {} priority {}; policy {};",
                h.kind, h.hook, h.priority, h.policy
            );
        }
        for rule in &chain.rules {
            let _ = writeln!(s, "    {}", rule_line(rule));
        }
        s.push_str("  }\n");
    }
    s.push_str("}\n");
    s
}

/// The script that turns `known` into `want`; None when they are equal. Falls back to
/// `full` when the two are different tables or a set, map or base chain changed shape.
pub fn changes(want: &Table, known: &Table) -> Option<String> {
    if want == known {
        return None;
    }
    let sets: BTreeSet<String> = [&want.sets, &known.sets]
        .into_iter()
        .flat_map(|m| m.keys().cloned())
        .chain(
            [&want.maps, &known.maps]
                .into_iter()
                .flat_map(|m| m.keys().cloned()),
        )
        .collect();
    let chains: BTreeSet<String> = [&want.chains, &known.chains]
        .into_iter()
        .flat_map(|m| m.keys().cloned())
        .collect();
    changes_of(want, known, &sets, &chains)
}

/// `changes` limited to the named sets, maps (`sets` holds both: nft gives them one
/// namespace) and chains, those a caller knows it changed: the cost follows the change, not
/// the table.
///
/// Order: counters, sets and maps that rules will name; set elements (deletions first: in
/// an interval set a new prefix may overlap an old one); new chains and rewritten rules;
/// map elements (they name chains); then what went, emptied before it is deleted.
/// A named counter belongs to the chain whose rules name it (the compiler derives its name
/// from the chain's), so it is added and deleted with that chain's rules.
pub fn changes_of(
    want: &Table,
    known: &Table,
    sets: &BTreeSet<String>,
    chains: &BTreeSet<String>,
) -> Option<String> {
    if want.family != known.family || want.name != known.name || reshaped(want, known, sets, chains)
    {
        return Some(full(want));
    }
    let t = format!("{} {}", want.family, want.name);
    let mut s = String::new();
    let (new_counters, gone_counters) = counter_changes(want, known, chains);
    for name in &new_counters {
        let _ = writeln!(s, "add counter {t} {name}");
    }
    for name in sets {
        if let (Some(set), None) = (want.sets.get(name), known.sets.get(name)) {
            let flags = if set.flags.is_empty() {
                String::new()
            } else {
                format!(" flags {};", set.flags.join(","))
            };
            let _ = writeln!(s, "add set {t} {name} {{ type {};{flags} }}", set.kind);
        }
        if let (Some(map), None) = (want.maps.get(name), known.maps.get(name)) {
            let _ = writeln!(s, "add map {t} {name} {{ type {} : verdict; }}", map.key);
        }
    }
    for name in sets {
        if let (Some(set), Some(old)) = (want.sets.get(name), known.sets.get(name)) {
            let gone: Vec<&Element> = old.elements.difference(&set.elements).collect();
            if !gone.is_empty() {
                let _ = writeln!(
                    s,
                    "delete element {t} {name} {{ {} }}",
                    join(gone.into_iter())
                );
            }
        }
    }
    for name in sets {
        let Some(set) = want.sets.get(name) else {
            continue;
        };
        let new: Vec<&Element> = match known.sets.get(name) {
            Some(old) => set.elements.difference(&old.elements).collect(),
            None => set.elements.iter().collect(),
        };
        if !new.is_empty() {
            let _ = writeln!(s, "add element {t} {name} {{ {} }}", join(new.into_iter()));
        }
    }
    for name in chains {
        if let (Some(chain), None) = (want.chains.get(name), known.chains.get(name)) {
            match &chain.hook {
                Some(h) => {
                    let _ = writeln!(
                        s,
                        "add chain {t} {name} {{ type {} hook {} priority {}; policy {}; }}",
                        h.kind, h.hook, h.priority, h.policy
                    );
                }
                None => {
                    let _ = writeln!(s, "add chain {t} {name}");
                }
            }
        }
    }
    for name in chains {
        let Some(chain) = want.chains.get(name) else {
            continue;
        };
        rewrite_rules(&mut s, &t, name, chain, known);
    }
    for name in sets {
        map_changes(&mut s, &t, name, want.maps.get(name), known.maps.get(name));
    }
    let removed: Vec<&String> = chains
        .iter()
        .filter(|n| known.chains.contains_key(*n) && !want.chains.contains_key(*n))
        .collect();
    // Removed chains are emptied first, so no jump to one another is left when they go.
    for name in &removed {
        let _ = writeln!(s, "flush chain {t} {name}");
    }
    for name in &removed {
        let _ = writeln!(s, "delete chain {t} {name}");
    }
    for name in &gone_counters {
        let _ = writeln!(s, "delete counter {t} {name}");
    }
    for name in sets {
        if known.sets.contains_key(name) && !want.sets.contains_key(name) {
            let _ = writeln!(s, "delete set {t} {name}");
        }
        if known.maps.contains_key(name) && !want.maps.contains_key(name) {
            let _ = writeln!(s, "delete map {t} {name}");
        }
    }
    (!s.is_empty()).then_some(s)
}

/// Counters the named chains' rules name now but did not (to add before the rules), and
/// named before but not now (to delete once the rules are gone).
fn counter_changes(
    want: &Table,
    known: &Table,
    chains: &BTreeSet<String>,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let named = |t: &Table| -> BTreeSet<String> {
        chains
            .iter()
            .filter_map(|n| t.chains.get(n))
            .flat_map(Chain::counters)
            .map(String::from)
            .collect()
    };
    let (now, before) = (named(want), named(known));
    let new = now.difference(&before).cloned().collect();
    let gone = before.difference(&now).cloned().collect();
    (new, gone)
}

/// A map's elements whose key is gone or whose verdict changed are deleted (by key), then
/// the new ones added.
fn map_changes(s: &mut String, t: &str, name: &str, want: Option<&Map>, known: Option<&Map>) {
    let empty = Map::verdicts("");
    let (Some(want), old) = (want, known.unwrap_or(&empty)) else {
        // Going: its elements name chains that may go in the same transaction.
        if known.is_some_and(|k| !k.elements.is_empty()) {
            let _ = writeln!(s, "flush map {t} {name}");
        }
        return;
    };
    let gone: Vec<String> = old
        .elements
        .iter()
        .filter(|(k, v)| want.elements.get(*k) != Some(*v))
        .map(|(k, _)| old.key_text(k))
        .collect();
    if !gone.is_empty() && known.is_some() {
        let _ = writeln!(s, "delete element {t} {name} {{ {} }}", gone.join(", "));
    }
    let came = map_elements(want, Some(old));
    if !came.is_empty() {
        let _ = writeln!(s, "add element {t} {name} {{ {came} }}");
    }
}

/// `key : verdict` of each element of `map` that `old` does not hold as it is.
fn map_elements(map: &Map, old: Option<&Map>) -> String {
    map.elements
        .iter()
        .filter(|(k, v)| old.is_none_or(|o| o.elements.get(*k) != Some(*v)))
        .map(|(k, v)| format!("{} : {v}", map.key_text(k)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Among the named ones: a set that changed type or flags, a map that changed key type, or
/// a chain that changed hook, in both tables.
fn reshaped(
    want: &Table,
    known: &Table,
    sets: &BTreeSet<String>,
    chains: &BTreeSet<String>,
) -> bool {
    let sets = sets.iter().any(|n| {
        matches!((want.sets.get(n), known.sets.get(n)), (Some(w), Some(k)) if !w.same_shape(k))
            || matches!((want.maps.get(n), known.maps.get(n)), (Some(w), Some(k)) if w.key != k.key)
            // A set that became a map or the other way round.
            || (want.sets.contains_key(n) && known.maps.contains_key(n))
            || (want.maps.contains_key(n) && known.sets.contains_key(n))
    });
    let chains = chains.iter().any(|n| {
        matches!((want.chains.get(n), known.chains.get(n)), (Some(w), Some(k)) if w.hook != k.hook)
    });
    sets || chains
}

/// A chain whose rules differ from the kernel's is flushed and written whole; a new one
/// with no rules needs no statement beyond its `add chain`.
fn rewrite_rules(s: &mut String, t: &str, name: &str, chain: &Chain, known: &Table) {
    let old_rules = known.chains.get(name).map(|c| c.rules.as_slice());
    if old_rules == Some(chain.rules.as_slice()) || (old_rules.is_none() && chain.rules.is_empty())
    {
        return;
    }
    if old_rules.is_some() {
        let _ = writeln!(s, "flush chain {t} {name}");
    }
    for rule in &chain.rules {
        let _ = writeln!(s, "add rule {t} {name} {}", rule_line(rule));
    }
}

fn rule_line(rule: &crate::desired::nft::Rule) -> String {
    format!(
        "{} comment \"{RULE_COMMENT_PREFIX}{}\"",
        rule.text,
        rule.id()
    )
}

fn join<'a>(elements: impl Iterator<Item = &'a Element>) -> String {
    elements
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::nft::{Family, Hook, Rule, Set};

    fn table(pools: &[&str], rules: &[&str]) -> Table {
        let mut t = Table::new(Family::Inet, "t");
        t.sets.insert(
            "pools".into(),
            Set::prefixes(
                "ipv4_addr",
                pools.iter().map(|p| Element::net(p.parse().unwrap())),
            ),
        );
        t.chains.insert(
            "post".into(),
            Chain {
                hook: Some(Hook {
                    kind: "nat".into(),
                    hook: "postrouting".into(),
                    priority: 110,
                    policy: "accept".into(),
                }),
                rules: rules.iter().map(|r| Rule::new(*r)).collect(),
            },
        );
        t
    }

    #[test]
    fn equal_tables_need_no_transaction() {
        let t = table(&["10.0.0.0/16"], &["counter"]);
        assert_eq!(changes(&t, &t.clone()), None);
    }

    #[test]
    fn an_element_change_touches_only_that_element() {
        let old = table(&["10.0.0.0/16"], &["ip saddr @pools counter"]);
        let new = table(
            &["10.0.0.0/16", "10.1.0.0/16"],
            &["ip saddr @pools counter"],
        );
        assert_eq!(
            changes(&new, &old).unwrap(),
            "add element inet t pools { 10.1.0.0/16 }\n"
        );
        assert_eq!(
            changes(&old, &new).unwrap(),
            "delete element inet t pools { 10.1.0.0/16 }\n"
        );
    }

    #[test]
    fn a_rule_change_flushes_and_refills_that_chain_only() {
        let old = table(&["10.0.0.0/16"], &["counter"]);
        let mut new = table(&["10.0.0.0/16"], &["counter accept"]);
        new.chains.insert(
            "other".into(),
            Chain {
                hook: None,
                rules: vec![Rule::new("drop")],
            },
        );
        let s = changes(&new, &old).unwrap();
        let id = Rule::new("counter accept").id();
        assert_eq!(
            s,
            format!(
                "add chain inet t other\n\
                 add rule inet t other drop comment \"tortie:{}\"\n\
                 flush chain inet t post\n\
                 add rule inet t post counter accept comment \"tortie:{id}\"\n",
                Rule::new("drop").id()
            )
        );
        // And back: the chain is emptied before it is deleted.
        let back = changes(&old, &new).unwrap();
        assert!(back.ends_with("flush chain inet t other\ndelete chain inet t other\n"));
    }

    fn dispatch(entries: &[(&str, &str)]) -> Table {
        let mut t = table(&[], &[]);
        let mut m = Map::verdicts("ifname");
        for (k, v) in entries {
            m.elements.insert(k.to_string(), v.to_string());
            t.chains.insert(
                v.trim_start_matches("goto ").into(),
                Chain {
                    hook: None,
                    rules: vec![Rule::counted(&format!("{k}/end"), "drop")],
                },
            );
        }
        t.maps.insert("wl".into(), m);
        t
    }

    #[test]
    fn a_new_map_entry_adds_its_chain_counter_and_element_only() {
        let old = dispatch(&[("cali1", "goto fw-cali1")]);
        let new = dispatch(&[("cali1", "goto fw-cali1"), ("cali2", "goto fw-cali2")]);
        let rule = Rule::counted("cali2/end", "drop");
        assert_eq!(
            changes(&new, &old).unwrap(),
            format!(
                "add counter inet t cali2/end\n\
                 add chain inet t fw-cali2\n\
                 add rule inet t fw-cali2 counter name \"cali2/end\" drop comment \"tortie:{}\"\n\
                 add element inet t wl {{ \"cali2\" : goto fw-cali2 }}\n",
                rule.id()
            )
        );
        // And back: the element goes before its chain, the counter after it.
        assert_eq!(
            changes(&old, &new).unwrap(),
            "delete element inet t wl { \"cali2\" }\n\
             flush chain inet t fw-cali2\n\
             delete chain inet t fw-cali2\n\
             delete counter inet t cali2/end\n"
        );
        // A changed verdict: the key is deleted and added again in one transaction.
        let mut moved = old.clone();
        moved
            .maps
            .get_mut("wl")
            .unwrap()
            .elements
            .insert("cali1".into(), "drop".into());
        assert_eq!(
            changes(&moved, &old).unwrap(),
            "delete element inet t wl { \"cali1\" }\nadd element inet t wl { \"cali1\" : drop }\n"
        );
        let s = full(&new);
        assert!(s.contains("  counter cali1/end { }\n"), "{s}");
        assert!(
            s.contains("  map wl {\n    type ifname : verdict\n    elements = { \"cali1\" : goto fw-cali1, \"cali2\" : goto fw-cali2 }\n  }\n"),
            "{s}"
        );
    }

    #[test]
    fn a_reshaped_set_or_hook_rewrites_the_table() {
        let old = table(&["10.0.0.0/16"], &[]);
        let mut new = old.clone();
        new.sets.get_mut("pools").unwrap().flags.clear();
        assert!(
            changes(&new, &old)
                .unwrap()
                .starts_with("add table inet t\ndelete table")
        );
        let mut new = old.clone();
        new.chains
            .get_mut("post")
            .unwrap()
            .hook
            .as_mut()
            .unwrap()
            .priority = 100;
        assert!(
            changes(&new, &old)
                .unwrap()
                .starts_with("add table inet t\ndelete table")
        );
    }

    #[test]
    fn the_full_script_declares_sets_before_chains_and_tags_rules() {
        let s = full(&table(&["10.0.0.0/16", "10.9.9.9/32"], &["counter"]));
        let id = Rule::new("counter").id();
        assert_eq!(
            s,
            format!(
                "add table inet t\ndelete table inet t\ntable inet t {{\n  set pools {{\n    \
                 type ipv4_addr\n    flags interval\n    elements = {{ 10.0.0.0/16, 10.9.9.9 }}\n  \
                 }}\n  chain post {{\n    type nat hook postrouting priority 110; policy accept;\n    \
                 counter comment \"tortie:{id}\"\n  }}\n}}\n"
            )
        );
    }
}
