//! Address ranges, IPv4 and IPv6: pod CIDRs, the cluster CIDR, service CIDRs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};

/// A CIDR such as `10.42.0.0/24` or `fd00:43::/112`; the address is masked to the
/// network's first one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub network: IpAddr,
    pub prefix: u8,
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl std::str::FromStr for Cidr {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Cidr> {
        let (ip, prefix) = s.split_once('/').with_context(|| format!("{s:?} is not a CIDR (like 10.42.0.0/24)"))?;
        let ip: IpAddr = ip.parse().with_context(|| format!("{s:?}: {ip:?} is not an IP address"))?;
        let width = if ip.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= width)
            .with_context(|| format!("{s:?}: the prefix length must be 0..{width}"))?;
        Ok(Cidr::new(ip, prefix))
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Cidr {
    /// The network of `ip` with `prefix` bits.
    pub fn new(ip: IpAddr, prefix: u8) -> Self {
        let width = if ip.is_ipv4() { 32 } else { 128 };
        let host_bits = u32::from(width - prefix.min(width));
        let mask = if host_bits >= 128 { 0 } else { u128::MAX << host_bits };
        let network = Self::address(ip.is_ipv4(), bits(ip) & mask);
        Cidr { network, prefix: prefix.min(width) }
    }

    fn address(v4: bool, value: u128) -> IpAddr {
        if v4 {
            IpAddr::V4(Ipv4Addr::from(value as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(value))
        }
    }

    pub fn is_ipv4(&self) -> bool {
        self.network.is_ipv4()
    }

    /// The number of host bits.
    pub fn host_bits(&self) -> u32 {
        let width = if self.is_ipv4() { 32 } else { 128 };
        u32::from(width - self.prefix)
    }

    /// How many addresses the range holds (saturating at `u128::MAX` for a /0 of IPv6).
    pub fn size(&self) -> u128 {
        1u128.checked_shl(self.host_bits()).unwrap_or(u128::MAX)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.is_ipv4() && Cidr::new(ip, self.prefix).network == self.network
    }

    /// The address `n` places after the network's first one, if inside the range.
    pub fn nth(&self, n: u128) -> Option<IpAddr> {
        (n < self.size()).then(|| Self::address(self.is_ipv4(), bits(self.network) + n))
    }

    /// How far `ip` is from the network's first address, if inside the range.
    pub fn offset_of(&self, ip: IpAddr) -> Option<u128> {
        self.contains(ip).then(|| bits(ip) - bits(self.network))
    }

    /// The first address after the network's: a bridge's (the pods' gateway), or the
    /// `kubernetes` Service's in a service range.
    pub fn gateway(&self) -> IpAddr {
        self.nth(1).unwrap_or(self.network)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_mask_in_both_families() {
        let c: Cidr = "10.42.0.7/24".parse().unwrap();
        assert_eq!(c.to_string(), "10.42.0.0/24");
        assert_eq!(c.gateway(), "10.42.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(c.size(), 256);
        let v6: Cidr = "fd00:43::17/112".parse().unwrap();
        assert_eq!(v6.to_string(), "fd00:43::/112");
        assert_eq!(v6.nth(10), Some("fd00:43::a".parse().unwrap()));
        assert_eq!(v6.size(), 65536);
        assert!("10.42.0.0".parse::<Cidr>().is_err());
        assert!("10.42.0.0/33".parse::<Cidr>().is_err());
        assert!("x/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn ranges_contain_and_count_their_addresses() {
        let c: Cidr = "10.43.0.0/16".parse().unwrap();
        assert!(c.contains("10.43.255.255".parse().unwrap()));
        assert!(!c.contains("10.44.0.0".parse().unwrap()));
        assert!(!c.contains("fd00::1".parse().unwrap()));
        assert_eq!(c.offset_of("10.43.1.2".parse().unwrap()), Some(258));
        assert_eq!(c.nth(65536), None);
        let all: Cidr = "::/0".parse().unwrap();
        assert_eq!(all.size(), u128::MAX);
    }
}
