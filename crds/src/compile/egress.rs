//! Where a Provider may send requests: never to link-local addresses or cloud metadata
//! endpoints (169.254.169.254 and friends), which answer with the node's or the pod's
//! credentials to whoever asks. Refused here for `baseUrl`s, and by the gateway again when
//! a name resolves (DNS can change after compile). Private ranges stay allowed: in-cluster
//! vLLM, Ollama and TGI live there.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Host names of cloud metadata services (lowercase, without a trailing dot).
const METADATA_HOSTS: &[&str] = &[
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.tencentyun.com",
    "metadata.platformequinix.com",
];

/// Why an address may not be called, if it may not.
pub fn forbidden_addr(addr: IpAddr) -> Option<&'static str> {
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match addr {
        IpAddr::V4(v4) if v4.is_link_local() => {
            Some("a link-local address (169.254.0.0/16, cloud metadata)")
        }
        // Alibaba Cloud's metadata service.
        IpAddr::V4(v4) if v4 == Ipv4Addr::new(100, 100, 100, 200) => {
            Some("a cloud metadata address")
        }
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => {
            Some("a link-local address (fe80::/10)")
        }
        // AWS's IPv6 metadata endpoint.
        IpAddr::V6(v6) if v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) => {
            Some("a cloud metadata address")
        }
        _ => None,
    }
}

/// Why a host name may not be called, if it may not.
pub fn forbidden_name(name: &str) -> Option<&'static str> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    METADATA_HOSTS
        .contains(&name.as_str())
        .then_some("a cloud metadata host")
}

/// Why the host of `url` may not be called, if it may not.
pub fn forbidden_host(url: &url::Url) -> Option<&'static str> {
    match url.host()? {
        url::Host::Ipv4(v4) => forbidden_addr(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => forbidden_addr(IpAddr::V6(v6)),
        url::Host::Domain(name) => forbidden_name(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_and_link_local_are_refused_private_ranges_are_not() {
        for bad in [
            "http://169.254.169.254/latest",
            "http://169.254.170.2/v2",
            "http://[fd00:ec2::254]/",
            "http://[fe80::1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://100.100.100.200/",
            "http://metadata.google.internal/computeMetadata/v1",
            "http://METADATA.GOOGLE.INTERNAL./",
            "http://metadata/",
        ] {
            let url = url::Url::parse(bad).unwrap();
            assert!(forbidden_host(&url).is_some(), "{bad}");
        }
        for good in [
            "http://10.0.0.5:8000/v1",
            "http://192.168.1.20/v1",
            "http://vllm.ml.svc:8000/v1",
            "https://api.openai.com/v1",
            "http://127.0.0.1:11434/v1",
            "http://[fd00::1]/v1",
        ] {
            let url = url::Url::parse(good).unwrap();
            assert_eq!(forbidden_host(&url), None, "{good}");
        }
    }
}
