//! Reads the named counter objects of one of tortie's tables straight from the kernel: one
//! `NFT_MSG_GETOBJ` dump over nfnetlink, filtered by table and type in the kernel. No rule,
//! chain or set is listed, and no `nft` process is started, so a read stays cheap at any
//! number of policies. Sans-IO request and decoder plus one call in the calling thread's
//! network namespace. Also the anonymous counters of one chain's rules (`chain_counters`),
//! for the occasional look at a single chain.

use serde_json::Value;

use super::run::{NftError, Runner};
use super::wire::{NFNL_SUBSYS_NFTABLES, family_code, nul_terminated};
use crate::dataplane::nfnetlink::{self as nl, NfnlError, Request, Socket};
use crate::desired::nft::{Family, RULE_COMMENT_PREFIX};

const NFT_MSG_GETTABLE: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFT_MSG_GETOBJ: u16 = 19;
const NFT_MSG_NEWOBJ: u16 = 18;
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFTA_OBJ_HANDLE: u16 = 6;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
/// A dump that does not finish in this time is abandoned (the next read tries again).
const DUMP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One named counter's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedCounter {
    pub name: String,
    /// The kernel's handle: a counter deleted and made again gets a new one, so a counter
    /// that starts again from zero is recognised.
    pub handle: u64,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    #[error("read the counters of table {table}: {source}")]
    Netlink {
        table: String,
        #[source]
        source: NfnlError,
    },
    #[error("read the counters of table {table}: no answer within {DUMP_TIMEOUT:?}")]
    Timeout { table: String },
    #[error("table {table} does not exist in this network namespace")]
    NoTable { table: String },
}

/// The dump request for the counter objects of `family table`.
pub fn dump_request(family: Family, table: &str, seq: u32) -> Vec<u8> {
    let name = nul_terminated(table);
    Request::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ,
        nl::NLM_F_REQUEST | nl::NLM_F_DUMP,
        seq,
        family_code(family),
        0,
    )
    .attr(NFTA_OBJ_TABLE, &name)
    .attr(NFTA_OBJ_TYPE, &NFT_OBJECT_COUNTER.to_be_bytes())
    .finish()
}

/// What one datagram of the dump held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    pub counters: Vec<NamedCounter>,
    pub done: bool,
    /// The errno the kernel answered with, if it refused (ENOENT: no such table).
    pub errno: Option<i32>,
}

/// Decodes one datagram of the dump (objects of other tables or types are skipped: old
/// kernels ignore the dump filter).
pub fn decode(data: &[u8], table: &str) -> Result<Decoded, NfnlError> {
    let mut out = Decoded::default();
    for m in nl::messages(data)? {
        match m.kind {
            nl::NLMSG_DONE => out.done = true,
            nl::NLMSG_ERROR => {
                out.done = true;
                out.errno = nl::error_code(m.body).filter(|e| *e != 0).map(|e| -e);
            }
            k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ => {
                let attrs = nl::attrs(m.body)?;
                let text = |k| {
                    nl::find(&attrs, k)
                        .map(|v| String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or(v)))
                };
                if text(NFTA_OBJ_TABLE).as_deref() != Some(table)
                    || nl::find(&attrs, NFTA_OBJ_TYPE).and_then(nl::be32)
                        != Some(NFT_OBJECT_COUNTER)
                {
                    continue;
                }
                let data = nl::attrs(nl::find(&attrs, NFTA_OBJ_DATA).unwrap_or_default())?;
                out.counters.push(NamedCounter {
                    name: text(NFTA_OBJ_NAME).unwrap_or_default().into_owned(),
                    handle: nl::find(&attrs, NFTA_OBJ_HANDLE)
                        .and_then(be64)
                        .unwrap_or(0),
                    packets: nl::find(&data, NFTA_COUNTER_PACKETS)
                        .and_then(be64)
                        .unwrap_or(0),
                    bytes: nl::find(&data, NFTA_COUNTER_BYTES)
                        .and_then(be64)
                        .unwrap_or(0),
                });
            }
            _ => {}
        }
    }
    Ok(out)
}

fn be64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?))
}

/// The named counters of `family table` in the calling thread's network namespace.
pub fn read(family: Family, table: &str) -> Result<Vec<NamedCounter>, CounterError> {
    let err = |source| CounterError::Netlink {
        table: format!("{family} {table}"),
        source,
    };
    let mut socket = Socket::open(0).map_err(err)?;
    socket.set_timeout(DUMP_TIMEOUT).map_err(err)?;
    socket.set_buffer(1 << 20);
    let seq = socket.next_seq();
    socket
        .send(&dump_request(family, table, seq))
        .map_err(err)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut out = Vec::new();
    loop {
        let Some(data) = socket.recv(&mut buf).map_err(err)? else {
            return Err(CounterError::Timeout {
                table: format!("{family} {table}"),
            });
        };
        let d = decode(data, table).map_err(err)?;
        out.extend(d.counters);
        match d.errno {
            Some(2) => {
                return Err(CounterError::NoTable {
                    table: format!("{family} {table}"),
                });
            }
            Some(e) => {
                return Err(err(NfnlError::Refused {
                    what: "dump the counter objects".into(),
                    source: std::io::Error::from_raw_os_error(e),
                }));
            }
            // A dump filtered by a table that does not exist is empty, not an error; the
            // policy table always holds counters, so only an empty one is looked up.
            None if d.done => {
                if out.is_empty() && !table_exists(&mut socket, family, table).map_err(err)? {
                    return Err(CounterError::NoTable {
                        table: format!("{family} {table}"),
                    });
                }
                return Ok(out);
            }
            None => {}
        }
    }
}

fn table_exists(socket: &mut Socket, family: Family, table: &str) -> Result<bool, NfnlError> {
    let seq = socket.next_seq();
    let req = Request::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
        nl::NLM_F_REQUEST | nl::NLM_F_ACK,
        seq,
        family_code(family),
        0,
    )
    .attr(NFTA_TABLE_NAME, &nul_terminated(table))
    .finish();
    match socket.request("look up the table", req) {
        Ok(()) => Ok(true),
        Err(NfnlError::Refused { source, .. }) if source.raw_os_error() == Some(2) => Ok(false),
        Err(e) => Err(e),
    }
}

/// One rule's anonymous counter, by the rule id tortie wrote as its comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleCounter {
    pub id: String,
    pub packets: u64,
    pub bytes: u64,
}

/// The counters of the rules of one chain (`nft -j list chain`); empty when the chain (or
/// table) does not exist.
pub fn chain_counters(
    runner: &Runner,
    family: Family,
    table: &str,
    chain: &str,
) -> Result<Vec<RuleCounter>, NftError> {
    const ACTION: &str = "list a chain's rule counters";
    let args = ["-j", "list", "chain", family.as_str(), table, chain];
    let out = match runner.run(ACTION, &args, None) {
        Ok(out) => out,
        Err(e) if e.is_missing() => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let listing: Value = serde_json::from_slice(&out).map_err(|source| NftError::Parse {
        action: ACTION,
        source,
    })?;
    Ok(parse_rule_counters(&listing))
}

/// Every rule with tortie's comment and a counter statement, in listing order.
pub fn parse_rule_counters(listing: &Value) -> Vec<RuleCounter> {
    let objects = listing
        .get("nftables")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut out = Vec::new();
    for rule in objects.iter().filter_map(|o| o.get("rule")) {
        let Some(id) = rule
            .get("comment")
            .and_then(Value::as_str)
            .and_then(|c| c.strip_prefix(RULE_COMMENT_PREFIX))
        else {
            continue;
        };
        let counter = rule
            .get("expr")
            .and_then(Value::as_array)
            .and_then(|e| e.iter().find_map(|x| x.get("counter")));
        let Some(counter) = counter else {
            continue;
        };
        let num = |k: &str| counter.get(k).and_then(Value::as_u64).unwrap_or(0);
        out.push(RuleCounter {
            id: id.to_string(),
            packets: num("packets"),
            bytes: num("bytes"),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NFPROTO_INET, as the kernel headers define it.
    const NFPROTO_INET: u8 = 1;

    fn newobj(table: &str, name: &str, kind: u32, packets: u64, bytes: u64) -> Vec<u8> {
        let z = nul_terminated;
        Request::new(
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ,
            nl::NLM_F_MULTI,
            1,
            NFPROTO_INET,
            0,
        )
        .attr(NFTA_OBJ_TABLE, &z(table))
        .attr(NFTA_OBJ_NAME, &z(name))
        .attr(NFTA_OBJ_TYPE, &kind.to_be_bytes())
        .nest(NFTA_OBJ_DATA)
        .attr(NFTA_COUNTER_BYTES, &bytes.to_be_bytes())
        .attr(NFTA_COUNTER_PACKETS, &packets.to_be_bytes())
        .end()
        .attr(NFTA_OBJ_HANDLE, &7u64.to_be_bytes())
        .finish()
    }

    #[test]
    fn rule_counters_are_read_by_rule_id() {
        let listing = serde_json::json!({"nftables": [
            {"metainfo": {"json_schema_version": 1}},
            {"chain": {"name": "pi-knp.prod.web"}},
            {"rule": {"chain": "pi-knp.prod.web", "handle": 12, "comment": "tortie:ab", "expr": [
                {"counter": {"packets": 3, "bytes": 180}}, {"accept": null}]}},
            {"rule": {"chain": "pi-knp.prod.web", "handle": 13, "expr": [
                {"counter": {"packets": 1, "bytes": 1}}]}},
            {"rule": {"chain": "pi-knp.prod.web", "handle": 14, "comment": "tortie:cd",
                      "expr": [{"accept": null}]}},
        ]});
        assert_eq!(
            parse_rule_counters(&listing),
            vec![RuleCounter {
                id: "ab".into(),
                packets: 3,
                bytes: 180
            }]
        );
    }

    #[test]
    fn a_dump_decodes_to_this_tables_counters() {
        let mut data = newobj("tortie-policy", "pi-knp.a.b/0/deny", 1, 3, 180);
        data.extend(newobj("other", "x", 1, 1, 1));
        data.extend(newobj("tortie-policy", "q", 2, 1, 1));
        let d = decode(&data, "tortie-policy").unwrap();
        assert_eq!(
            d.counters,
            vec![NamedCounter {
                name: "pi-knp.a.b/0/deny".into(),
                handle: 7,
                packets: 3,
                bytes: 180
            }]
        );
        assert!(!d.done);
        let req = dump_request(Family::Inet, "tortie-policy", 9);
        let m = &nl::messages(&req).unwrap()[0];
        assert_eq!((m.kind, m.family, m.seq), (0x0a13, NFPROTO_INET, 9));
        let attrs = nl::attrs(m.body).unwrap();
        assert_eq!(
            nl::find(&attrs, NFTA_OBJ_TABLE),
            Some(&b"tortie-policy\0"[..])
        );
    }
}
