//! IP prefixes as the enrolment file and Istio policies write them
//! (`10.96.0.0/12`, `fd00::/8`, or a bare address meaning a single host).
//! Parsing and matching are `ipnet`'s; this type adds Istio's bare-address
//! form, operator-friendly errors and IPv4-mapped matching.
use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// An IP prefix. `addr` may carry host bits (see [`Cidr::has_host_bits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(addr) = s.parse::<IpAddr>() {
            // Istio's ipBlocks accept a bare address as a /32 (/128).
            return Ok(Cidr {
                addr,
                prefix: if addr.is_ipv4() { 32 } else { 128 },
            });
        }
        let net: IpNet = s.parse().map_err(|_| {
            format!("`{s}` is not a CIDR: write <ip>/<prefix length> (e.g. 10.96.0.0/12, fd00::/8) or a single address")
        })?;
        Ok(Cidr {
            addr: net.addr(),
            prefix: net.prefix_len(),
        })
    }
}

impl Cidr {
    fn net(&self) -> IpNet {
        IpNet::new(self.addr, self.prefix).expect("prefix length checked when parsed")
    }

    /// Whether `ip` (IPv4-mapped IPv6 counts as IPv4) is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.net().contains(&ip.to_canonical())
    }

    /// `Some(the prefix without them)` when the address has host bits set
    /// (`10.1.2.3/16`): almost always a typo for the network.
    pub fn has_host_bits(&self) -> Option<Cidr> {
        let trunc = self.net().trunc();
        (trunc.addr() != self.addr).then_some(Cidr {
            addr: trunc.addr(),
            prefix: self.prefix,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_contain_addresses_of_their_family_including_mapped() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()) && c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()) && !c.contains("fd00::1".parse().unwrap()));
        let six: Cidr = "fd00::/8".parse().unwrap();
        assert!(six.contains("fd12::1".parse().unwrap()) && !six.contains("10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn bare_addresses_are_single_hosts() {
        assert_eq!("10.1.2.3".parse::<Cidr>().unwrap().to_string(), "10.1.2.3/32");
        assert_eq!("fd00::1".parse::<Cidr>().unwrap().to_string(), "fd00::1/128");
    }

    #[test]
    fn errors_say_what_to_write_and_host_bits_are_found() {
        for bad in ["10.0.0.0/33", "10.0.0", "fd00::/129", "x/8"] {
            let e = bad.parse::<Cidr>().unwrap_err();
            assert!(e.contains("<ip>/<prefix length>") && e.contains(bad), "{e}");
        }
        let c: Cidr = "192.0.2.1/24".parse().unwrap();
        assert_eq!(c.has_host_bits().unwrap().to_string(), "192.0.2.0/24");
        assert!("192.0.2.0/24".parse::<Cidr>().unwrap().has_host_bits().is_none());
    }
}
