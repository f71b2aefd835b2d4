// Element-only changes written over nfnetlink by the nft driver (`dataplane::nft::elements`)
// against the real kernel in a test namespace: what the kernel then lists must be exactly
// what `nft` would have written (the driver's drift check compares listings with the model,
// so any encoding slip would show as a table out of sync), for every key type the policy
// table uses; and a batch the kernel refuses changes nothing and is repaired by the next
// reconcile.

mod support;

use std::collections::BTreeSet;

use support::NetNs;
use tortie::dataplane::nft::{Driver, Outcome, Runner};
use tortie::desired::nft::{Chain, Element, Family, Map, Rule, Set, Table};

const V4_PORTS: &str = "ipv4_addr . inet_proto . inet_service";
const V6_PORTS: &str = "ipv6_addr . inet_proto . inet_service";

fn net(s: &str) -> Element {
    Element::net(s.parse().expect("net"))
}

fn text(s: &str) -> Element {
    Element::Text(s.into())
}

fn set(kind: &str, elements: impl IntoIterator<Item = Element>) -> Set {
    Set {
        kind: kind.into(),
        flags: Vec::new(),
        elements: elements.into_iter().collect(),
    }
}

fn chain(rules: &[&str]) -> Chain {
    Chain {
        hook: None,
        rules: rules.iter().map(|r| Rule::new(*r)).collect(),
    }
}

/// A table shaped like the policy table: selector sets of both families, named-port sets
/// of both families, an `ifname : verdict` dispatch map and the chains it names.
fn table(step: usize) -> Table {
    let mut t = Table::new(Family::Inet, "tortie-elements");
    let (v4, v6, p4, p6, ifaces): (Vec<_>, Vec<_>, Vec<_>, Vec<_>, Vec<_>) = if step == 0 {
        (
            vec![net("10.0.0.1/32"), net("10.0.0.2/32")],
            vec![net("fd00::1/128")],
            vec![text("10.0.0.1 . tcp . 8080")],
            vec![text("fd00::1 . udp . 53")],
            vec!["cali0a"],
        )
    } else {
        (
            vec![
                net("10.0.0.2/32"),
                net("10.0.0.3/32"),
                net("10.255.255.255/32"),
            ],
            vec![net("fd00::2/128"), net("fd00:ffff::ffff/128")],
            vec![
                text("10.0.0.3 . tcp . 8080"),
                text("10.0.0.3 . sctp . 65535"),
            ],
            vec![text("fd00::2 . udp . 53"), text("fd00::2 . tcp . 1")],
            vec!["cali0b", "cali0123456789a"],
        )
    };
    t.sets.insert("sel4".into(), set("ipv4_addr", v4));
    t.sets.insert("sel6".into(), set("ipv6_addr", v6));
    t.sets.insert("np4".into(), set(V4_PORTS, p4));
    t.sets.insert("np6".into(), set(V6_PORTS, p6));
    let mut map = Map::verdicts("ifname");
    for i in ifaces {
        map.elements.insert(i.into(), "goto ep-a".into());
    }
    if step > 0 {
        // A changed verdict: same key, other chain.
        map.elements.insert("cali0b".into(), "goto ep-b".into());
    }
    t.maps.insert("wl".into(), map);
    t.chains
        .insert("ep-a".into(), chain(&["ip saddr @sel4 accept", "drop"]));
    t.chains.insert(
        "ep-b".into(),
        chain(&[
            "ip6 saddr @sel6 accept",
            "ip daddr . meta l4proto . th dport @np4 accept",
        ]),
    );
    t.chains
        .insert("dispatch".into(), chain(&["iifname vmap @wl"]));
    t
}

fn touched() -> BTreeSet<String> {
    ["sel4", "sel6", "np4", "np6", "wl"]
        .into_iter()
        .map(String::from)
        .collect()
}

#[test]
fn element_changes_over_netlink_list_exactly_as_nft_writes_them() {
    let node = NetNs::new("nftel").unwrap();
    let mut driver = Driver::new(Runner::default());
    let (first, second) = (table(0), table(1));
    let created = node.run(|| driver.reconcile(&first)).unwrap().unwrap();
    assert_eq!(created, Outcome::Created);
    // Elements only, some keys changing verdict: one netlink batch, no nft.
    let none = BTreeSet::new();
    let r = node.run(|| driver.reconcile_changed(&second, &touched(), &none));
    assert_eq!(r.unwrap().unwrap(), Outcome::Updated);
    assert_eq!(driver.netlink_writes(), 1);
    // The kernel's listing equals the model: the drift check finds nothing to repair.
    let check = node.run(|| driver.reconcile(&second)).unwrap().unwrap();
    let listed = node
        .exec_ok(&["nft", "list", "table", "inet", "tortie-elements"])
        .unwrap();
    assert_eq!(check, Outcome::InSync, "{listed}");
    for want in [
        "10.255.255.255",
        "fd00:ffff::ffff",
        "10.0.0.3 . sctp . 65535",
        "fd00::2 . tcp . 1",
        "\"cali0123456789a\" : goto ep-a",
        "\"cali0b\" : goto ep-b",
    ] {
        assert!(listed.contains(want), "{want} not in\n{listed}");
    }
    assert!(!listed.contains("cali0a"), "{listed}");
    // And back again.
    let r = node.run(|| driver.reconcile_changed(&first, &touched(), &none));
    assert_eq!(r.unwrap().unwrap(), Outcome::Updated);
    assert_eq!(driver.netlink_writes(), 2);
    let check = node.run(|| driver.reconcile(&first)).unwrap().unwrap();
    assert_eq!(check, Outcome::InSync);
}

#[test]
fn a_refused_element_batch_changes_nothing_and_the_next_reconcile_repairs() {
    let node = NetNs::new("nftelbad").unwrap();
    let mut driver = Driver::new(Runner::default());
    let (first, second) = (table(0), table(1));
    node.run(|| driver.reconcile(&first)).unwrap().unwrap();
    // Someone deletes an element the next change deletes too: the kernel refuses the whole
    // batch (nft would too), so none of its additions may be in.
    node.exec_ok(&[
        "nft",
        "delete",
        "element",
        "inet",
        "tortie-elements",
        "sel4",
        "{ 10.0.0.1 }",
    ])
    .unwrap();
    let none = BTreeSet::new();
    let r = node
        .run(|| driver.reconcile_changed(&second, &touched(), &none))
        .unwrap();
    assert!(r.is_err(), "{r:?}");
    let listed = node
        .exec_ok(&["nft", "list", "table", "inet", "tortie-elements"])
        .unwrap();
    assert!(!listed.contains("10.0.0.3"), "half applied:\n{listed}");
    // The driver forgot what it knew: the next pass reads the kernel and rewrites.
    let repaired = node.run(|| driver.reconcile(&second)).unwrap().unwrap();
    assert!(repaired.wrote(), "{repaired:?}");
    let check = node.run(|| driver.reconcile(&second)).unwrap().unwrap();
    assert_eq!(check, Outcome::InSync);
}
