//! Calico's selector language (IPPool.nodeSelector now, policy selectors later), sans-IO:
//! parse once into a `Selector`, evaluate many times against any `Labels`, render the
//! canonical text Calico renders (equality, dedup, logs) and Felix's selector ID.
//!
//! Grammar and semantics follow libcalico-go's selector parser: `all()`, `global()`,
//! `has(k)`, `k == "v"`, `k != "v"`, `k in {..}`, `k not in {..}`, `contains`,
//! `starts with`, `ends with`, `!`, `&&` (binds tighter), `||`, parentheses. Whitespace is
//! space or tab. An empty selector is `all()`. `!=` and `not in` match absent labels.

mod ast;
mod error;
mod labels;
mod lexer;
mod parser;

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use sha2::{Digest, Sha224};

pub use ast::{CompareOp, Expr};
pub use error::SelectorError;
pub use labels::Labels;
pub use parser::MAX_NESTING;

/// Calico's limit on `IPPool.spec.nodeSelector`, in bytes.
pub const MAX_NODE_SELECTOR_LEN: usize = 1024;

/// A parsed selector. Equality, ordering and hashing follow the canonical text, so two
/// spellings of the same selector (`a=='b'`, `a == "b"`) are equal.
#[derive(Debug, Clone)]
pub struct Selector {
    canonical: String,
    expr: Expr,
}

impl Selector {
    pub fn parse(input: &str) -> Result<Selector, SelectorError> {
        Ok(Selector::from_expr(parser::parse(input)?))
    }

    /// The selector that matches everything (`all()`), also what an empty selector means.
    pub fn all() -> Selector {
        Selector::from_expr(Expr::All)
    }

    fn from_expr(expr: Expr) -> Selector {
        Selector {
            canonical: expr.to_string(),
            expr,
        }
    }

    /// True when the selector is exactly `all()` (or empty): callers may skip evaluation.
    /// `global()` is not reported here, since its meaning depends on where it is used.
    pub fn is_all(&self) -> bool {
        self.expr == Expr::All
    }

    pub fn matches<L: Labels + ?Sized>(&self, labels: &L) -> bool {
        self.expr.matches(labels)
    }

    pub fn expr(&self) -> &Expr {
        &self.expr
    }

    /// Canonical text, identical to Calico's `Selector.String()`.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }

    /// Felix's selector ID: `"s:" + base64url(SHA-224("s:" + canonical))`, unpadded.
    pub fn unique_id(&self) -> String {
        let digest = Sha224::digest(format!("s:{}", self.canonical).as_bytes());
        format!(
            "s:{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest)
        )
    }

    pub fn uses_global(&self) -> bool {
        self.expr.uses_global()
    }

    /// The distinct label keys the selector reads, sorted: what a label index must watch.
    pub fn label_keys(&self) -> std::collections::BTreeSet<&str> {
        let mut keys = std::collections::BTreeSet::new();
        self.expr.for_each_key(&mut |k| {
            keys.insert(k);
        });
        keys
    }
}

/// Parses `IPPool.spec.nodeSelector` with Calico's extra rules: at most
/// `MAX_NODE_SELECTOR_LEN` bytes, no `global()`. Empty means `all()` (the field's default).
pub fn parse_node_selector(input: &str) -> Result<Selector, SelectorError> {
    const FIELD: &str = "IPPool nodeSelector";
    if input.len() > MAX_NODE_SELECTOR_LEN {
        return Err(SelectorError::TooLong {
            selector: error::echo(input),
            len: input.len(),
            max: MAX_NODE_SELECTOR_LEN,
            field: FIELD,
        });
    }
    let sel = Selector::parse(input)?;
    if sel.uses_global() {
        return Err(SelectorError::GlobalNotAllowed {
            selector: error::echo(input),
            field: FIELD,
        });
    }
    Ok(sel)
}

// The canonical text determines the tree (render-then-parse is an identity), so comparing
// text is comparing selectors, and one string compare is cheaper than a tree walk.
impl PartialEq for Selector {
    fn eq(&self, other: &Self) -> bool {
        self.canonical == other.canonical
    }
}

impl Eq for Selector {}

impl PartialOrd for Selector {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Selector {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.canonical.cmp(&other.canonical)
    }
}

impl std::hash::Hash for Selector {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.canonical.hash(state);
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

impl Default for Selector {
    fn default() -> Self {
        Selector::all()
    }
}

/// Serialized as its canonical text; deserializing parses (and so validates) the text.
impl serde::Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.canonical)
    }
}

impl<'de> serde::Deserialize<'de> for Selector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Selector::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests;
