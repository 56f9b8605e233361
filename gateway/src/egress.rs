//! Where upstream calls may go, enforced when a name resolves: `compile` refuses
//! link-local and cloud-metadata `baseUrl`s, but a DNS name can point anywhere later, so
//! every upstream client resolves through [`EgressResolver`], which drops such addresses
//! (and refuses metadata host names) unless the gateway runs with
//! `--allow-link-local-upstreams`. Set once at startup ([`set_policy`]).

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
};

use tollgate_api::compile::egress;

/// Whether link-local and metadata destinations are allowed (`--allow-link-local-upstreams`).
static ALLOW_LINK_LOCAL: OnceLock<bool> = OnceLock::new();

/// Sets the policy for the process; the first call wins.
pub fn set_policy(allow_link_local: bool) {
    let _ = ALLOW_LINK_LOCAL.set(allow_link_local);
}

/// Whether link-local and metadata destinations are allowed (default: no).
pub fn allow_link_local() -> bool {
    ALLOW_LINK_LOCAL.get().copied().unwrap_or(false)
}

/// The addresses of `host` an upstream call may connect to, or why none.
pub fn permitted(
    host: &str,
    resolved: impl IntoIterator<Item = SocketAddr>,
    allow_link_local: bool,
) -> Result<Vec<SocketAddr>, String> {
    if allow_link_local {
        return Ok(resolved.into_iter().collect());
    }
    if let Some(why) = egress::forbidden_name(host) {
        return Err(format!("{host} is {why}; refused"));
    }
    let mut refused = None;
    let kept: Vec<SocketAddr> = resolved
        .into_iter()
        .filter(|a| match egress::forbidden_addr(a.ip()) {
            Some(why) => {
                refused = Some(why);
                false
            }
            None => true,
        })
        .collect();
    match (kept.is_empty(), refused) {
        (true, Some(why)) => Err(format!("{host} resolves to {why}; refused")),
        (true, None) => Err(format!("{host} did not resolve")),
        (false, _) => Ok(kept),
    }
}

/// The DNS resolver of every upstream client: the system's, filtered by [`permitted`].
#[derive(Debug, Clone, Copy)]
pub struct EgressResolver {
    allow_link_local: bool,
}

impl EgressResolver {
    /// A resolver following the process policy.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self {
            allow_link_local: allow_link_local(),
        })
    }
}

impl reqwest::dns::Resolve for EgressResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow_link_local;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let kept = permitted(&host, resolved, allow)?;
            let addrs: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn names_resolving_to_metadata_addresses_are_dropped_or_refused() {
        // Only metadata: refused, with the reason.
        let err = permitted("evil.example", [addr("169.254.169.254:0")], false).unwrap_err();
        assert!(err.contains("link-local"), "{err}");
        let err = permitted("v6.example", [addr("[fd00:ec2::254]:0")], false).unwrap_err();
        assert!(err.contains("metadata"), "{err}");
        // Mixed: only the permitted ones are kept (a rebinding name gets the safe half).
        let kept = permitted(
            "mixed.example",
            [addr("169.254.169.254:0"), addr("10.0.0.7:0")],
            false,
        )
        .unwrap();
        assert_eq!(kept, [addr("10.0.0.7:0")]);
        // Metadata host names never even resolve.
        assert!(permitted("metadata.google.internal", [addr("10.0.0.1:0")], false).is_err());
        // The flag allows everything.
        assert_eq!(
            permitted("evil.example", [addr("169.254.169.254:0")], true).unwrap(),
            [addr("169.254.169.254:0")]
        );
    }

    #[tokio::test]
    async fn the_resolver_resolves_ordinary_names() {
        use reqwest::dns::Resolve;
        let resolver = EgressResolver {
            allow_link_local: false,
        };
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let addrs: Vec<SocketAddr> = resolver.resolve(name).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
        assert!(!addrs.is_empty());
    }
}
