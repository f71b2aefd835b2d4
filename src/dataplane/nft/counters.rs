//! Reads the `counter` statements of one of tortie's tables (`nft -j -t list table`: terse,
//! so set elements are not listed and a read stays cheap at any cluster size). Sans-IO
//! parser plus one call through the shared runner.

use serde_json::Value;

use super::run::{NftError, Runner};
use crate::desired::nft::Family;

/// One rule's counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleCounter {
    pub chain: String,
    /// The kernel's handle: a rewritten rule gets a new one, so a counter that starts again
    /// from zero is recognised.
    pub handle: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// The counters of `family name`; empty when the table does not exist.
pub fn read(runner: &Runner, family: Family, name: &str) -> Result<Vec<RuleCounter>, NftError> {
    const ACTION: &str = "list the table's counters";
    let out = match runner.run(
        ACTION,
        &["-j", "-t", "list", "table", family.as_str(), name],
        None,
    ) {
        Ok(out) => out,
        Err(e) if e.is_missing() => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let listing: Value = serde_json::from_slice(&out).map_err(|source| NftError::Parse {
        action: ACTION,
        source,
    })?;
    Ok(parse(&listing))
}

/// Every rule with a counter statement, in listing order.
pub fn parse(listing: &Value) -> Vec<RuleCounter> {
    let objects = listing
        .get("nftables")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut out = Vec::new();
    for rule in objects.iter().filter_map(|o| o.get("rule")) {
        let Some(exprs) = rule.get("expr").and_then(Value::as_array) else {
            continue;
        };
        let Some(counter) = exprs.iter().find_map(|e| e.get("counter")) else {
            continue;
        };
        let num = |k: &str| counter.get(k).and_then(Value::as_u64).unwrap_or(0);
        out.push(RuleCounter {
            chain: rule
                .get("chain")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            handle: rule.get("handle").and_then(Value::as_u64).unwrap_or(0),
            packets: num("packets"),
            bytes: num("bytes"),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rules_with_counters_are_read_and_others_skipped() {
        let listing = json!({"nftables": [
            {"metainfo": {"json_schema_version": 1}},
            {"table": {"family": "inet", "name": "tortie-policy", "handle": 1}},
            {"set": {"name": "s4-ab", "type": "ipv4_addr"}},
            {"rule": {"family": "inet", "table": "tortie-policy", "chain": "pi-np.prod.web",
                      "handle": 12, "comment": "tortie:x", "expr": [
                {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": 6}},
                {"counter": {"packets": 3, "bytes": 180}}, {"drop": null}]}},
            {"rule": {"chain": "pi-np.prod.web", "handle": 13, "expr": [{"accept": null}]}},
            {"rule": {"chain": "sti-calia-snp.prod.x", "handle": 20, "expr": [
                {"counter": {"packets": 0, "bytes": 0}}]}},
        ]});
        assert_eq!(
            parse(&listing),
            vec![
                RuleCounter {
                    chain: "pi-np.prod.web".into(),
                    handle: 12,
                    packets: 3,
                    bytes: 180
                },
                RuleCounter {
                    chain: "sti-calia-snp.prod.x".into(),
                    handle: 20,
                    packets: 0,
                    bytes: 0
                },
            ]
        );
        assert!(parse(&json!({"nope": 1})).is_empty());
    }
}
