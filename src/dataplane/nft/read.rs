//! Reads one of tortie's own tables back (`nft -j list table`) into the fingerprint the
//! desired model has, for drift checks. Rules are recognised by the id tortie writes as
//! their comment; anything tortie never writes is reported as foreign (and so as drift).

use std::collections::BTreeSet;

use serde_json::Value;

use super::run::{NftError, Runner};
use crate::desired::nft::{Element, Family, Fingerprint, Hook, Map, RULE_COMMENT_PREFIX, Set};

/// The table as the kernel holds it; None when it does not exist.
pub fn read(runner: &Runner, family: Family, name: &str) -> Result<Option<Fingerprint>, NftError> {
    const ACTION: &str = "list the table";
    let out = match runner.run(
        ACTION,
        &["-j", "list", "table", family.as_str(), name],
        None,
    ) {
        Ok(out) => out,
        Err(e) if e.is_missing() => return Ok(None),
        Err(e) => return Err(e),
    };
    let listing: Value = serde_json::from_slice(&out).map_err(|source| NftError::Parse {
        action: ACTION,
        source,
    })?;
    Ok(Some(parse(&listing)))
}

/// A listing's objects as a fingerprint.
pub fn parse(listing: &Value) -> Fingerprint {
    let mut fp = Fingerprint::default();
    let objects = listing
        .get("nftables")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for object in objects {
        if let Some(set) = object.get("set") {
            let name = text(set, "name");
            fp.sets.insert(name, parse_set(set));
        } else if let Some(map) = object.get("map").filter(|m| text(m, "map") == "verdict") {
            fp.maps.insert(text(map, "name"), parse_map(map));
        } else if let Some(counter) = object.get("counter") {
            fp.counters.insert(text(counter, "name"));
        } else if let Some(chain) = object.get("chain") {
            let hook = chain.get("hook").and_then(Value::as_str).map(|h| Hook {
                kind: text(chain, "type"),
                hook: h.to_string(),
                priority: chain
                    .get("prio")
                    .and_then(Value::as_i64)
                    .and_then(|p| i32::try_from(p).ok())
                    .unwrap_or_default(),
                policy: text(chain, "policy"),
            });
            let entry = fp.chains.entry(text(chain, "name")).or_default();
            entry.0 = hook;
        } else if let Some(rule) = object.get("rule") {
            let chain = text(rule, "chain");
            match rule
                .get("comment")
                .and_then(Value::as_str)
                .and_then(|c| c.strip_prefix(RULE_COMMENT_PREFIX))
            {
                Some(id) => fp.chains.entry(chain).or_default().1.push(id.to_string()),
                None => fp.foreign.push(format!("rule in chain {chain}: {rule}")),
            }
        } else if object.get("table").is_none() && object.get("metainfo").is_none() {
            fp.foreign.push(object.to_string());
        }
    }
    fp
}

fn parse_set(set: &Value) -> Set {
    let kind = match set.get("type") {
        Some(Value::String(s)) => s.clone(),
        // A concatenation lists as an array of types.
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" . "),
        _ => String::new(),
    };
    let flags = match set.get("flags") {
        Some(Value::Array(f)) => f
            .iter()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect(),
        Some(Value::String(f)) => vec![f.clone()],
        _ => Vec::new(),
    };
    let elements: BTreeSet<Element> = match set.get("elem") {
        Some(Value::Array(elems)) => elems.iter().map(element).collect(),
        _ => BTreeSet::new(),
    };
    Set {
        kind,
        flags,
        elements,
    }
}

/// A verdict map: `[key, {"goto": {"target": "c"}}]` pairs back to the model's text.
fn parse_map(map: &Value) -> Map {
    let mut out = Map::verdicts(&text(map, "type"));
    let Some(Value::Array(elems)) = map.get("elem") else {
        return out;
    };
    for e in elems {
        if let Value::Array(pair) = e
            && let [k, v] = pair.as_slice()
        {
            out.elements.insert(scalar(k), verdict(v));
        }
    }
    out
}

/// `{"goto": {"target": "c"}}` → `goto c`; `{"drop": null}` → `drop`.
fn verdict(v: &Value) -> String {
    let Some((kind, arg)) = v.as_object().and_then(|o| o.iter().next()) else {
        return scalar(v);
    };
    match arg.get("target").and_then(Value::as_str) {
        Some(target) => format!("{kind} {target}"),
        None => kind.clone(),
    }
}

fn element(v: &Value) -> Element {
    match v {
        Value::String(s) => match s.parse::<std::net::IpAddr>() {
            Ok(ip) => Element::net(ip.into()),
            Err(_) => Element::Text(s.clone()),
        },
        Value::Number(n) => match n.as_u64().and_then(|n| u16::try_from(n).ok()) {
            Some(p) => Element::Port(p),
            None => Element::Text(n.to_string()),
        },
        Value::Object(o) => {
            if let Some(p) = o.get("prefix") {
                let addr = p.get("addr").and_then(Value::as_str).unwrap_or_default();
                let len = p.get("len").and_then(Value::as_u64).unwrap_or_default();
                if let Ok(net) = format!("{addr}/{len}").parse::<ipnet::IpNet>() {
                    return Element::net(net);
                }
            }
            // Port ranges and concatenations (policy's port and named-port sets) in the
            // text form the desired model writes: `9000-9100`, `10.0.0.1 . tcp . 8080`.
            if let Some(Value::Array(r)) = o.get("range")
                && let [a, b] = r.as_slice()
            {
                return Element::Text(format!("{}-{}", scalar(a), scalar(b)));
            }
            if let Some(Value::Array(parts)) = o.get("concat") {
                let parts: Vec<String> = parts.iter().map(scalar).collect();
                return Element::Text(parts.join(" . "));
            }
            // `{"elem": {"val": …, "timeout": …}}`: the value is what identifies it.
            if let Some(val) = o.get("elem").and_then(|e| e.get("val")) {
                return element(val);
            }
            Element::Text(v.to_string())
        }
        other => Element::Text(other.to_string()),
    }
}

/// A JSON scalar as nft writes it in text (strings unquoted).
fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn text(obj: &Value, key: &str) -> String {
    obj.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::nft::{Chain, Rule, Table};
    use serde_json::json;

    #[test]
    fn a_listing_of_the_desired_table_has_its_fingerprint() {
        let rule = Rule::new("ip saddr @pools counter masquerade");
        let listing = json!({"nftables": [
            {"metainfo": {"json_schema_version": 1}},
            {"table": {"family": "inet", "name": "t", "handle": 3}},
            {"set": {"family": "inet", "table": "t", "name": "pools", "type": "ipv4_addr",
                     "handle": 1, "flags": ["interval"],
                     "elem": ["10.9.9.9", {"prefix": {"addr": "10.244.0.0", "len": 16}}]}},
            {"chain": {"family": "inet", "table": "t", "name": "post", "handle": 2,
                       "type": "nat", "hook": "postrouting", "prio": 110, "policy": "accept"}},
            {"rule": {"family": "inet", "table": "t", "chain": "post", "handle": 4,
                      "comment": format!("tortie:{}", rule.id()), "expr": []}},
        ]});
        let mut want = Table::new(Family::Inet, "t");
        want.sets.insert(
            "pools".into(),
            Set::prefixes(
                "ipv4_addr",
                [
                    Element::net("10.244.0.0/16".parse().unwrap()),
                    Element::net("10.9.9.9/32".parse().unwrap()),
                ],
            ),
        );
        want.chains.insert(
            "post".into(),
            Chain {
                hook: Some(Hook {
                    kind: "nat".into(),
                    hook: "postrouting".into(),
                    priority: 110,
                    policy: "accept".into(),
                }),
                rules: vec![rule],
            },
        );
        assert_eq!(parse(&listing), want.fingerprint());
    }

    #[test]
    fn port_ranges_and_concatenations_read_as_the_model_writes_them() {
        let set = json!({"type": ["ipv4_addr", "inet_proto", "inet_service"],
            "elem": [{"concat": ["10.0.0.1", "tcp", 8080]}, {"range": [9000, 9100]}, 80]});
        let got = parse_set(&set);
        assert_eq!(got.kind, "ipv4_addr . inet_proto . inet_service");
        let want: BTreeSet<Element> = [
            Element::Text("10.0.0.1 . tcp . 8080".into()),
            Element::Text("9000-9100".into()),
            Element::Port(80),
        ]
        .into();
        assert_eq!(got.elements, want);
    }

    #[test]
    fn rules_without_tortie_comment_and_data_maps_are_foreign() {
        let listing = json!({"nftables": [
            {"rule": {"chain": "post", "expr": [{"accept": null}]}},
            {"map": {"name": "m", "type": "ipv4_addr", "map": "mark"}},
        ]});
        assert_eq!(parse(&listing).foreign.len(), 2);
    }

    #[test]
    fn verdict_maps_and_counters_read_as_the_model_writes_them() {
        // As nft 1.0.6 lists them.
        let listing = json!({"nftables": [
            {"counter": {"family": "inet", "name": "fw-cali1/end", "table": "t", "handle": 3,
                         "packets": 7, "bytes": 420}},
            {"map": {"family": "inet", "name": "wl", "table": "t", "type": "ifname",
                     "handle": 5, "map": "verdict",
                     "elem": [["cali1", {"goto": {"target": "fw-cali1"}}], ["cali2", {"drop": null}]]}},
        ]});
        let fp = parse(&listing);
        let mut want = Map::verdicts("ifname");
        want.elements.insert("cali1".into(), "goto fw-cali1".into());
        want.elements.insert("cali2".into(), "drop".into());
        assert_eq!(fp.maps["wl"], want);
        assert!(fp.counters.contains("fw-cali1/end"));
        assert!(fp.foreign.is_empty(), "{:?}", fp.foreign);
    }
}
