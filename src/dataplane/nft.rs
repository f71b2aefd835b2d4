//! The NAT table driver: renders `table inet tortie-nat` (NAT outgoing, VXLAN NOTRACK) from
//! the calculation's NatModel, reads it back to find drift and replaces it atomically when it
//! differs. It runs the `nft` binary in the caller's network namespace and touches no other table.
//!
//! The table is a dozen objects, so every change is a full replace in one transaction
//! (`add table; delete table; add table …`): that costs one `nft` process, as a per-element
//! update would, and needs no rule handles. Existing NAT mappings live in conntrack and
//! survive a replace; the kernel registers the new hooks before it drops the old ones.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{Value, json};

use crate::calc::nat::{NatModel, PortRange};

/// One table for both families (`inet`), named apart from any policy table so that each
/// driver can replace its own table wholesale.
pub const TABLE: &str = "tortie-nat";
pub const FAMILY: &str = "inet";
pub const NAT_CHAIN: &str = "postrouting";
pub const RAW_PREROUTING_CHAIN: &str = "raw-prerouting";
pub const RAW_OUTPUT_CHAIN: &str = "raw-output";
/// Calico's sets are `masq-ipam-pools` and `all-ipam-pools`; nft set names keep the words.
pub const MASQ_POOLS_V4: &str = "masq_ipam_pools_v4";
pub const ALL_POOLS_V4: &str = "all_ipam_pools_v4";
pub const MASQ_POOLS_V6: &str = "masq_ipam_pools_v6";
pub const ALL_POOLS_V6: &str = "all_ipam_pools_v6";

/// srcnat + 10, as Calico's nftables mode: kube-proxy's masquerade (priority 100) decides
/// first, and the kernel runs no further NAT chain once a mapping exists.
const NAT_PRIORITY: i64 = 110;
/// The raw priority: before conntrack (-200) looks at the packet.
const RAW_PRIORITY: i64 = -300;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("run {program} to {action}: {source}")]
    Spawn {
        program: String,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("{program} failed to {action} ({status}): {stderr}")]
    Failed {
        program: String,
        action: &'static str,
        status: ExitStatus,
        stderr: String,
    },

    #[error("{action}: nft printed JSON this driver cannot read: {source}")]
    Parse {
        action: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// What a reconcile did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The kernel already held the desired table; nothing was written.
    InSync,
    /// The table did not exist and this driver had not written it before.
    Created,
    /// The desired contents changed (pools or VXLAN settings) and the table was replaced.
    Updated,
    /// The desired contents had not changed but the kernel's had (someone edited or deleted
    /// the table): it was replaced. Counts as a drift repair.
    Repaired,
}

impl Outcome {
    pub fn wrote(self) -> bool {
        self != Outcome::InSync
    }
}

/// The table's contents without what the kernel chooses on its own (handles, counter values,
/// element order), so desired and listed contents compare equal when they mean the same.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableState {
    pub sets: BTreeMap<String, Value>,
    pub chains: BTreeMap<String, Value>,
    /// Rule expressions per chain, in evaluation order.
    pub rules: BTreeMap<String, Vec<Value>>,
    /// Objects this driver never creates (maps, flowtables, named counters, …): any of them
    /// in the table is drift.
    pub other: Vec<Value>,
}

/// Drives tortie's NAT table through the `nft` binary. The child inherits the calling
/// thread's network namespace: the daemon runs in the node's namespace already, and a test
/// calls it from a thread that joined one.
#[derive(Debug, Clone)]
pub struct NatTable {
    program: PathBuf,
    last_applied: Option<NatModel>,
}

impl Default for NatTable {
    fn default() -> Self {
        NatTable::new()
    }
}

impl NatTable {
    /// Uses `nft` from PATH.
    pub fn new() -> NatTable {
        NatTable::with_program("nft")
    }

    pub fn with_program(program: impl Into<PathBuf>) -> NatTable {
        NatTable {
            program: program.into(),
            last_applied: None,
        }
    }

    /// Makes the kernel's table match `model`, replacing it atomically when it differs.
    /// Blocking (it waits for `nft`): call it from `spawn_blocking` inside tokio.
    pub fn reconcile(&mut self, model: &NatModel) -> Result<Outcome, NftError> {
        let started = Instant::now();
        let objects = render(model);
        let want = state_of(objects.iter());
        let have = self.read()?;
        let outcome = if have.as_ref() == Some(&want) {
            Outcome::InSync
        } else if self.last_applied.as_ref() == Some(model) {
            Outcome::Repaired
        } else if have.is_none() {
            Outcome::Created
        } else {
            Outcome::Updated
        };
        if outcome.wrote() {
            self.run(
                "replace the table",
                &["-j", "-f", "-"],
                Some(&replace_batch(objects)),
            )?;
        }
        self.last_applied = Some(model.clone());
        let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        match outcome {
            Outcome::InSync => tracing::debug!(table = TABLE, elapsed_ms, "nft table in sync"),
            Outcome::Repaired => tracing::warn!(
                table = TABLE,
                elapsed_ms,
                missing = have.is_none(),
                "nft table drifted from the desired state; replaced it"
            ),
            Outcome::Created | Outcome::Updated => tracing::info!(
                table = TABLE,
                ?outcome,
                masq_pools_v4 = model.masq_pools_v4.len(),
                all_pools_v4 = model.all_pools_v4.len(),
                masq_pools_v6 = model.masq_pools_v6.len(),
                all_pools_v6 = model.all_pools_v6.len(),
                notrack_udp_port = model.notrack_udp_port,
                elapsed_ms,
                "nft table written"
            ),
        }
        Ok(outcome)
    }

    /// Deletes the table if it exists; true if it did. Nothing else is touched.
    pub fn remove(&mut self) -> Result<bool, NftError> {
        let existed = self.read()?.is_some();
        // `add` first makes the delete succeed whether or not the table exists (nft 1.0.6
        // has no `destroy`), so a concurrent delete by hand cannot fail this call.
        let batch = json!({"nftables": [
            {"add": {"table": table_object()}},
            {"delete": {"table": table_object()}},
        ]});
        self.run("delete the table", &["-j", "-f", "-"], Some(&batch))?;
        self.last_applied = None;
        if existed {
            tracing::info!(table = TABLE, "nft table removed");
        }
        Ok(existed)
    }

    /// The table as the kernel holds it now; None when it does not exist.
    pub fn read(&self) -> Result<Option<TableState>, NftError> {
        const ACTION: &str = "list the table";
        let out = match self.run(ACTION, &["-j", "list", "table", FAMILY, TABLE], None) {
            Ok(out) => out,
            Err(NftError::Failed { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let listing: Value = serde_json::from_slice(&out).map_err(|source| NftError::Parse {
            action: ACTION,
            source,
        })?;
        let objects = listing
            .get("nftables")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        Ok(Some(state_of(objects.iter())))
    }

    fn run(
        &self,
        action: &'static str,
        args: &[&str],
        stdin: Option<&Value>,
    ) -> Result<Vec<u8>, NftError> {
        let program = self.program.display().to_string();
        let spawn_err = |source| NftError::Spawn {
            program: program.clone(),
            action,
            source,
        };
        let mut child = Command::new(&self.program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // Dropping the pipe at the end of this block is nft's end of input.
            pipe.write_all(input.to_string().as_bytes())
                .map_err(spawn_err)?;
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.status.success() {
            return Err(NftError::Failed {
                program,
                action,
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(out.stdout)
    }
}

/// The table's objects (`{"table": …}`, `{"set": …}`, `{"chain": …}`, `{"rule": …}`) in the
/// shape `nft -j list` prints them, so a listing can be compared with them directly.
pub fn render(model: &NatModel) -> Vec<Value> {
    let mut objects = vec![json!({"table": table_object()})];
    objects.push(set_object(
        MASQ_POOLS_V4,
        "ipv4_addr",
        model.masq_pools_v4.iter().map(v4_elem),
    ));
    objects.push(set_object(
        ALL_POOLS_V4,
        "ipv4_addr",
        model.all_pools_v4.iter().map(v4_elem),
    ));
    objects.push(set_object(
        MASQ_POOLS_V6,
        "ipv6_addr",
        model.masq_pools_v6.iter().map(v6_elem),
    ));
    objects.push(set_object(
        ALL_POOLS_V6,
        "ipv6_addr",
        model.all_pools_v6.iter().map(v6_elem),
    ));
    objects.push(chain_object(NAT_CHAIN, "nat", "postrouting", NAT_PRIORITY));
    objects.push(chain_object(
        RAW_PREROUTING_CHAIN,
        "filter",
        "prerouting",
        RAW_PRIORITY,
    ));
    objects.push(chain_object(
        RAW_OUTPUT_CHAIN,
        "filter",
        "output",
        RAW_PRIORITY,
    ));
    for (proto, masq, all) in [
        ("ip", MASQ_POOLS_V4, ALL_POOLS_V4),
        ("ip6", MASQ_POOLS_V6, ALL_POOLS_V6),
    ] {
        let from_pool_to_outside = [
            match_expr("==", payload(proto, "saddr"), json!(format!("@{masq}"))),
            match_expr("!=", payload(proto, "daddr"), json!(format!("@{all}"))),
        ];
        // UDP first, with a port range that leaves out the VXLAN port; everything else
        // (TCP, ICMP, …) keeps the kernel's full range. NAT statements end evaluation.
        let mut udp = from_pool_to_outside.to_vec();
        udp.push(match_expr(
            "==",
            json!({"meta": {"key": "l4proto"}}),
            json!("udp"),
        ));
        udp.push(counter());
        udp.push(json!({"masquerade": {"port": port_range(model.udp_masq_ports), "flags": "fully-random"}}));
        objects.push(rule_object(NAT_CHAIN, udp));
        let mut rest = from_pool_to_outside.to_vec();
        rest.push(counter());
        rest.push(json!({"masquerade": {"flags": "fully-random"}}));
        objects.push(rule_object(NAT_CHAIN, rest));
    }
    if let Some(port) = model.notrack_udp_port {
        // Destination port only: both directions of VXLAN traffic go to the VXLAN port, while a
        // source-port match would also exempt (and so stop masquerading) any pod flow that
        // happens to start from that port.
        for chain in [RAW_PREROUTING_CHAIN, RAW_OUTPUT_CHAIN] {
            objects.push(rule_object(
                chain,
                vec![
                    match_expr("==", payload("udp", "dport"), json!(port)),
                    counter(),
                    json!({"notrack": null}),
                ],
            ));
        }
    }
    objects
}

/// One transaction that swaps the whole table: `add` makes the `delete` valid when the table
/// is absent, and the kernel applies all of it or none of it.
fn replace_batch(objects: Vec<Value>) -> Value {
    let mut commands = vec![
        json!({"add": {"table": table_object()}}),
        json!({"delete": {"table": table_object()}}),
    ];
    commands.extend(objects.into_iter().map(|o| json!({"add": o})));
    json!({ "nftables": commands })
}

/// Normalises listed or rendered objects of this table into a comparable state.
pub fn state_of<'a>(objects: impl Iterator<Item = &'a Value>) -> TableState {
    let mut state = TableState::default();
    for object in objects {
        if let Some(set) = object.get("set").and_then(Value::as_object) {
            let mut set = set.clone();
            set.remove("handle");
            if let Some(Value::Array(elems)) = set.get_mut("elem") {
                elems.sort_by_key(|e| e.to_string());
            }
            let name = string_field(&set, "name");
            state.sets.insert(name, Value::Object(set));
        } else if let Some(chain) = object.get("chain").and_then(Value::as_object) {
            let mut chain = chain.clone();
            chain.remove("handle");
            let name = string_field(&chain, "name");
            state.chains.insert(name, Value::Object(chain));
        } else if let Some(rule) = object.get("rule").and_then(Value::as_object) {
            let exprs = match rule.get("expr") {
                Some(Value::Array(exprs)) => exprs.iter().map(without_counter_values).collect(),
                _ => Vec::new(),
            };
            let mut rest = rule.clone();
            for kernel_or_known in ["handle", "expr", "family", "table", "chain"] {
                rest.remove(kernel_or_known);
            }
            let mut rule_value = Value::Array(exprs);
            if !rest.is_empty() {
                // Anything else (a comment added by hand, an index) must count as a difference.
                rule_value = json!({"expr": rule_value, "other": rest});
            }
            state
                .rules
                .entry(string_field(rule, "chain"))
                .or_default()
                .push(rule_value);
        } else if object.get("table").is_none() && object.get("metainfo").is_none() {
            state.other.push(object.clone());
        }
    }
    state
}

fn string_field(obj: &serde_json::Map<String, Value>, key: &str) -> String {
    obj.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn without_counter_values(expr: &Value) -> Value {
    if expr.get("counter").is_some() {
        json!({"counter": {}})
    } else {
        expr.clone()
    }
}

fn table_object() -> Value {
    json!({"family": FAMILY, "name": TABLE})
}

fn set_object(name: &str, kind: &str, elems: impl Iterator<Item = Value>) -> Value {
    let elems: Vec<Value> = elems.collect();
    let mut set = json!({
        "family": FAMILY, "table": TABLE, "name": name, "type": kind, "flags": ["interval"],
    });
    // nft lists an empty set without `elem`.
    if !elems.is_empty() {
        set["elem"] = Value::Array(elems);
    }
    json!({ "set": set })
}

fn chain_object(name: &str, kind: &str, hook: &str, prio: i64) -> Value {
    json!({"chain": {
        "family": FAMILY, "table": TABLE, "name": name,
        "type": kind, "hook": hook, "prio": prio, "policy": "accept",
    }})
}

fn rule_object(chain: &str, expr: Vec<Value>) -> Value {
    json!({"rule": {"family": FAMILY, "table": TABLE, "chain": chain, "expr": expr}})
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

fn match_expr(op: &str, left: Value, right: Value) -> Value {
    json!({"match": {"op": op, "left": left, "right": right}})
}

fn counter() -> Value {
    json!({"counter": {"packets": 0, "bytes": 0}})
}

fn port_range(r: PortRange) -> Value {
    if r.first == r.last {
        json!(r.first)
    } else {
        json!({"range": [r.first, r.last]})
    }
}

/// A CIDR as an interval-set element; nft lists a full-length prefix as a bare address (and
/// rejects a string CIDR in JSON, see research/rust_crates.md §3).
fn v4_elem(net: &Ipv4Net) -> Value {
    if net.prefix_len() == 32 {
        json!(net.addr().to_string())
    } else {
        json!({"prefix": {"addr": net.addr().to_string(), "len": net.prefix_len()}})
    }
}

fn v6_elem(net: &Ipv6Net) -> Value {
    if net.prefix_len() == 128 {
        json!(net.addr().to_string())
    } else {
        json!({"prefix": {"addr": net.addr().to_string(), "len": net.prefix_len()}})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calc::nat::{NatPool, NatSettings, desired_nat};

    fn model(vxlan_enabled: bool) -> NatModel {
        let pool = |cidr: &str, nat_outgoing| NatPool {
            cidr: cidr.parse().unwrap(),
            nat_outgoing,
            disabled: false,
        };
        desired_nat(
            &[
                pool("10.244.0.0/16", true),
                pool("10.9.9.9/32", false),
                pool("fd00:1::/64", true),
            ],
            NatSettings {
                vxlan_port: 4789,
                vxlan_enabled,
            },
        )
    }

    fn rules(objects: &[Value], chain: &str) -> Vec<Value> {
        objects
            .iter()
            .filter_map(|o| o.get("rule"))
            .filter(|r| r["chain"] == chain)
            .map(|r| r["expr"].clone())
            .collect()
    }

    #[test]
    fn udp_masquerade_is_fully_random_and_skips_the_vxlan_port() {
        let objects = render(&model(true));
        let nat = rules(&objects, NAT_CHAIN);
        assert_eq!(nat.len(), 4, "udp + rest, for v4 and v6: {nat:#?}");
        let udp_v4 = nat[0].as_array().unwrap();
        assert_eq!(udp_v4[0]["match"]["right"], "@masq_ipam_pools_v4");
        assert_eq!(udp_v4[1]["match"]["op"], "!=");
        assert_eq!(udp_v4[1]["match"]["right"], "@all_ipam_pools_v4");
        assert_eq!(udp_v4[2]["match"]["right"], "udp");
        let masq = &udp_v4.last().unwrap()["masquerade"];
        assert_eq!(masq["port"]["range"], json!([4790, 65535]));
        assert_eq!(masq["flags"], "fully-random");
        let rest_v4 = nat[1].as_array().unwrap();
        assert_eq!(
            rest_v4.last().unwrap()["masquerade"],
            json!({"flags": "fully-random"})
        );
        assert_eq!(nat[2][0]["match"]["left"]["payload"]["protocol"], "ip6");
    }

    #[test]
    fn notrack_matches_the_vxlan_destination_port_in_both_raw_chains_only_when_enabled() {
        let on = render(&model(true));
        for chain in [RAW_PREROUTING_CHAIN, RAW_OUTPUT_CHAIN] {
            let r = rules(&on, chain);
            assert_eq!(r.len(), 1, "{chain}");
            assert_eq!(r[0][0]["match"]["left"], payload("udp", "dport"));
            assert_eq!(r[0][0]["match"]["right"], 4789);
            assert_eq!(r[0][2], json!({"notrack": null}));
        }
        let off = render(&model(false));
        assert!(rules(&off, RAW_PREROUTING_CHAIN).is_empty());
        assert!(rules(&off, RAW_OUTPUT_CHAIN).is_empty());
        // The chains stay, so the table's shape does not depend on the pools.
        assert_eq!(state_of(off.iter()).chains.len(), 3);
    }

    #[test]
    fn set_elements_use_prefix_objects_and_bare_host_addresses() {
        let objects = render(&model(false));
        let set = |name: &str| {
            objects
                .iter()
                .filter_map(|o| o.get("set"))
                .find(|s| s["name"] == name)
                .unwrap()
                .clone()
        };
        assert_eq!(
            set(ALL_POOLS_V4)["elem"],
            json!(["10.9.9.9", {"prefix": {"addr": "10.244.0.0", "len": 16}}])
        );
        assert_eq!(
            set(MASQ_POOLS_V6)["elem"],
            json!([{"prefix": {"addr": "fd00:1::", "len": 64}}])
        );
        assert!(set(ALL_POOLS_V6).get("elem").is_some());
    }

    #[test]
    fn a_listing_that_differs_only_in_handles_counters_and_order_is_in_sync() {
        let objects = render(&model(true));
        let want = state_of(objects.iter());
        let mut listed: Vec<Value> = objects.clone();
        for (i, o) in listed.iter_mut().enumerate() {
            for kind in ["set", "chain", "rule"] {
                if let Some(obj) = o.get_mut(kind) {
                    obj["handle"] = json!(i);
                }
            }
            if let Some(exprs) = o.pointer_mut("/rule/expr").and_then(Value::as_array_mut) {
                for e in exprs.iter_mut().filter(|e| e.get("counter").is_some()) {
                    *e = json!({"counter": {"packets": 12, "bytes": 3400}});
                }
            }
            if let Some(elems) = o.pointer_mut("/set/elem").and_then(Value::as_array_mut) {
                elems.reverse();
            }
        }
        // Objects of different kinds in another order (rules keep theirs: it matters).
        listed.sort_by_key(|o| o.get("rule").is_none());
        assert_eq!(state_of(listed.iter()), want);
    }

    #[test]
    fn a_missing_rule_element_or_extra_rule_is_drift() {
        let objects = render(&model(true));
        let want = state_of(objects.iter());
        let without_rule: Vec<Value> = objects
            .iter()
            .filter(|o| o.pointer("/rule/chain") != Some(&json!(RAW_OUTPUT_CHAIN)))
            .cloned()
            .collect();
        assert_ne!(state_of(without_rule.iter()), want);

        let mut fewer_elems = objects.clone();
        for o in fewer_elems.iter_mut() {
            if o.pointer("/set/name") == Some(&json!(ALL_POOLS_V4)) {
                o["set"]["elem"].as_array_mut().unwrap().pop();
            }
        }
        assert_ne!(state_of(fewer_elems.iter()), want);

        let mut extra = objects.clone();
        extra.push(rule_object(NAT_CHAIN, vec![json!({"accept": null})]));
        assert_ne!(state_of(extra.iter()), want);

        let mut with_map = objects.clone();
        with_map.push(json!({"map": {"family": FAMILY, "table": TABLE, "name": "m"}}));
        assert_ne!(state_of(with_map.iter()), want);

        let mut commented = objects.clone();
        for o in commented.iter_mut() {
            if let Some(rule) = o.get_mut("rule") {
                rule["comment"] = json!("edited by hand");
            }
        }
        assert_ne!(state_of(commented.iter()), want);
    }

    #[test]
    fn a_pool_change_changes_the_desired_state() {
        let a = state_of(render(&model(true)).iter());
        let mut m = model(true);
        m.masq_pools_v4.push("10.250.0.0/16".parse().unwrap());
        assert_ne!(state_of(render(&m).iter()), a);
    }

    #[test]
    fn the_replace_batch_adds_deletes_then_recreates_only_this_table() {
        let batch = replace_batch(render(&model(true)));
        let cmds = batch["nftables"].as_array().unwrap();
        assert_eq!(
            cmds[0],
            json!({"add": {"table": {"family": "inet", "name": TABLE}}})
        );
        assert_eq!(
            cmds[1],
            json!({"delete": {"table": {"family": "inet", "name": TABLE}}})
        );
        for cmd in &cmds[2..] {
            let (verb, body) = cmd.as_object().unwrap().iter().next().unwrap();
            assert_eq!(verb, "add");
            let obj = body.as_object().unwrap().values().next().unwrap();
            assert_eq!(obj["family"], FAMILY);
            let table = obj.get("table").or(obj.get("name")).unwrap();
            assert_eq!(table, TABLE);
        }
    }
}
