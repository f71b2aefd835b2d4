// A truth table: allowed or not for every (source pod, destination pod, probe) cell, pods
// by index, a pod to itself never a cell. Golden tables are written as one matrix per probe
// (rows are sources, columns destinations, in pod order); a mismatch renders expected and
// observed side by side with the differing cells marked.

use std::collections::BTreeMap;

use super::probe::Probe;

pub type Table = BTreeMap<(usize, usize, Probe), bool>;

/// Every cell of `n` pods × `probes` set to `allowed`.
pub fn uniform(n: usize, probes: &[Probe], allowed: bool) -> Table {
    let mut t = Table::new();
    for s in 0..n {
        for d in (0..n).filter(|d| *d != s) {
            for p in probes {
                t.insert((s, d, *p), allowed);
            }
        }
    }
    t
}

/// A golden table: for each group of probes, one row per source pod of `n`; a row holds one
/// character per destination pod (`1` allowed, `.` denied, `-` the pod itself), spaces
/// ignored.
pub fn golden(n: usize, matrices: &[(&[Probe], &[&str])]) -> Table {
    let mut t = Table::new();
    for (probes, rows) in matrices {
        assert_eq!(rows.len(), n, "golden matrix needs {n} rows: {rows:?}");
        for (s, row) in rows.iter().enumerate() {
            let cells: Vec<char> = row.chars().filter(|c| !c.is_whitespace()).collect();
            assert_eq!(cells.len(), n, "golden row {row:?} needs {n} cells");
            for (d, c) in cells.into_iter().enumerate() {
                let allowed = match (c, s == d) {
                    ('-', true) => continue,
                    ('1', false) => true,
                    ('.', false) => false,
                    _ => panic!("golden row {row:?}: bad cell {c:?} at column {d}"),
                };
                for p in *probes {
                    t.insert((s, d, *p), allowed);
                }
            }
        }
    }
    t
}

/// The probes a table covers, in order.
pub fn probes(t: &Table) -> Vec<Probe> {
    let mut ps: Vec<Probe> = t.keys().map(|k| k.2).collect();
    ps.sort();
    ps.dedup();
    ps
}

/// Expected and observed per probe, side by side; in the observed matrix a cell that differs
/// is `A` (allowed, expected denied) or `D` (denied, expected allowed). `names` are the pods'
/// short names, `nodes` the node each runs on.
pub fn render(want: &Table, got: &Table, names: &[String], nodes: &[usize]) -> String {
    let n = names.len();
    let width = names.iter().map(String::len).max().unwrap_or(2);
    let mut out = String::new();
    out.push_str("legend: 1 allowed, . denied, - self; observed A = allowed but expected denied, D = denied but expected allowed\n");
    out.push_str(&format!(
        "nodes: {}\n",
        (0..n)
            .map(|i| format!("{}@{}", names[i], ["a", "b"][nodes[i] % 2]))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let head: String = names
        .iter()
        .map(|s| s.chars().last().unwrap_or('?'))
        .collect();
    let ns_head: String = names
        .iter()
        .map(|s| s.chars().next().unwrap_or('?'))
        .collect();
    for p in probes(want) {
        out.push_str(&format!("\n{p}  (rows: from, columns: to)\n"));
        out.push_str(&format!("{:width$}  expected   observed\n", ""));
        out.push_str(&format!("{:width$}  {ns_head}  {ns_head}\n", ""));
        out.push_str(&format!("{:width$}  {head}  {head}\n", ""));
        for (s, name) in names.iter().enumerate() {
            let (mut w, mut g) = (String::new(), String::new());
            for d in 0..n {
                let key = (s, d, p);
                let (wc, gc) = match (want.get(&key), got.get(&key)) {
                    (None, _) => ('-', '-'),
                    (Some(a), None) => (bit(*a), '?'),
                    (Some(a), Some(b)) if a == b => (bit(*a), bit(*b)),
                    (Some(a), Some(_)) => (bit(*a), if *a { 'D' } else { 'A' }),
                };
                w.push(wc);
                g.push(gc);
            }
            out.push_str(&format!("{name:width$}  {w}  {g}\n"));
        }
    }
    let diffs: Vec<String> = want
        .iter()
        .filter(|(k, v)| got.get(k) != Some(v))
        .map(|((s, d, p), v)| {
            format!(
                "  {} -> {} {p} ({}): expected {}, observed {}",
                names[*s],
                names[*d],
                if nodes[*s] == nodes[*d] {
                    "same node"
                } else {
                    "across nodes"
                },
                word(*v),
                got.get(&(*s, *d, *p)).map_or("not probed", |b| word(*b))
            )
        })
        .collect();
    out.push_str(&format!(
        "\n{} cells differ:\n{}\n",
        diffs.len(),
        diffs.join("\n")
    ));
    out
}

fn bit(b: bool) -> char {
    if b { '1' } else { '.' }
}

fn word(b: bool) -> &'static str {
    if b { "allowed" } else { "denied" }
}
