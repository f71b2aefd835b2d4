//! Sans-IO: from a desired table and the table the kernel is known to hold to one nft
//! transaction script (`nft -f -` syntax). Set elements are added and deleted in place,
//! a chain whose rules changed is flushed and refilled alone, and the whole table is
//! rewritten only when nothing is known (start-up, after drift) or a set or base chain
//! changed shape (the kernel cannot retype them in place).

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::desired::nft::{Chain, Element, RULE_COMMENT_PREFIX, Set, Table};

/// The script replacing the whole table in one transaction: `add` makes the `delete` valid
/// when the table is absent (nft 1.0.6 has no `destroy`), and the kernel applies all or none.
pub fn full(want: &Table) -> String {
    let (family, name) = (want.family, &want.name);
    let mut s = format!("add table {family} {name}\ndelete table {family} {name}\n");
    let _ = writeln!(s, "table {family} {name} {{");
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
/// `full` when the two are different tables or a set or base chain changed shape.
pub fn changes(want: &Table, known: &Table) -> Option<String> {
    if want == known {
        return None;
    }
    if want.family != known.family || want.name != known.name || reshaped(want, known) {
        return Some(full(want));
    }
    let t = format!("{} {}", want.family, want.name);
    let mut s = String::new();
    // New sets first: refilled rules may refer to them.
    for (name, set) in &want.sets {
        if !known.sets.contains_key(name) {
            let flags = if set.flags.is_empty() {
                String::new()
            } else {
                format!(" flags {};", set.flags.join(","))
            };
            let _ = writeln!(s, "add set {t} {name} {{ type {};{flags} }}", set.kind);
        }
    }
    // Deletions before additions: in an interval set a new prefix may overlap an old one.
    for (name, set) in &want.sets {
        let Some(old) = known.sets.get(name) else {
            continue;
        };
        let gone: Vec<&Element> = old.elements.difference(&set.elements).collect();
        if !gone.is_empty() {
            let _ = writeln!(
                s,
                "delete element {t} {name} {{ {} }}",
                join(gone.into_iter())
            );
        }
    }
    for (name, set) in &want.sets {
        let empty = Set {
            elements: Default::default(),
            ..set.clone()
        };
        let old = known.sets.get(name).unwrap_or(&empty);
        let new: Vec<&Element> = set.elements.difference(&old.elements).collect();
        if !new.is_empty() {
            let _ = writeln!(s, "add element {t} {name} {{ {} }}", join(new.into_iter()));
        }
    }
    for (name, chain) in &want.chains {
        if !known.chains.contains_key(name) {
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
    for (name, chain) in &want.chains {
        rewrite_rules(&mut s, &t, name, chain, known);
    }
    // Removed chains are emptied first, so no jump to one another is left when they go.
    let removed: Vec<&String> = known
        .chains
        .keys()
        .filter(|n| !want.chains.contains_key(*n))
        .collect();
    for name in &removed {
        let _ = writeln!(s, "flush chain {t} {name}");
    }
    for name in &removed {
        let _ = writeln!(s, "delete chain {t} {name}");
    }
    for name in known.sets.keys().filter(|n| !want.sets.contains_key(*n)) {
        let _ = writeln!(s, "delete set {t} {name}");
    }
    Some(s)
}

/// `changes` limited to the named sets and chains (those a caller knows it changed): the
/// cost follows the change, not the table. Same statements, same order of kinds.
pub fn changes_of(
    want: &Table,
    known: &Table,
    sets: &BTreeSet<String>,
    chains: &BTreeSet<String>,
) -> Option<String> {
    let t = format!("{} {}", want.family, want.name);
    let mut s = String::new();
    let reshaped_set = sets.iter().any(
        |n| matches!((want.sets.get(n), known.sets.get(n)), (Some(w), Some(k)) if !w.same_shape(k)),
    );
    let reshaped_chain = chains.iter().any(|n| {
        matches!((want.chains.get(n), known.chains.get(n)), (Some(w), Some(k)) if w.hook != k.hook)
    });
    if want.family != known.family || want.name != known.name || reshaped_set || reshaped_chain {
        return Some(full(want));
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
    let removed: Vec<&String> = chains
        .iter()
        .filter(|n| known.chains.contains_key(*n) && !want.chains.contains_key(*n))
        .collect();
    for name in &removed {
        let _ = writeln!(s, "flush chain {t} {name}");
    }
    for name in &removed {
        let _ = writeln!(s, "delete chain {t} {name}");
    }
    for name in sets {
        if known.sets.contains_key(name) && !want.sets.contains_key(name) {
            let _ = writeln!(s, "delete set {t} {name}");
        }
    }
    (!s.is_empty()).then_some(s)
}

/// A set that changed type or flags, or a chain that changed hook, in both tables.
fn reshaped(want: &Table, known: &Table) -> bool {
    let sets = want
        .sets
        .iter()
        .any(|(n, s)| known.sets.get(n).is_some_and(|k| !s.same_shape(k)));
    let chains = want
        .chains
        .iter()
        .any(|(n, c): (&String, &Chain)| known.chains.get(n).is_some_and(|k| k.hook != c.hook));
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
    use crate::desired::nft::{Family, Hook, Rule};

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
