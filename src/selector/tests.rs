//! Behaviour of the public selector API: evaluation of every operator (absent labels
//! included), canonical text and Felix IDs, the nodeSelector rules, and a seeded
//! generator that checks parsing against an independent grammar-level evaluator.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sel(s: &str) -> Selector {
    Selector::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
}

/// Asserts which of `cases` (labels, expected) the selector matches.
fn check(s: &str, cases: &[(&[(&str, &str)], bool)]) {
    let parsed = sel(s);
    let reparsed = sel(parsed.canonical());
    for (pairs, want) in cases {
        let l = labels(pairs);
        assert_eq!(parsed.matches(&l), *want, "{s:?} against {l:?}");
        assert_eq!(
            reparsed.matches(&l),
            *want,
            "canonical of {s:?} against {l:?}"
        );
    }
}

#[test]
fn equality_matches_only_present_equal_values() {
    check(
        "a == 'b'",
        &[
            (&[("a", "b")], true),
            (&[("a", "b"), ("c", "d")], true),
            (&[("a", "c")], false),
            (&[("c", "b")], false),
            (&[], false),
        ],
    );
}

#[test]
fn inequality_matches_absent_labels() {
    check(
        r#"a != "b""#,
        &[(&[("a", "b")], false), (&[("a", "c")], true), (&[], true)],
    );
}

#[test]
fn in_set_needs_the_label_and_not_in_accepts_its_absence() {
    check(
        "a in {'x', 'y'}",
        &[
            (&[("a", "x")], true),
            (&[("a", "y")], true),
            (&[("a", "z")], false),
            (&[], false),
        ],
    );
    check(
        "a not in {'x', 'y'}",
        &[(&[("a", "x")], false), (&[("a", "z")], true), (&[], true)],
    );
}

#[test]
fn has_and_not_has_test_presence_even_of_empty_values() {
    check("has(a)", &[(&[("a", "")], true), (&[("b", "x")], false)]);
    check("!has(a)", &[(&[("a", "")], false), (&[("b", "x")], true)]);
}

#[test]
fn substring_operators_need_the_label() {
    check(
        "a contains 'ell'",
        &[
            (&[("a", "hello")], true),
            (&[("a", "help")], false),
            (&[], false),
        ],
    );
    check(
        "a starts with 'he'",
        &[
            (&[("a", "hello")], true),
            (&[("a", "the")], false),
            (&[], false),
        ],
    );
    check(
        "a ends with 'lo'",
        &[
            (&[("a", "hello")], true),
            (&[("a", "lot")], false),
            (&[], false),
        ],
    );
    check("a starts with ''", &[(&[("a", "")], true), (&[], false)]);
}

#[test]
fn negation_inverts_a_comparison_including_absent_labels() {
    check(
        "!a == 'x'",
        &[(&[("a", "x")], false), (&[("a", "y")], true), (&[], true)],
    );
}

#[test]
fn and_or_follow_precedence() {
    let s = "a == '1' || b == '1' && c == '1'";
    check(
        s,
        &[
            (&[("a", "1")], true),
            (&[("b", "1")], false),
            (&[("b", "1"), ("c", "1")], true),
        ],
    );
    check(
        "(a == '1' || b == '1') && c == '1'",
        &[(&[("a", "1")], false), (&[("a", "1"), ("c", "1")], true)],
    );
}

#[test]
fn empty_and_blank_selectors_are_all() {
    for s in ["", "  ", "\t", "all()", " ( all( ) ) "] {
        let p = sel(s);
        assert!(p.is_all(), "{s:?}");
        assert_eq!(p.canonical(), "all()");
        assert!(p.matches(&labels(&[])));
    }
    assert!(!sel("has(a)").is_all());
    assert!(!sel("global()").is_all());
    assert!(Selector::default().is_all());
}

#[test]
fn global_parses_and_matches_everything_when_evaluated() {
    let g = sel("global()");
    assert!(g.uses_global());
    assert!(g.matches(&labels(&[])));
    assert!(sel("has(a) || !global()").uses_global());
    assert!(!sel("has(a)").uses_global());
}

#[test]
fn keys_with_kubernetes_prefixes_parse_and_match() {
    let s = sel(
        "projectcalico.org/name == 'ns-1' && kubernetes.io/hostname in {'node-a'} \
         && has(topology.kubernetes.io/zone) && my_key-2.x != 'y'",
    );
    let l = labels(&[
        ("projectcalico.org/name", "ns-1"),
        ("kubernetes.io/hostname", "node-a"),
        ("topology.kubernetes.io/zone", "eu-1"),
    ]);
    assert!(s.matches(&l));
    let keys: Vec<&str> = s.label_keys().into_iter().collect();
    assert_eq!(
        keys,
        vec![
            "kubernetes.io/hostname",
            "my_key-2.x",
            "projectcalico.org/name",
            "topology.kubernetes.io/zone"
        ]
    );
}

#[test]
fn quotes_of_either_kind_hold_the_other_kind() {
    check(r#"a == "it's""#, &[(&[("a", "it's")], true)]);
    check(r#"a == 'say "hi"'"#, &[(&[("a", r#"say "hi""#)], true)]);
    check(
        r#"a in {"'", '"', "c"}"#,
        &[
            (&[("a", "'")], true),
            (&[("a", "\"")], true),
            (&[("a", "e")], false),
        ],
    );
}

#[test]
fn canonical_text_and_ids_match_calico() {
    // Expected texts and IDs are those libcalico-go's own tests assert.
    let cases = [
        (
            "",
            "all()",
            Some("s:5y5I3VdRZfDU01O--xXAPx2yxCQQqMf0M6IWug"),
        ),
        (
            "! (has( b)||! has(a ))",
            "!(has(b) || !has(a))",
            Some("s:Iss0uCleLYv1GSv_pNm7hAO58kE9jAx1NKyG3Q"),
        ),
        (
            r#"! (a == "b"&&! c != "d")"#,
            r#"!(a == "b" && !c != "d")"#,
            Some("s:lh3haoY1ikTRkd4UZu0nWSaIBknYLPJLX16d-w"),
        ),
        (r#"a == "'""#, r#"a == "'""#, None),
        (r#"a contains '"'"#, r#"a contains '"'"#, None),
        (r#"a startswith '"'"#, r#"a starts with '"'"#, None),
        (r#"a endswith "'""#, r#"a ends with "'""#, None),
        (r#"a!='"'"#, r#"a != '"'"#, None),
        (
            r#"a in {"z", "z", "x", "y", "x", "a"}"#,
            r#"a in {"a", "x", "y", "z"}"#,
            None,
        ),
        ("a not in {}", "a not in {}", None),
    ];
    for (input, canonical, id) in cases {
        let s = sel(input);
        assert_eq!(s.canonical(), canonical, "{input:?}");
        assert_eq!(s.to_string(), canonical);
        if let Some(id) = id {
            assert_eq!(s.unique_id(), id, "{input:?}");
        }
        assert_eq!(sel(canonical).unique_id(), s.unique_id());
    }
}

#[test]
fn equal_selectors_compare_equal_whatever_the_spelling() {
    assert_eq!(sel("a=='b'"), sel(r#"  a == "b" "#));
    assert_eq!(sel("a in {'y','x','x'}"), sel("a in {'x', 'y'}"));
    assert_ne!(sel("a == 'b'"), sel("a != 'b'"));
    let set: std::collections::HashSet<Selector> = ["has(a)", "has( a )", "!!has(a)"]
        .iter()
        .map(|s| sel(s))
        .collect();
    assert_eq!(set.len(), 1);
}

#[test]
fn node_selector_defaults_to_all_and_enforces_calico_limits() {
    assert!(parse_node_selector("").expect("empty ok").is_all());
    let ok = format!("a == '{}'", "x".repeat(MAX_NODE_SELECTOR_LEN - 7));
    assert_eq!(ok.len(), MAX_NODE_SELECTOR_LEN);
    assert!(parse_node_selector(&ok).is_ok());
    let long = format!("a == '{}'", "x".repeat(MAX_NODE_SELECTOR_LEN - 6));
    let err = parse_node_selector(&long).expect_err("too long");
    assert!(matches!(
        err,
        SelectorError::TooLong {
            len: 1025,
            max: 1024,
            ..
        }
    ));
    assert!(
        err.to_string()
            .contains("IPPool nodeSelector allows at most 1024"),
        "{err}"
    );
    let err = parse_node_selector("global()").expect_err("global rejected");
    assert!(matches!(err, SelectorError::GlobalNotAllowed { .. }));
    assert!(matches!(
        parse_node_selector("has(a"),
        Err(SelectorError::Syntax { position: 5, .. })
    ));
}

#[test]
fn serde_round_trips_through_canonical_text_and_rejects_bad_input() {
    let s: Selector = serde_json::from_str(r#""a=='b'""#).expect("deserializes");
    assert_eq!(
        serde_json::to_string(&s).expect("serializes"),
        r#""a == \"b\"""#
    );
    let err = serde_json::from_str::<Selector>(r#""a = 'b'""#).expect_err("bad selector");
    assert!(err.to_string().contains("expected '=='"), "{err}");
}

#[test]
fn evaluation_borrows_kubernetes_style_optional_labels() {
    let meta_labels: Option<BTreeMap<String, String>> = Some(labels(&[("role", "edge")]));
    assert!(sel("role == 'edge'").matches(&meta_labels));
    let none: Option<BTreeMap<String, String>> = None;
    assert!(sel("role != 'edge'").matches(&none));
    assert!(!sel("has(role)").matches(&none));
}

// ---- seeded generator -------------------------------------------------------------------

const KEYS: &[&str] = &[
    "app",
    "projectcalico.org/name",
    "kubernetes.io/hostname",
    "t_1",
    "a.b-c",
];
const VALUES: &[&str] = &["", "web", "webserver", "db", "it's", r#"say "hi""#, "x y"];

type Oracle = Box<dyn Fn(&BTreeMap<String, String>) -> bool>;

/// Reference semantics of one comparison operator: (label value if present, operand).
type CompareFn = fn(Option<&String>, &str) -> bool;

fn pick<'a>(rng: &mut StdRng, from: &[&'a str]) -> &'a str {
    from[rng.random_range(0..from.len())]
}

/// Optional whitespace.
fn sp(rng: &mut StdRng) -> &'static str {
    pick(rng, &["", "", " ", "\t", "  "])
}

/// Mandatory whitespace (between a label and a word operator).
fn sp1(rng: &mut StdRng) -> &'static str {
    pick(rng, &[" ", "\t", " \t "])
}

fn quoted(rng: &mut StdRng, v: &str) -> String {
    let q = if v.contains('\'') {
        '"'
    } else if v.contains('"') || rng.random_bool(0.5) {
        '\''
    } else {
        '"'
    };
    format!("{q}{v}{q}")
}

/// Text for `or := and ('||' and)*` plus the value the grammar says it must have.
fn gen_or(rng: &mut StdRng, depth: u32) -> (String, Oracle) {
    let n = rng.random_range(1..=3);
    let (mut text, first) = gen_and(rng, depth);
    let mut parts = vec![first];
    for _ in 1..n {
        let (t, o) = gen_and(rng, depth);
        text = format!("{text}{}||{}{t}", sp(rng), sp(rng));
        parts.push(o);
    }
    (text, Box::new(move |l| parts.iter().any(|o| o(l))))
}

fn gen_and(rng: &mut StdRng, depth: u32) -> (String, Oracle) {
    let n = rng.random_range(1..=3);
    let (mut text, first) = gen_op(rng, depth);
    let mut parts = vec![first];
    for _ in 1..n {
        let (t, o) = gen_op(rng, depth);
        text = format!("{text}{}&&{}{t}", sp(rng), sp(rng));
        parts.push(o);
    }
    (text, Box::new(move |l| parts.iter().all(|o| o(l))))
}

fn gen_op(rng: &mut StdRng, depth: u32) -> (String, Oracle) {
    let nots = rng.random_range(0..=2usize);
    let mut prefix = String::new();
    for _ in 0..nots {
        prefix.push('!');
        prefix.push_str(sp(rng));
    }
    let key = pick(rng, KEYS).to_owned();
    let value = pick(rng, VALUES).to_owned();
    let choice = rng.random_range(0..if depth < 4 { 9 } else { 8 });
    let (text, oracle): (String, Oracle) = match choice {
        0 => (
            format!("has({}{key}{})", sp(rng), sp(rng)),
            Box::new(move |l| l.contains_key(&key)),
        ),
        1 => (format!("all({})", sp(rng)), Box::new(|_| true)),
        2..=6 => {
            let (op, f): (&str, CompareFn) = match choice {
                2 => ("==", |v, x| v.is_some_and(|v| v == x)),
                3 => ("!=", |v, x| v.is_none_or(|v| v != x)),
                4 => ("contains", |v, x| v.is_some_and(|v| v.contains(x))),
                5 => (pick(rng, &["starts with", "startswith"]), |v, x| {
                    v.is_some_and(|v| v.starts_with(x))
                }),
                _ => ("ends with", |v, x| v.is_some_and(|v| v.ends_with(x))),
            };
            let gap = if op.starts_with(['=', '!']) {
                sp(rng)
            } else {
                sp1(rng)
            };
            let text = format!("{key}{gap}{op}{}{}", sp(rng), quoted(rng, &value));
            (text, Box::new(move |l| f(l.get(&key), &value)))
        }
        7 => {
            let negated = rng.random_bool(0.5);
            let n = rng.random_range(0..=3);
            let values: Vec<String> = (0..n).map(|_| pick(rng, VALUES).to_owned()).collect();
            let items: Vec<String> = values.iter().map(|v| quoted(rng, v)).collect();
            let mut body = items.join(&format!("{},{}", sp(rng), sp(rng)));
            if n > 0 && rng.random_bool(0.2) {
                body.push(',');
            }
            let op = if negated { "not in" } else { "in" };
            let text = format!(
                "{key}{}{op}{}{{{}{body}{}}}",
                sp1(rng),
                sp(rng),
                sp(rng),
                sp(rng)
            );
            let oracle: Oracle = Box::new(move |l| match l.get(&key) {
                Some(v) => values.contains(v) != negated,
                None => negated,
            });
            (text, oracle)
        }
        _ => {
            let (inner, o) = gen_or(rng, depth + 1);
            (format!("({}{inner}{})", sp(rng), sp(rng)), o)
        }
    };
    let text = format!("{prefix}{text}");
    if nots % 2 == 1 {
        (text, Box::new(move |l| !oracle(l)))
    } else {
        (text, oracle)
    }
}

fn random_labels(rng: &mut StdRng) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    for k in KEYS {
        if rng.random_bool(0.6) {
            l.insert(k.to_string(), pick(rng, VALUES).to_owned());
        }
    }
    l
}

#[test]
fn generated_selectors_evaluate_as_the_grammar_says_and_round_trip() {
    let mut rng = StdRng::seed_from_u64(0x5e1ec7);
    for case in 0..2000 {
        let (text, oracle) = gen_or(&mut rng, 0);
        let parsed = Selector::parse(&text)
            .unwrap_or_else(|e| panic!("case {case}: {text:?} should parse: {e}"));
        let reparsed = Selector::parse(parsed.canonical())
            .unwrap_or_else(|e| panic!("case {case}: canonical {parsed} should parse: {e}"));
        assert_eq!(parsed.expr(), reparsed.expr(), "case {case}: {text:?}");
        assert_eq!(parsed.canonical(), reparsed.canonical());
        for _ in 0..8 {
            let l = random_labels(&mut rng);
            assert_eq!(
                parsed.matches(&l),
                oracle(&l),
                "case {case}: {text:?} on {l:?}"
            );
        }
    }
}

#[test]
fn truncated_generated_selectors_fail_with_an_in_range_position() {
    let mut rng = StdRng::seed_from_u64(42);
    for _ in 0..500 {
        let (text, _) = gen_or(&mut rng, 0);
        let cut = rng.random_range(0..text.len());
        if !text.is_char_boundary(cut) {
            continue;
        }
        // Any prefix either parses or reports a position inside (or just past) it.
        if let Err(e) = Selector::parse(&text[..cut]) {
            let pos = e.position().expect("syntax errors carry a position");
            assert!(
                pos <= cut,
                "{:?}: position {pos} beyond {cut}",
                &text[..cut]
            );
        }
    }
}
