//! Rule ports: a number, a range `"8000:8080"`, or a named port resolved against the
//! container ports of the endpoints on that side of the flow.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub enum PortMatch {
    /// Inclusive range; a single port is `Range(p, p)`.
    Range(u16, u16),
    Named(String),
}

impl PortMatch {
    /// Parses like Calico's `numorstring.PortFromString`; `Err` names what is wrong.
    pub fn parse(v: &IntOrString) -> Result<PortMatch, String> {
        match v {
            IntOrString::Int(n) => u16::try_from(*n)
                .map(|p| PortMatch::Range(p, p))
                .map_err(|_| format!("port {n} is outside 0-65535")),
            IntOrString::String(s) => parse_str(s),
        }
    }
}

fn parse_str(s: &str) -> Result<PortMatch, String> {
    if let Some((lo, hi)) = s.split_once(':') {
        let lo: u16 = lo
            .parse()
            .map_err(|_| format!("port range {s:?}: bad start"))?;
        let hi: u16 = hi
            .parse()
            .map_err(|_| format!("port range {s:?}: bad end"))?;
        if lo > hi {
            return Err(format!("port range {s:?}: start is above end"));
        }
        return Ok(PortMatch::Range(lo, hi));
    }
    if let Ok(p) = s.parse::<u16>() {
        return Ok(PortMatch::Range(p, p));
    }
    if s.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("port {s:?} is outside 0-65535"));
    }
    // IANA service names: 1-15 chars of [a-z0-9-], at least one letter.
    let valid = !s.is_empty()
        && s.len() <= 15
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.chars().any(|c| c.is_ascii_lowercase());
    if valid {
        Ok(PortMatch::Named(s.to_string()))
    } else {
        Err(format!(
            "port {s:?} is not a number, a range or a port name"
        ))
    }
}

impl std::fmt::Display for PortMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortMatch::Range(a, b) if a == b => write!(f, "{a}"),
            PortMatch::Range(a, b) => write!(f, "{a}:{b}"),
            PortMatch::Named(n) => f.write_str(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_ranges_and_names() {
        let s = |v: &str| PortMatch::parse(&IntOrString::String(v.into()));
        assert_eq!(
            PortMatch::parse(&IntOrString::Int(80)),
            Ok(PortMatch::Range(80, 80))
        );
        assert_eq!(s("8000:8080"), Ok(PortMatch::Range(8000, 8080)));
        assert_eq!(s("443"), Ok(PortMatch::Range(443, 443)));
        assert_eq!(s("http"), Ok(PortMatch::Named("http".into())));
        assert!(s("90:80").is_err());
        assert!(s("70000").is_err());
        assert!(s("Not_A_Name").is_err());
        assert!(PortMatch::parse(&IntOrString::Int(-1)).is_err());
    }
}
