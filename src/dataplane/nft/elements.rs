//! Element-only changes written straight over nfnetlink. A change that only adds and deletes
//! elements of existing plain sets and verdict maps (a pod's CNI ADD once its chains exist,
//! a label change) skips `nft`: its start-up and above all its cache fill — nft 1.0.6 lists
//! every chain, set and counter of the table before any `add element`, so at 1,000 policies
//! an element change cost ~19 ms that followed the table, not the change. Anything else
//! (chains, new sets, interval sets, types this encoder does not know) goes through `nft`.
//!
//! `plan` is sans-IO: it decides and encodes; `write` sends one batch (one transaction,
//! atomic like `nft -f`) and checks every acknowledgement.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use super::wire::{NFNL_SUBSYS_NFTABLES, family_code, nul_terminated};
use crate::dataplane::nfnetlink::{
    self as nl, NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, NfnlError, Request, Socket,
};
use crate::desired::nft::{Element, Family, Map, Set, Table};
use crate::policy::protocol::Protocol;

const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLM_F_CREATE: u16 = 0x400;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const IFNAMSIZ: usize = 16;
/// Above this a batch goes through `nft` (one datagram must fit the socket's buffers).
const MAX_BATCH: usize = 128 * 1024;
/// How long the kernel may take to acknowledge (it answers while `send` runs).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// One message: add or delete these elements of one set or map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetOp {
    pub set: String,
    pub delete: bool,
    /// Each element's key bytes and, in a verdict map, its verdict.
    pub elements: Vec<(Vec<u8>, Option<Verdict>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub code: i32,
    pub chain: Option<String>,
}

/// The plan of one element-only transaction: deletions first, as `render::changes_of`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub family: Family,
    pub table: String,
    pub ops: Vec<SetOp>,
}

/// The element operations that take `known` to `want` for these touched names, or None
/// when the change is more than elements of existing sets and maps this encoder knows.
pub fn plan(
    want: &Table,
    known: &Table,
    sets: &BTreeSet<String>,
    chains: &BTreeSet<String>,
) -> Option<Plan> {
    if want.family != known.family || want.name != known.name {
        return None;
    }
    if chains
        .iter()
        .any(|c| want.chains.get(c) != known.chains.get(c))
    {
        return None;
    }
    let (mut dels, mut adds) = (Vec::new(), Vec::new());
    for name in sets {
        match (want.sets.get(name), known.sets.get(name)) {
            (Some(w), Some(k)) => set_ops(name, w, k, &mut dels, &mut adds)?,
            (None, None) => {}
            _ => return None,
        }
        match (want.maps.get(name), known.maps.get(name)) {
            (Some(w), Some(k)) => map_ops(name, w, k, &mut dels, &mut adds)?,
            (None, None) => {}
            _ => return None,
        }
    }
    dels.extend(adds);
    Some(Plan {
        family: want.family,
        table: want.name.clone(),
        ops: dels,
    })
}

fn set_ops(
    name: &str,
    want: &Set,
    known: &Set,
    dels: &mut Vec<SetOp>,
    adds: &mut Vec<SetOp>,
) -> Option<()> {
    if !want.same_shape(known) || !want.flags.is_empty() {
        return None;
    }
    let encode = |e: &Element| key_bytes(&want.kind, e).map(|k| (k, None));
    let gone: Option<Vec<_>> = known
        .elements
        .difference(&want.elements)
        .map(encode)
        .collect();
    let new: Option<Vec<_>> = want
        .elements
        .difference(&known.elements)
        .map(encode)
        .collect();
    push(dels, name, true, gone?);
    push(adds, name, false, new?);
    Some(())
}

fn map_ops(
    name: &str,
    want: &Map,
    known: &Map,
    dels: &mut Vec<SetOp>,
    adds: &mut Vec<SetOp>,
) -> Option<()> {
    if want.key != known.key || want.key != "ifname" {
        return None;
    }
    let encode = |k: &String, v: Option<&String>| -> Option<(Vec<u8>, Option<Verdict>)> {
        let key = ifname(k)?;
        match v {
            Some(v) => Some((key, Some(verdict(v)?))),
            None => Some((key, None)),
        }
    };
    let mut gone = Vec::new();
    for (k, v) in &known.elements {
        if want.elements.get(k) != Some(v) {
            gone.push(encode(k, None)?);
        }
    }
    let mut new = Vec::new();
    for (k, v) in &want.elements {
        if known.elements.get(k) != Some(v) {
            new.push(encode(k, Some(v))?);
        }
    }
    push(dels, name, true, gone);
    push(adds, name, false, new);
    Some(())
}

fn push(ops: &mut Vec<SetOp>, set: &str, delete: bool, elements: Vec<(Vec<u8>, Option<Verdict>)>) {
    if !elements.is_empty() {
        ops.push(SetOp {
            set: set.to_string(),
            delete,
            elements,
        });
    }
}

/// An element's key as the kernel holds it for a set of this nft type: addresses in network
/// order; in a concatenation each field padded to 4 bytes (nft's register size).
pub fn key_bytes(kind: &str, e: &Element) -> Option<Vec<u8>> {
    match (kind, e) {
        ("ipv4_addr", Element::Net(IpNet::V4(n))) if n.prefix_len() == 32 => {
            Some(n.addr().octets().to_vec())
        }
        ("ipv6_addr", Element::Net(IpNet::V6(n))) if n.prefix_len() == 128 => {
            Some(n.addr().octets().to_vec())
        }
        (
            "ipv4_addr . inet_proto . inet_service" | "ipv6_addr . inet_proto . inet_service",
            Element::Text(t),
        ) => {
            let mut fields = t.split(" . ");
            let addr: IpAddr = fields.next()?.parse().ok()?;
            let Protocol(proto) = Protocol::parse(fields.next()?)?;
            let port: u16 = fields.next()?.parse().ok()?;
            if fields.next().is_some() || addr.is_ipv4() != kind.starts_with("ipv4") {
                return None;
            }
            let mut out = match addr {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            out.extend_from_slice(&[proto, 0, 0, 0]);
            out.extend_from_slice(&port.to_be_bytes());
            out.extend_from_slice(&[0, 0]);
            Some(out)
        }
        _ => None,
    }
}

fn ifname(name: &str) -> Option<Vec<u8>> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= IFNAMSIZ || b.contains(&0) {
        return None;
    }
    let mut out = b.to_vec();
    out.resize(IFNAMSIZ, 0);
    Some(out)
}

/// A verdict in nft's syntax (`goto X`, `jump X`, `accept`, `drop`, `return`).
fn verdict(v: &str) -> Option<Verdict> {
    let (code, chain) = match v.split_once(' ') {
        Some(("goto", c)) => (-4, Some(c)),
        Some(("jump", c)) => (-3, Some(c)),
        None if v == "accept" => (1, None),
        None if v == "drop" => (0, None),
        None if v == "return" => (-5, None),
        _ => return None,
    };
    Some(Verdict {
        code,
        chain: chain.map(str::to_string),
    })
}

/// The batch's bytes and the sequence numbers that must each be acknowledged. Sequence
/// numbers start at `seq` (the batch begin carries it).
pub fn encode(plan: &Plan, seq: u32) -> (Vec<u8>, Vec<u32>) {
    let batch =
        |kind, seq| Request::new(kind, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES).finish();
    let mut out = batch(NFNL_MSG_BATCH_BEGIN, seq);
    let mut acks = Vec::with_capacity(plan.ops.len());
    for (i, op) in plan.ops.iter().enumerate() {
        let s = seq.wrapping_add(1 + i as u32);
        let (msg, flags) = if op.delete {
            (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK)
        } else {
            (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE)
        };
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | msg;
        let mut r = Request::new(kind, flags, s, family_code(plan.family), 0)
            .attr(NFTA_SET_ELEM_LIST_TABLE, &nul_terminated(&plan.table))
            .attr(NFTA_SET_ELEM_LIST_SET, &nul_terminated(&op.set))
            .nest(NFTA_SET_ELEM_LIST_ELEMENTS);
        for (key, data) in &op.elements {
            r = r
                .nest(NFTA_LIST_ELEM)
                .nest(NFTA_SET_ELEM_KEY)
                .attr(NFTA_DATA_VALUE, key)
                .end();
            if let Some(v) = data {
                r = r
                    .nest(NFTA_SET_ELEM_DATA)
                    .nest(NFTA_DATA_VERDICT)
                    .attr(NFTA_VERDICT_CODE, &v.code.to_be_bytes());
                if let Some(c) = &v.chain {
                    r = r.attr(NFTA_VERDICT_CHAIN, &nul_terminated(c));
                }
                r = r.end().end();
            }
            r = r.end();
        }
        out.extend(r.end().finish());
        acks.push(s);
    }
    let end = seq.wrapping_add(1 + plan.ops.len() as u32);
    out.extend(batch(NFNL_MSG_BATCH_END, end));
    (out, acks)
}

/// Whether this plan is small enough for one datagram.
pub fn fits(plan: &Plan) -> bool {
    let bytes: usize = plan
        .ops
        .iter()
        .map(|op| 64 + op.set.len() + op.elements.len() * 96)
        .sum();
    bytes <= MAX_BATCH
}

/// Sends the plan as one transaction in the calling thread's network namespace.
pub fn write(plan: &Plan) -> Result<(), NfnlError> {
    if plan.ops.is_empty() {
        return Ok(());
    }
    let mut sock = Socket::open(0)?;
    sock.set_timeout(ACK_TIMEOUT)?;
    sock.set_buffer(1 << 20);
    let seq = sock.next_seq();
    let (bytes, acks) = encode(plan, seq);
    sock.send(&bytes)?;
    let mut pending: BTreeSet<u32> = acks.into_iter().collect();
    let mut buf = vec![0u8; 64 * 1024];
    while !pending.is_empty() {
        let Some(data) = sock.recv(&mut buf)? else {
            return Err(NfnlError::Malformed(
                "no acknowledgement of an element batch",
            ));
        };
        for m in nl::messages(data)? {
            if m.kind != NLMSG_ERROR {
                continue;
            }
            match nl::error_code(m.body) {
                Some(0) => {
                    pending.remove(&m.seq);
                }
                Some(e) => {
                    // The batch begin's sequence: the commit failed as a whole.
                    let what = plan
                        .ops
                        .get(m.seq.wrapping_sub(seq).wrapping_sub(1) as usize)
                        .map(|op| {
                            let verb = if op.delete { "delete from" } else { "add to" };
                            format!("{verb} set {} of {} {}", op.set, plan.family, plan.table)
                        })
                        .unwrap_or_else(|| {
                            format!("commit elements of {} {}", plan.family, plan.table)
                        });
                    return Err(NfnlError::Refused {
                        what,
                        source: std::io::Error::from_raw_os_error(-e),
                    });
                }
                None => return Err(NfnlError::Malformed("error message")),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::nft::Table;

    fn table() -> Table {
        let mut t = Table::new(Family::Inet, "t");
        t.sets.insert(
            "s".into(),
            Set {
                kind: "ipv4_addr".into(),
                flags: Vec::new(),
                elements: [Element::net("10.0.0.1/32".parse().unwrap())].into(),
            },
        );
        t.maps.insert("m".into(), Map::verdicts("ifname"));
        t
    }

    fn names(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_element_change_is_planned_deletions_first() {
        let known = table();
        let mut want = table();
        let s = want.sets.get_mut("s").unwrap();
        s.elements.clear();
        s.elements
            .insert(Element::net("10.0.0.2/32".parse().unwrap()));
        want.maps
            .get_mut("m")
            .unwrap()
            .elements
            .insert("cali1".into(), "goto fw-cali1".into());
        let p = plan(&want, &known, &names(&["s", "m"]), &BTreeSet::new()).unwrap();
        let shape: Vec<(&str, bool)> = p.ops.iter().map(|o| (o.set.as_str(), o.delete)).collect();
        assert_eq!(shape, vec![("s", true), ("m", false), ("s", false)]);
        assert_eq!(p.ops[0].elements[0].0, vec![10, 0, 0, 1]);
        let (key, v) = &p.ops[1].elements[0];
        assert_eq!(&key[..6], b"cali1\0");
        assert_eq!(key.len(), 16);
        assert_eq!(
            v.as_ref().unwrap(),
            &Verdict {
                code: -4,
                chain: Some("fw-cali1".into())
            }
        );
    }

    #[test]
    fn anything_but_elements_goes_through_nft() {
        let known = table();
        let mut want = table();
        want.sets.get_mut("s").unwrap().flags = vec!["interval".into()];
        assert!(plan(&want, &known, &names(&["s"]), &BTreeSet::new()).is_none());
        let mut want = table();
        want.sets.remove("s");
        assert!(plan(&want, &known, &names(&["s"]), &BTreeSet::new()).is_none());
        let mut want = table();
        want.chains.insert(
            "c".into(),
            crate::desired::nft::Chain {
                hook: None,
                rules: Vec::new(),
            },
        );
        assert!(plan(&want, &known, &BTreeSet::new(), &names(&["c"])).is_none());
        // An untouched chain difference is not this change's.
        assert!(plan(&want, &known, &BTreeSet::new(), &BTreeSet::new()).is_some());
        let mut want = table();
        want.sets
            .get_mut("s")
            .unwrap()
            .elements
            .insert(Element::net("10.1.0.0/16".parse().unwrap()));
        assert!(plan(&want, &known, &names(&["s"]), &BTreeSet::new()).is_none());
    }

    #[test]
    fn concatenated_keys_pad_each_field_to_four_bytes() {
        let k = key_bytes(
            "ipv4_addr . inet_proto . inet_service",
            &Element::Text("10.0.0.1 . tcp . 8080".into()),
        )
        .unwrap();
        assert_eq!(k, vec![10, 0, 0, 1, 6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        let k6 = key_bytes(
            "ipv6_addr . inet_proto . inet_service",
            &Element::Text("fd00::1 . udp . 53".into()),
        )
        .unwrap();
        assert_eq!(k6.len(), 24);
        assert_eq!(&k6[16..], &[17, 0, 0, 0, 0, 53, 0, 0]);
        // A v6 address in a v4 set, or junk, is not encoded.
        for bad in ["fd00::1 . tcp . 80", "10.0.0.1 . tcp", "10.0.0.1 . tcp . x"] {
            let e = Element::Text(bad.into());
            assert!(key_bytes("ipv4_addr . inet_proto . inet_service", &e).is_none());
        }
    }

    #[test]
    fn a_batch_frames_every_operation_between_begin_and_end() {
        let known = table();
        let mut want = table();
        want.sets
            .get_mut("s")
            .unwrap()
            .elements
            .insert(Element::net("10.0.0.9/32".parse().unwrap()));
        let p = plan(&want, &known, &names(&["s"]), &BTreeSet::new()).unwrap();
        let (bytes, acks) = encode(&p, 100);
        assert_eq!(acks, vec![101]);
        let ms = nl::messages(&bytes).unwrap();
        let kinds: Vec<(u16, u32)> = ms.iter().map(|m| (m.kind, m.seq)).collect();
        assert_eq!(
            kinds,
            vec![
                (NFNL_MSG_BATCH_BEGIN, 100),
                ((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM, 101),
                (NFNL_MSG_BATCH_END, 102)
            ]
        );
        assert_eq!(ms[0].res_id, NFNL_SUBSYS_NFTABLES);
        let top = nl::attrs(ms[1].body).unwrap();
        assert_eq!(nl::find(&top, NFTA_SET_ELEM_LIST_SET), Some(&b"s\0"[..]));
    }
}
