//! Plain-text tables for the operator commands, bordered like calicoctl's so output reads the
//! same to people used to it: `+---+` rules, `| a | b |` rows, headers in capitals.

/// Renders `rows` under `header`; every row must have the header's number of cells.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let rule = {
        let mut s = String::from("+");
        for w in &widths {
            s.push_str(&"-".repeat(w + 2));
            s.push('+');
        }
        s.push('\n');
        s
    };
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::from("|");
        for (w, cell) in widths.iter().zip(cells) {
            let pad = w - cell.chars().count();
            s.push(' ');
            s.push_str(cell);
            s.push_str(&" ".repeat(pad + 1));
            s.push('|');
        }
        s.push('\n');
        s
    };
    let mut out = rule.clone();
    out.push_str(&line(&mut header.iter().copied()));
    out.push_str(&rule);
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out.push_str(&rule);
    out
}

/// `n (p%)` with p rounded to the nearest whole percent of `total`, as calicoctl prints it.
pub fn with_percent(n: u128, total: u128) -> String {
    if total == 0 {
        return format!("{n} (0%)");
    }
    let pct = (n.saturating_mul(200) / total).div_ceil(2);
    format!("{n} ({pct}%)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let t = render(&["A", "LONG"], &[vec!["xyz".into(), "1".into()]]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "+-----+------+");
        assert_eq!(lines[1], "| A   | LONG |");
        assert_eq!(lines[3], "| xyz | 1    |");
        assert_eq!(lines.len(), 5);
    }

    #[test]
    fn percentages_round_to_nearest() {
        assert_eq!(with_percent(12, 256), "12 (5%)");
        assert_eq!(with_percent(1, 3), "1 (33%)");
        assert_eq!(with_percent(2, 3), "2 (67%)");
        assert_eq!(with_percent(0, 0), "0 (0%)");
        assert_eq!(with_percent(64, 64), "64 (100%)");
    }
}
