//! The parsed form of a selector: evaluation against labels with Calico's semantics and the
//! canonical rendering. The rendering is byte-for-byte Calico's (`a == "b"`, `&&`/`||` groups
//! wrapped in parentheses, sets sorted and deduplicated) so selector IDs match Felix's.

use std::collections::BTreeSet;
use std::fmt;

use super::labels::Labels;

/// One node of a parsed selector. And/Or nodes hold two or more operands: the parser
/// unwraps single-operand groups and redundant parentheses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expr {
    /// `all()`: matches everything.
    All,
    /// `global()`: matches everything when evaluated; callers decide where it is allowed
    /// (Calico: only alone, in an entity rule's namespaceSelector).
    Global,
    /// `has(key)`
    Has(String),
    /// `key <op> "value"`
    Compare {
        key: String,
        op: CompareOp,
        value: String,
    },
    /// `key in {...}`, or `key not in {...}` when `negated`. The set may be empty.
    InSet {
        key: String,
        values: BTreeSet<String>,
        negated: bool,
    },
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompareOp {
    Eq,
    Ne,
    Contains,
    StartsWith,
    EndsWith,
}

impl CompareOp {
    fn as_str(self) -> &'static str {
        match self {
            CompareOp::Eq => "==",
            CompareOp::Ne => "!=",
            CompareOp::Contains => "contains",
            CompareOp::StartsWith => "starts with",
            CompareOp::EndsWith => "ends with",
        }
    }
}

impl Expr {
    /// Calico's semantics for absent labels: `!=` and `not in` match when the label is
    /// missing; `==`, `in`, `contains`, `starts with`, `ends with` do not.
    pub fn matches<L: Labels + ?Sized>(&self, labels: &L) -> bool {
        match self {
            Expr::All | Expr::Global => true,
            Expr::Has(key) => labels.get(key).is_some(),
            Expr::Compare { key, op, value } => match (labels.get(key), op) {
                (None, CompareOp::Ne) => true,
                (None, _) => false,
                (Some(v), CompareOp::Eq) => v == value,
                (Some(v), CompareOp::Ne) => v != value,
                (Some(v), CompareOp::Contains) => v.contains(value.as_str()),
                (Some(v), CompareOp::StartsWith) => v.starts_with(value.as_str()),
                (Some(v), CompareOp::EndsWith) => v.ends_with(value.as_str()),
            },
            Expr::InSet {
                key,
                values,
                negated,
            } => match labels.get(key) {
                Some(v) => values.contains(v) != *negated,
                None => *negated,
            },
            Expr::Not(inner) => !inner.matches(labels),
            Expr::And(ops) => ops.iter().all(|e| e.matches(labels)),
            Expr::Or(ops) => ops.iter().any(|e| e.matches(labels)),
        }
    }

    /// Calls `f` with every label key the expression reads, in source order (repeats kept).
    pub fn for_each_key<'a>(&'a self, f: &mut impl FnMut(&'a str)) {
        match self {
            Expr::All | Expr::Global => {}
            Expr::Has(key) | Expr::Compare { key, .. } | Expr::InSet { key, .. } => f(key),
            Expr::Not(inner) => inner.for_each_key(f),
            Expr::And(ops) | Expr::Or(ops) => ops.iter().for_each(|e| e.for_each_key(f)),
        }
    }

    /// True if `global()` appears anywhere in the expression.
    pub fn uses_global(&self) -> bool {
        match self {
            Expr::Global => true,
            Expr::Not(inner) => inner.uses_global(),
            Expr::And(ops) | Expr::Or(ops) => ops.iter().any(Expr::uses_global),
            _ => false,
        }
    }
}

/// Double quotes unless the value holds one; the parser guarantees it cannot hold both.
fn write_quoted(f: &mut fmt::Formatter<'_>, value: &str) -> fmt::Result {
    let q = if value.contains('"') { '\'' } else { '"' };
    write!(f, "{q}{value}{q}")
}

fn write_joined(f: &mut fmt::Formatter<'_>, ops: &[Expr], sep: &str) -> fmt::Result {
    f.write_str("(")?;
    for (i, e) in ops.iter().enumerate() {
        if i > 0 {
            f.write_str(sep)?;
        }
        write!(f, "{e}")?;
    }
    f.write_str(")")
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::All => f.write_str("all()"),
            Expr::Global => f.write_str("global()"),
            Expr::Has(key) => write!(f, "has({key})"),
            Expr::Compare { key, op, value } => {
                write!(f, "{key} {} ", op.as_str())?;
                write_quoted(f, value)
            }
            Expr::InSet {
                key,
                values,
                negated,
            } => {
                let op = if *negated { "not in" } else { "in" };
                write!(f, "{key} {op} {{")?;
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write_quoted(f, v)?;
                }
                f.write_str("}")
            }
            Expr::Not(inner) => write!(f, "!{inner}"),
            Expr::And(ops) => write_joined(f, ops, " && "),
            Expr::Or(ops) => write_joined(f, ops, " || "),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn cmp(key: &str, op: CompareOp, value: &str) -> Expr {
        Expr::Compare {
            key: key.into(),
            op,
            value: value.into(),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn value_with_double_quote_renders_in_single_quotes() {
        assert_eq!(cmp("a", CompareOp::Eq, "x\"y").to_string(), r#"a == 'x"y'"#);
        assert_eq!(
            cmp("a", CompareOp::Ne, "it's").to_string(),
            r#"a != "it's""#
        );
    }

    #[test]
    fn groups_render_in_parentheses_and_not_renders_as_prefix() {
        let e = Expr::Not(Box::new(Expr::Or(vec![
            Expr::Has("b".into()),
            Expr::Not(Box::new(Expr::Has("a".into()))),
        ])));
        assert_eq!(e.to_string(), "!(has(b) || !has(a))");
    }

    #[test]
    fn empty_set_never_matches_and_its_negation_always_does() {
        let empty = |negated| Expr::InSet {
            key: "a".into(),
            values: BTreeSet::new(),
            negated,
        };
        let l = labels(&[("a", "x")]);
        assert!(!empty(false).matches(&l));
        assert!(empty(true).matches(&l));
        assert!(empty(true).matches(&labels(&[])));
    }

    #[test]
    fn for_each_key_visits_every_key_in_order() {
        let e = Expr::And(vec![
            Expr::Has("x".into()),
            Expr::Not(Box::new(cmp("y", CompareOp::Eq, "1"))),
            Expr::All,
        ]);
        let mut keys = Vec::new();
        e.for_each_key(&mut |k| keys.push(k));
        assert_eq!(keys, vec!["x", "y"]);
    }
}
