//! Calico's selector rewriting, done as libcalico-go's update processors do it (text in,
//! text out, then parsed once): namespace and service-account selectors get the `pcns.` /
//! `pcsa.` profile prefixes, `all()` / `global()` become label tests, and namespaced
//! policies are scoped to their namespace.

use crate::selector::{Expr, Selector, SelectorError};

use super::endpoint::{
    LABEL_NAMESPACE, LABEL_SERVICE_ACCOUNT, NAMESPACE_PREFIX, SERVICE_ACCOUNT_PREFIX,
};

/// Parses `s` and prefixes every label key with `prefix` (Calico's `PrefixVisitor`),
/// returning the canonical text.
pub fn attach_prefix(s: &str, prefix: &str) -> Result<String, SelectorError> {
    let sel = Selector::parse(s)?;
    Ok(prefix_keys(sel.expr(), prefix).to_string())
}

fn prefix_keys(e: &Expr, prefix: &str) -> Expr {
    let p = |k: &String| format!("{prefix}{k}");
    match e {
        Expr::All | Expr::Global => e.clone(),
        Expr::Has(k) => Expr::Has(p(k)),
        Expr::Compare { key, op, value } => Expr::Compare {
            key: p(key),
            op: *op,
            value: value.clone(),
        },
        Expr::InSet {
            key,
            values,
            negated,
        } => Expr::InSet {
            key: p(key),
            values: values.clone(),
            negated: *negated,
        },
        Expr::Not(inner) => Expr::Not(Box::new(prefix_keys(inner, prefix))),
        Expr::And(ops) => Expr::And(ops.iter().map(|o| prefix_keys(o, prefix)).collect()),
        Expr::Or(ops) => Expr::Or(ops.iter().map(|o| prefix_keys(o, prefix)).collect()),
    }
}

/// `prefixAndAppendSelector`: `current && prefixed(new)`.
pub fn prefix_and_append(current: &str, new: &str, prefix: &str) -> Result<String, SelectorError> {
    if new.is_empty() {
        return Ok(current.to_string());
    }
    let prefixed = attach_prefix(new, prefix)?;
    Ok(if current.is_empty() {
        prefixed
    } else {
        format!("({current}) && {prefixed}")
    })
}

/// Calico's `strings.Replace(sel, "all()", "has(<key>)")`, on the parsed tree.
pub fn replace_all(s: &str, key: &str) -> Result<String, SelectorError> {
    let sel = Selector::parse(s)?;
    Ok(map_tree(sel.expr(), &|e| match e {
        Expr::All => Some(Expr::Has(key.to_string())),
        _ => None,
    })
    .to_string())
}

fn map_tree(e: &Expr, f: &dyn Fn(&Expr) -> Option<Expr>) -> Expr {
    if let Some(r) = f(e) {
        return r;
    }
    match e {
        Expr::Not(inner) => Expr::Not(Box::new(map_tree(inner, f))),
        Expr::And(ops) => Expr::And(ops.iter().map(|o| map_tree(o, f)).collect()),
        Expr::Or(ops) => Expr::Or(ops.iter().map(|o| map_tree(o, f)).collect()),
        other => other.clone(),
    }
}

/// A rule's `namespaceSelector` as Felix sees it: `pcns.`-prefixed, `all()` → any namespaced
/// endpoint, `global()` → anything not namespaced (global network sets, host endpoints).
pub fn rule_namespace_selector(s: &str) -> Result<String, SelectorError> {
    let sel = Selector::parse(s)?;
    let prefixed = prefix_keys(sel.expr(), NAMESPACE_PREFIX);
    Ok(map_tree(&prefixed, &|e| match e {
        Expr::All => Some(Expr::Has(LABEL_NAMESPACE.into())),
        Expr::Global => Some(Expr::Not(Box::new(Expr::Has(LABEL_NAMESPACE.into())))),
        _ => None,
    })
    .to_string())
}

/// `parseServiceAccounts`: the selector (prefixed `pcsa.`) ANDed with the names.
pub fn service_accounts(selector: Option<&str>, names: &[String]) -> Result<String, SelectorError> {
    let updated = match selector {
        Some(s) if !s.is_empty() => attach_prefix(s, SERVICE_ACCOUNT_PREFIX)?,
        _ => String::new(),
    };
    if names.is_empty() {
        return Ok(updated);
    }
    let set = format!("{LABEL_SERVICE_ACCOUNT} in {{ '{}' }}", names.join("', '"));
    let set = Selector::parse(&set)?.canonical().to_string();
    Ok(if updated.is_empty() {
        set
    } else {
        format!("({updated}) && ({set})")
    })
}

/// `getEndpointSelector`: a rule side's selector with namespace scoping. In a namespaced
/// policy (`ns` non-empty) the namespace test is added when the side has a selector, a
/// notSelector or a namespaceSelector — not when it has only nets (Calico's exception).
pub fn entity_selector(
    namespace_selector: Option<&str>,
    selector: Option<&str>,
    sa_selector: &str,
    has_not_selector: bool,
    ns: &str,
) -> Result<String, SelectorError> {
    let ns_sel_given = namespace_selector.is_some_and(|s| !s.is_empty());
    let ns_sel = match namespace_selector {
        Some(s) if !s.is_empty() => rule_namespace_selector(s)?,
        _ if !ns.is_empty() => format!("{LABEL_NAMESPACE} == '{ns}'"),
        _ => String::new(),
    };
    let mut parts = Vec::new();
    if !sa_selector.is_empty() {
        parts.push(sa_selector.to_string());
    }
    if let Some(s) = selector.filter(|s| !s.is_empty()) {
        // Validate here so the error names this field rather than the combined text.
        Selector::parse(s)?;
        parts.push(s.to_string());
    }
    let mut sel = match parts.len() {
        0 => String::new(),
        1 => parts.remove(0),
        _ => format!("({})", parts.join(") && (")),
    };
    if !ns_sel.is_empty() && (!sel.is_empty() || has_not_selector || ns_sel_given) {
        sel = if sel.is_empty() {
            ns_sel
        } else {
            format!("({ns_sel}) && ({sel})")
        };
    }
    Ok(sel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_selector_gets_profile_prefix_and_all_global_become_label_tests() {
        assert_eq!(
            rule_namespace_selector("team == 'blue'").unwrap(),
            "pcns.team == \"blue\""
        );
        assert_eq!(
            rule_namespace_selector("all()").unwrap(),
            "has(projectcalico.org/namespace)"
        );
        assert_eq!(
            rule_namespace_selector("global()").unwrap(),
            "!has(projectcalico.org/namespace)"
        );
    }

    #[test]
    fn namespaced_rules_are_scoped_except_nets_only_sides() {
        let s = entity_selector(None, Some("app == 'db'"), "", false, "prod").unwrap();
        assert_eq!(
            s,
            "(projectcalico.org/namespace == 'prod') && (app == 'db')"
        );
        assert_eq!(entity_selector(None, None, "", false, "prod").unwrap(), "");
        assert_eq!(
            entity_selector(None, None, "", true, "prod").unwrap(),
            "projectcalico.org/namespace == 'prod'"
        );
        let s = entity_selector(Some("all()"), None, "", false, "prod").unwrap();
        assert_eq!(s, "has(projectcalico.org/namespace)");
        // Global policies are not scoped.
        assert_eq!(
            entity_selector(None, Some("a == 'b'"), "", false, "").unwrap(),
            "a == 'b'"
        );
    }

    #[test]
    fn service_accounts_become_profile_label_tests() {
        let s = service_accounts(Some("role == 'x'"), &["a".into(), "b".into()]).unwrap();
        assert_eq!(
            s,
            "(pcsa.role == \"x\") && (projectcalico.org/serviceaccount in {\"a\", \"b\"})"
        );
    }
}
