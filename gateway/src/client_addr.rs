//! Which address a request comes from, for the failed-authentication throttle and logs.
//!
//! The peer, unless the peer is a trusted proxy (`--trusted-proxies`): then the forwarding
//! header (`x-forwarded-for` by default) is read from the right, skipping addresses that
//! are themselves trusted proxies, and the first one that is not is the client (nginx's
//! `real_ip_recursive`, Envoy's trusted hops). Anything left of it was written by the
//! client and is ignored, so a client cannot pick its own address. Without trusted
//! proxies the header is never read.

use std::net::IpAddr;

use ipnet::IpNet;

/// Networks whose connections may say, in the forwarding header, who the client is.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

/// A `--trusted-proxies` item that is neither an address nor a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an address or CIDR")]
pub struct NotAnAddress(pub String);

impl TrustedProxies {
    /// Parses CIDRs (`10.0.0.0/8`, `fd00::/8`) or single addresses.
    pub fn parse(items: &[String]) -> Result<Self, NotAnAddress> {
        let mut nets = Vec::with_capacity(items.len());
        for item in items.iter().map(|i| i.trim()).filter(|i| !i.is_empty()) {
            let net = item
                .parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| NotAnAddress(item.to_owned()))?;
            nets.push(net);
        }
        Ok(Self { nets })
    }

    /// Whether no proxy is trusted (the header is then never read).
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    fn contains(&self, addr: IpAddr) -> bool {
        let addr = canonical(addr);
        self.nets.iter().any(|n| n.contains(&addr))
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) as the IPv4 address they are.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The client address of a request from `peer` whose forwarding header lines are
/// `header_values` (in the order received; each a comma-separated list).
pub fn client_addr<'a>(
    peer: IpAddr,
    header_values: impl Iterator<Item = &'a str>,
    trusted: &TrustedProxies,
) -> IpAddr {
    let peer = canonical(peer);
    if trusted.is_empty() || !trusted.contains(peer) {
        return peer;
    }
    let hops: Vec<&str> = header_values
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        // An entry that is not an address ends the chain: what is left of it cannot be
        // trusted, and the last trusted hop is the best we know.
        let Some(addr) = parse_hop(hop) else {
            return client;
        };
        client = addr;
        if !trusted.contains(addr) {
            return addr;
        }
    }
    client
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `::1`, `[::1]:5678`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(addr) = hop.parse::<IpAddr>() {
        return Some(canonical(addr));
    }
    hop.parse::<std::net::SocketAddr>()
        .ok()
        .map(|s| canonical(s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(items: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn without_trusted_proxies_the_header_is_never_read() {
        let none = TrustedProxies::default();
        let got = client_addr(ip("10.0.0.9"), ["203.0.113.7"].into_iter(), &none);
        assert_eq!(got, ip("10.0.0.9"));
    }

    #[test]
    fn an_untrusted_peer_cannot_name_its_address() {
        let t = trusted(&["10.0.0.0/8"]);
        let got = client_addr(ip("198.51.100.4"), ["203.0.113.7"].into_iter(), &t);
        assert_eq!(got, ip("198.51.100.4"));
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client_whatever_the_client_prepends() {
        let t = trusted(&["10.0.0.0/8", "192.168.1.1"]);
        // The client forged the first entry; the ingress (10.1.2.3) appended the real one.
        let got = client_addr(
            ip("10.1.2.3"),
            ["1.1.1.1, 203.0.113.7", "192.168.1.1"].into_iter(),
            &t,
        );
        assert_eq!(got, ip("203.0.113.7"));
        // Ports and brackets as some proxies write them; IPv4-mapped IPv6 as IPv4.
        let got = client_addr(
            ip("::ffff:10.1.2.3"),
            ["[2001:db8::1]:443, 10.9.9.9:80"].into_iter(),
            &t,
        );
        assert_eq!(got, ip("2001:db8::1"));
    }

    #[test]
    fn a_chain_of_only_trusted_hops_or_garbage_stops_at_the_last_trusted_one() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(
            client_addr(ip("10.0.0.1"), ["10.0.0.2, 10.0.0.3"].into_iter(), &t),
            ip("10.0.0.2")
        );
        assert_eq!(
            client_addr(ip("10.0.0.1"), ["evil, 10.0.0.3"].into_iter(), &t),
            ip("10.0.0.3")
        );
        assert_eq!(
            client_addr(ip("10.0.0.1"), std::iter::empty(), &t),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn bad_cidrs_are_refused() {
        let bad = TrustedProxies::parse(&["10.0.0.0/33".to_owned()]);
        assert!(bad.unwrap_err().to_string().contains("10.0.0.0/33"));
    }
}
