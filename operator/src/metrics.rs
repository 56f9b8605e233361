//! The operator's Prometheus metrics, served at `/metrics` on the admin listener. Labels
//! are bounded: kinds, verbs and results, never object names.

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tollgate_api::{compile::CompileOutput, diagnostics::Kind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabels {
    watch: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    kind: String,
    verb: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConfigLabels {
    hash: String,
}

/// The metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ResultLabels, Counter>,
    duration: Histogram,
    writes: Family<WriteLabels, Counter>,
    objects: Family<KindLabels, Gauge>,
    ready: Family<KindLabels, Gauge>,
    leader: Gauge,
    revocations: Counter,
    pending: Gauge,
    config: Family<ConfigLabels, Gauge>,
    usage_reads: Family<ResultLabels, Counter>,
    watch_events: Family<WatchLabels, Counter>,
    gateways: Family<ResultLabels, Gauge>,
    keys_left_out: Gauge,
    routes_left_out: Gauge,
    keys_held: Gauge,
    keys_published: Family<AfterLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AfterLabels {
    after: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tollgate_operator");
        let m = Self {
            reconciles: Family::default(),
            duration: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            writes: Family::default(),
            objects: Family::default(),
            ready: Family::default(),
            leader: Gauge::default(),
            revocations: Counter::default(),
            pending: Gauge::default(),
            config: Family::default(),
            usage_reads: Family::default(),
            watch_events: Family::default(),
            gateways: Family::default(),
            keys_left_out: Gauge::default(),
            routes_left_out: Gauge::default(),
            keys_held: Gauge::default(),
            keys_published: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "reconciles",
            "Reconciles of the whole configuration, by result",
            m.reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            m.duration.clone(),
        );
        registry.register(
            "api_writes",
            "Writes to the Kubernetes API, by kind and verb",
            m.writes.clone(),
        );
        registry.register(
            "objects",
            "Tollgate objects watched, by kind",
            m.objects.clone(),
        );
        registry.register(
            "objects_ready",
            "Tollgate objects compiled into the served configuration, by kind",
            m.ready.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the lease and writes",
            m.leader.clone(),
        );
        registry.register(
            "revocations",
            "Key hashes whose revocation was published",
            m.revocations.clone(),
        );
        registry.register(
            "watch_events",
            "Watch events by watch and result: `changed` (a reconcile follows) or `ignored` (nothing a compile reads changed: a status write, a resync)",
            m.watch_events.clone(),
        );
        registry.register(
            "pending_changes",
            "Changes seen since the last reconcile (the queue depth)",
            m.pending.clone(),
        );
        registry.register(
            "config_info",
            "The configuration hash applied last (value 1)",
            m.config.clone(),
        );
        registry.register(
            "usage_reads",
            "Usage refreshes from Redis, by result",
            m.usage_reads.clone(),
        );
        registry.register(
            "gateways",
            "Gateways that reported within the last 20 s (`result=\"live\"`) and those of them serving the latest configuration (`result=\"serving\"`), from their Redis reports",
            m.gateways.clone(),
        );
        registry.register(
            "keys_left_out",
            "ApiKeys left out of the configuration at the last reconcile because the key shards the gateways mount are full (reported ConfigTooLarge on each)",
            m.keys_left_out.clone(),
        );
        registry.register(
            "route_policies_left_out",
            "RoutePolicies left out of the configuration at the last reconcile because the routing ConfigMaps the gateways mount are full (reported ConfigTooLarge on each)",
            m.routes_left_out.clone(),
        );
        registry.register(
            "keys_held",
            "New or rotated keys in the configuration but not yet in their Secret: written once every live gateway serves them (ApiKey reason KeyPending)",
            m.keys_held.clone(),
        );
        registry.register(
            "keys_published",
            "Keys written into their Secrets, by what they waited for: `served` (every live gateway serves them), `no_gateways`, `no_reports` (no Redis, or --key-publish-wait 0), `not_served` (the configuration does not serve them), `waited` (--key-publish-wait ran out)",
            m.keys_published.clone(),
        );
        Self { registry, ..m }
    }

    /// A finished reconcile.
    pub fn reconciled(&self, ok: bool, took: Duration) {
        self.reconciles
            .get_or_create(&ResultLabels {
                result: if ok { "success" } else { "error" },
            })
            .inc();
        self.duration.observe(took.as_secs_f64());
        self.pending.set(0);
    }

    /// A change seen by a watch (a reconcile follows).
    pub fn change_seen(&self, watch: &'static str) {
        self.pending.inc();
        self.watch_events
            .get_or_create(&WatchLabels {
                watch,
                result: "changed",
            })
            .inc();
    }

    /// A watch event that changed nothing a compile reads.
    pub fn change_ignored(&self, watch: &'static str) {
        self.watch_events
            .get_or_create(&WatchLabels {
                watch,
                result: "ignored",
            })
            .inc();
    }

    /// One API write.
    pub fn api_write(&self, kind: &str, verb: &'static str) {
        self.writes
            .get_or_create(&WriteLabels {
                kind: kind.to_owned(),
                verb,
            })
            .inc();
    }

    /// Total API writes so far (for reports and tests).
    pub fn api_writes_total(&self) -> u64 {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out.lines()
            .filter(|l| l.starts_with("tollgate_operator_api_writes_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Revocations published.
    pub fn revoked(&self, n: usize) {
        self.revocations.inc_by(n as u64);
    }

    /// ApiKeys left out for size at the last reconcile.
    pub fn keys_left_out(&self, n: usize) {
        self.keys_left_out.set(n as i64);
    }

    /// RoutePolicies left out for size at the last reconcile.
    pub fn routes_left_out(&self, n: usize) {
        self.routes_left_out.set(n as i64);
    }

    /// Keys held until the gateways serve them.
    pub fn keys_held(&self, n: usize) {
        self.keys_held.set(n as i64);
    }

    /// A key written into its Secret, after `after` (a [`crate::publish::Why`] label).
    pub fn key_published(&self, after: &'static str) {
        self.keys_published
            .get_or_create(&AfterLabels { after })
            .inc();
    }

    /// A reconcile put off because a watch was relisting.
    pub fn reconcile_deferred(&self) {
        self.reconciles
            .get_or_create(&ResultLabels { result: "deferred" })
            .inc();
    }

    /// The gateways' reports, as last read.
    pub fn gateways(&self, serving: usize, live: usize) {
        self.gateways
            .get_or_create(&ResultLabels { result: "serving" })
            .set(serving as i64);
        self.gateways
            .get_or_create(&ResultLabels { result: "live" })
            .set(live as i64);
    }

    /// Leadership changed.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// A usage refresh.
    pub fn usage_read(&self, ok: bool) {
        self.usage_reads
            .get_or_create(&ResultLabels {
                result: if ok { "success" } else { "error" },
            })
            .inc();
    }

    /// What the last compile made of the objects.
    pub fn observe_compile(&self, out: &CompileOutput, config_hash: &str) {
        for (kind, label) in [
            (Kind::Provider, "Provider"),
            (Kind::RoutePolicy, "RoutePolicy"),
            (Kind::ApiKey, "ApiKey"),
        ] {
            let of_kind = out.objects.iter().filter(|(o, _)| o.kind == kind);
            let (total, ready) = of_kind.fold((0, 0), |(t, r), (_, outcome)| {
                (t + 1, r + i64::from(outcome.served))
            });
            self.objects
                .get_or_create(&KindLabels { kind: label })
                .set(total);
            self.ready
                .get_or_create(&KindLabels { kind: label })
                .set(ready);
        }
        self.config.clear();
        self.config
            .get_or_create(&ConfigLabels {
                hash: config_hash[..config_hash.len().min(16)].to_owned(),
            })
            .set(1);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// The operator rows of docs/metrics.md: name → labels.
    fn catalogue() -> BTreeMap<String, BTreeSet<String>> {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
                .unwrap();
        text.split("## Operator")
            .nth(1)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("| `tollgate_operator_"))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let labels = cells[3]
                    .split(',')
                    .map(|c| c.trim().trim_matches('`').to_owned())
                    .filter(|c| !c.is_empty())
                    .collect();
                (cells[1].trim_matches('`').to_owned(), labels)
            })
            .collect()
    }

    #[test]
    fn every_metric_is_in_the_catalogue_with_its_labels_and_moves() {
        let m = Metrics::new();
        m.reconciled(true, Duration::from_millis(20));
        m.reconciled(false, Duration::from_millis(5));
        m.api_write("Secret", "apply");
        m.api_write("Secret", "apply");
        m.change_seen("apikeys");
        m.change_ignored("apikeys");
        m.revoked(3);
        m.set_leader(true);
        m.usage_read(true);
        m.gateways(2, 3);
        m.keys_left_out(0);
        m.routes_left_out(0);
        m.keys_held(1);
        m.key_published("served");
        m.observe_compile(&CompileOutput::default(), "0123456789abcdef0123");
        let text = m.encode();
        let catalogue = catalogue();
        let mut seen = BTreeSet::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let series = line.rsplit_once(' ').unwrap().0;
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| *f == "tollgate_operator_reconcile_duration_seconds")
                .unwrap_or(name);
            let got: BTreeSet<String> = labels
                .trim_end_matches('}')
                .split(',')
                .filter_map(|p| p.split_once('=').map(|(k, _)| k.to_owned()))
                .filter(|k| k != "le")
                .collect();
            let want = catalogue
                .get(family)
                .unwrap_or_else(|| panic!("{family} missing from docs/metrics.md"));
            assert_eq!(&got, want, "{line}");
            seen.insert(family.to_owned());
        }
        assert_eq!(seen, catalogue.keys().cloned().collect::<BTreeSet<_>>());
        assert_eq!(m.api_writes_total(), 2);
        assert!(text.contains("tollgate_operator_reconciles_total{result=\"error\"} 1"));
        assert!(text.contains("tollgate_operator_revocations_total 3"));
        assert!(text.contains("tollgate_operator_config_info{hash=\"0123456789abcdef\"} 1"));
    }
}
