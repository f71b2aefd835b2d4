//! IP protocols as Calico rules name them: `TCP`, `UDP`, `ICMP`, `ICMPv6`, `SCTP`, `UDPLite`
//! (and the lowercase v1 spellings), or a number 1–255.

use std::fmt;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// An IP protocol number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Protocol(pub u8);

impl Protocol {
    pub const ICMP: Protocol = Protocol(1);
    pub const TCP: Protocol = Protocol(6);
    pub const UDP: Protocol = Protocol(17);
    pub const ICMPV6: Protocol = Protocol(58);
    pub const SCTP: Protocol = Protocol(132);
    pub const UDPLITE: Protocol = Protocol(136);

    /// Parses a name or number; `None` for anything Calico would reject.
    pub fn parse(s: &str) -> Option<Protocol> {
        Some(match s {
            "TCP" | "tcp" => Protocol::TCP,
            "UDP" | "udp" => Protocol::UDP,
            "ICMP" | "icmp" => Protocol::ICMP,
            "ICMPv6" | "icmpv6" => Protocol::ICMPV6,
            "SCTP" | "sctp" => Protocol::SCTP,
            "UDPLite" | "udplite" => Protocol::UDPLITE,
            n => match n.parse::<u8>() {
                Ok(0) | Err(_) => return None,
                Ok(v) => Protocol(v),
            },
        })
    }

    pub fn from_int_or_string(v: &IntOrString) -> Option<Protocol> {
        match v {
            IntOrString::Int(n) => u8::try_from(*n).ok().filter(|n| *n > 0).map(Protocol),
            IntOrString::String(s) => Protocol::parse(s),
        }
    }

    /// Whether rules may match ports with this protocol (Calico: TCP, UDP, SCTP only).
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::TCP | Protocol::UDP | Protocol::SCTP)
    }

    pub fn is_icmp(self) -> bool {
        matches!(self, Protocol::ICMP | Protocol::ICMPV6)
    }

    /// The name Kubernetes and Calico write (`TCP`), or the number.
    pub fn name(self) -> String {
        match self {
            Protocol::TCP => "TCP".into(),
            Protocol::UDP => "UDP".into(),
            Protocol::ICMP => "ICMP".into(),
            Protocol::ICMPV6 => "ICMPv6".into(),
            Protocol::SCTP => "SCTP".into(),
            Protocol::UDPLITE => "UDPLite".into(),
            Protocol(n) => n.to_string(),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl serde::Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_v1_spellings_parse() {
        assert_eq!(Protocol::parse("TCP"), Some(Protocol::TCP));
        assert_eq!(Protocol::parse("sctp"), Some(Protocol::SCTP));
        assert_eq!(Protocol::parse("ICMPv6"), Some(Protocol::ICMPV6));
        assert_eq!(Protocol::parse("47"), Some(Protocol(47)));
        assert_eq!(Protocol::parse("0"), None);
        assert_eq!(Protocol::parse("Tcp"), None);
        assert_eq!(Protocol::from_int_or_string(&IntOrString::Int(256)), None);
    }
}
