//! What the gateway has recently seen of each upstream target (route, provider and
//! model): a moving average of latency and a fading success/failure tally, the inputs of
//! the `leastLatency` and `adaptive` routing strategies. Kept in process (like circuit
//! breakers it outlives configuration reloads); with Redis, [`share`] publishes each
//! replica's records and reads the other replicas' back, off the request path.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

/// Weight of a new latency sample in the moving average: a sample's influence halves
/// about every 1.4 samples, so a change in latency shows within a few requests.
pub const EWMA_ALPHA: f64 = 0.4;

/// Factor applied to the success/failure tally before each new outcome: the posterior
/// remembers about the last `1 / (1 - DECAY)` = 5 outcomes.
pub const OUTCOME_DECAY: f64 = 0.8;

/// What a failed attempt adds to its own duration as a latency sample: a failure costs
/// the client at least a retry elsewhere, so a target that fails fast must not look fast.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// A target's recent record.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TargetStats {
    /// Moving average of attempt latency in milliseconds; `None` before the first sample.
    pub latency_ms: Option<f64>,
    /// Fading count of healthy answers.
    pub successes: f64,
    /// Fading count of failures (connection errors, timeouts, 429, 5xx).
    pub failures: f64,
}

impl TargetStats {
    /// Adds one latency sample to the moving average.
    pub fn observe_latency(&mut self, latency: Duration) {
        let ms = latency.as_secs_f64() * 1e3;
        self.latency_ms = Some(match self.latency_ms {
            None => ms,
            Some(avg) => avg + EWMA_ALPHA * (ms - avg),
        });
    }

    /// Records a failed attempt that took `elapsed`: a failure in the tally and a latency
    /// sample of `elapsed` plus [`FAILURE_PENALTY`].
    pub fn observe_failure(&mut self, elapsed: Duration) {
        self.observe_outcome(false);
        self.observe_latency(elapsed + FAILURE_PENALTY);
    }

    /// Adds one outcome to the tally, fading the older ones.
    pub fn observe_outcome(&mut self, success: bool) {
        self.successes *= OUTCOME_DECAY;
        self.failures *= OUTCOME_DECAY;
        if success {
            self.successes += 1.0;
        } else {
            self.failures += 1.0;
        }
    }

    /// A draw from the Beta(1 + successes, 1 + failures) posterior of the success rate
    /// (uniform prior).
    pub fn sample_success_rate(&self, rng: &mut fastrand::Rng) -> f64 {
        sample_beta(1.0 + self.successes, 1.0 + self.failures, rng)
    }
}

/// One target's record here and, with Redis, the other replicas' view of it.
#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    local: Option<TargetStats>,
    /// The other replicas' records: latency averaged, tallies summed.
    remote: Option<TargetStats>,
    /// How many replicas `remote` stands for.
    replicas: u32,
}

impl Entry {
    /// Local and remote records merged: latency averaged over replicas, tallies summed.
    fn merged(&self) -> Option<TargetStats> {
        match (self.local, self.remote) {
            (None, None) => None,
            (Some(s), None) | (None, Some(s)) => Some(s),
            (Some(l), Some(r)) => {
                let k = f64::from(self.replicas.max(1));
                let latency_ms = match (l.latency_ms, r.latency_ms) {
                    (Some(a), Some(b)) => Some((a + b * k) / (1.0 + k)),
                    (a, b) => a.or(b),
                };
                Some(TargetStats {
                    latency_ms,
                    successes: l.successes + r.successes,
                    failures: l.failures + r.failures,
                })
            }
        }
    }
}

/// Statistics of every target, by `route#provider#model`.
#[derive(Debug, Default)]
pub struct TargetStatsStore {
    map: Mutex<HashMap<String, Entry>>,
}

impl TargetStatsStore {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record of a target (this replica's merged with the others' when shared), if
    /// any attempt went to it.
    pub fn get(&self, route: &str, provider: &str, model: &str) -> Option<TargetStats> {
        self.lock()
            .get(&key(route, provider, model))
            .and_then(Entry::merged)
    }

    /// Updates a target's record and returns the new one. The lock is held only for the
    /// arithmetic, never across an await.
    pub fn update(
        &self,
        route: &str,
        provider: &str,
        model: &str,
        change: impl FnOnce(&mut TargetStats),
    ) -> TargetStats {
        let mut map = self.lock();
        let stats = map
            .entry(key(route, provider, model))
            .or_default()
            .local
            .get_or_insert_with(TargetStats::default);
        change(stats);
        *stats
    }

    /// This replica's own records, by target key.
    fn local(&self) -> Vec<(String, TargetStats)> {
        self.lock()
            .iter()
            .filter_map(|(k, e)| e.local.map(|s| (k.clone(), s)))
            .collect()
    }

    /// Replaces the other replicas' view: `(target key, record, replicas)`. Targets absent
    /// from `remote` lose their remote part (their reports expired).
    fn set_remote(&self, remote: HashMap<String, (TargetStats, u32)>) {
        let mut map = self.lock();
        for entry in map.values_mut() {
            entry.remote = None;
            entry.replicas = 0;
        }
        for (k, (stats, replicas)) in remote {
            let entry = map.entry(k).or_default();
            entry.remote = Some(stats);
            entry.replicas = replicas;
        }
        map.retain(|_, e| e.local.is_some() || e.remote.is_some());
    }
}

/// Redis hash holding every replica's records, field `<target key>|<instance>`, value
/// `<latency ms or empty> <successes> <failures> <unix ms>`.
pub const SHARED_KEY: &str = "tollgate:{routing}:targets";
/// How often records are published and read back.
pub const SHARE_EVERY: Duration = Duration::from_secs(1);
/// Reports older than this are ignored and removed (a replica that went away).
pub const FORGET_AFTER: Duration = Duration::from_secs(30);

fn encode(stats: &TargetStats, now_ms: i64) -> String {
    format!(
        "{} {} {} {now_ms}",
        stats
            .latency_ms
            .map(|l| format!("{l:.3}"))
            .unwrap_or_default(),
        stats.successes,
        stats.failures
    )
}

fn decode(value: &str) -> Option<(TargetStats, i64)> {
    let mut parts = value.split(' ');
    let latency = parts.next()?;
    let stats = TargetStats {
        latency_ms: if latency.is_empty() {
            None
        } else {
            Some(latency.parse().ok()?)
        },
        successes: parts.next()?.parse().ok()?,
        failures: parts.next()?.parse().ok()?,
    };
    Some((stats, parts.next()?.parse().ok()?))
}

/// Merges the other replicas' fresh reports (`fields` of [`SHARED_KEY`]) per target,
/// skipping `instance`'s own; returns the merged view and the stale fields to remove.
fn merge_reports(
    fields: HashMap<String, String>,
    instance: &str,
    now_ms: i64,
) -> (HashMap<String, (TargetStats, u32)>, Vec<String>) {
    let mut merged: HashMap<String, (TargetStats, u32, f64, u32)> = HashMap::new();
    let mut stale = Vec::new();
    for (field, value) in fields {
        let Some((target, owner)) = field.rsplit_once('|') else {
            stale.push(field);
            continue;
        };
        let Some((stats, at)) = decode(&value) else {
            stale.push(field);
            continue;
        };
        if now_ms - at > FORGET_AFTER.as_millis() as i64 {
            stale.push(field);
            continue;
        }
        if owner == instance {
            continue;
        }
        let (sum, replicas, latency_sum, measured) = merged.entry(target.to_owned()).or_default();
        sum.successes += stats.successes;
        sum.failures += stats.failures;
        *replicas += 1;
        if let Some(l) = stats.latency_ms {
            *latency_sum += l;
            *measured += 1;
        }
    }
    let view = merged
        .into_iter()
        .map(|(k, (mut stats, replicas, latency_sum, measured))| {
            stats.latency_ms = (measured > 0).then(|| latency_sum / f64::from(measured));
            (k, (stats, replicas))
        })
        .collect();
    (view, stale)
}

/// Publishes this replica's records and reads the others' back, every [`SHARE_EVERY`],
/// forever. One pipelined round trip per period, bounded by `timeout`; when Redis fails
/// the remote view is dropped and routing uses local records only.
pub async fn share(
    store: std::sync::Arc<TargetStatsStore>,
    mut conn: tollgate_api::redis_conn::SharedConn,
    instance: String,
    timeout: Duration,
) {
    let mut tick = tokio::time::interval(SHARE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now_ms = jiff::Timestamp::now().as_millisecond();
        let local = store.local();
        let mut pipe = redis::pipe();
        for (k, stats) in &local {
            pipe.hset(SHARED_KEY, format!("{k}|{instance}"), encode(stats, now_ms))
                .ignore();
        }
        pipe.expire(SHARED_KEY, FORGET_AFTER.as_secs() as i64)
            .ignore()
            .hgetall(SHARED_KEY);
        let read = tokio::time::timeout(
            timeout,
            pipe.query_async::<(HashMap<String, String>,)>(&mut conn),
        )
        .await;
        let fields = match read {
            Ok(Ok((fields,))) => fields,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "sharing routing statistics failed; local ones only");
                store.set_remote(HashMap::new());
                continue;
            }
            Err(_) => {
                tracing::debug!("sharing routing statistics timed out; local ones only");
                store.set_remote(HashMap::new());
                continue;
            }
        };
        let (view, stale) = merge_reports(fields, &instance, now_ms);
        store.set_remote(view);
        if !stale.is_empty() {
            let removed = tokio::time::timeout(
                timeout,
                redis::cmd("HDEL")
                    .arg(SHARED_KEY)
                    .arg(&stale)
                    .query_async::<i64>(&mut conn),
            )
            .await;
            if !matches!(removed, Ok(Ok(_))) {
                tracing::debug!("could not remove stale routing statistics");
            }
        }
    }
}

fn key(route: &str, provider: &str, model: &str) -> String {
    format!("{route}#{provider}#{model}")
}

/// Standard normal draw (Box–Muller).
fn sample_normal(rng: &mut fastrand::Rng) -> f64 {
    // 1 - f64() lies in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - rng.f64();
    let u2 = rng.f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Gamma(shape, 1) draw by Marsaglia and Tsang's method; shapes below 1 are boosted with
/// `Gamma(a) = Gamma(a + 1) * U^(1/a)`.
pub fn sample_gamma(shape: f64, rng: &mut fastrand::Rng) -> f64 {
    if shape < 1.0 {
        let u = 1.0 - rng.f64();
        return sample_gamma(shape + 1.0, rng) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = sample_normal(rng);
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        let u = 1.0 - rng.f64();
        if u < 1.0 - 0.0331 * x.powi(4) || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
            return d * v;
        }
    }
}

/// Beta(a, b) draw from two Gamma draws: `X / (X + Y)`.
pub fn sample_beta(a: f64, b: f64, rng: &mut fastrand::Rng) -> f64 {
    let x = sample_gamma(a, rng);
    let y = sample_gamma(b, rng);
    if x + y == 0.0 { 0.5 } else { x / (x + y) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_and_variance(samples: &[f64]) -> (f64, f64) {
        let n = samples.len() as f64;
        let mean = samples.iter().sum::<f64>() / n;
        let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var)
    }

    #[test]
    fn the_latency_average_starts_at_the_first_sample_and_moves_by_alpha() {
        let mut s = TargetStats::default();
        s.observe_latency(Duration::from_millis(100));
        assert_eq!(s.latency_ms, Some(100.0));
        s.observe_latency(Duration::from_millis(200));
        assert!((s.latency_ms.unwrap() - 140.0).abs() < 1e-9);
        // A lasting change dominates within a handful of samples.
        for _ in 0..8 {
            s.observe_latency(Duration::from_millis(10));
        }
        assert!(s.latency_ms.unwrap() < 12.5, "{:?}", s.latency_ms);
    }

    #[test]
    fn a_fast_failure_counts_as_slow() {
        let mut s = TargetStats::default();
        s.observe_latency(Duration::from_millis(10));
        s.observe_failure(Duration::from_millis(1));
        assert!(s.latency_ms.unwrap() > 400.0, "{:?}", s.latency_ms);
        assert_eq!(s.failures, 1.0);
    }

    #[test]
    fn old_outcomes_fade_so_a_recovered_target_regains_its_rate() {
        let mut s = TargetStats::default();
        for _ in 0..50 {
            s.observe_outcome(false);
        }
        assert!(
            s.failures <= 1.0 / (1.0 - OUTCOME_DECAY) + 1e-9,
            "bounded memory"
        );
        assert_eq!(s.successes, 0.0);
        let mean = |s: &TargetStats| (1.0 + s.successes) / (2.0 + s.successes + s.failures);
        assert!(mean(&s) < 0.2, "after failures: {}", mean(&s));
        for _ in 0..10 {
            s.observe_outcome(true);
        }
        assert!(mean(&s) > 0.75, "after successes: {}", mean(&s));
    }

    #[test]
    fn gamma_draws_have_the_right_mean_and_variance() {
        let mut rng = fastrand::Rng::with_seed(11);
        for shape in [0.5, 1.0, 2.5, 9.0] {
            let draws: Vec<f64> = (0..40_000).map(|_| sample_gamma(shape, &mut rng)).collect();
            assert!(draws.iter().all(|x| x.is_finite() && *x >= 0.0));
            let (mean, var) = mean_and_variance(&draws);
            assert!(
                (mean - shape).abs() < 0.05 * shape.max(1.0),
                "{shape}: mean {mean}"
            );
            assert!(
                (var - shape).abs() < 0.1 * shape.max(1.0),
                "{shape}: var {var}"
            );
        }
    }

    #[test]
    fn beta_draws_have_the_right_mean_and_variance() {
        let mut rng = fastrand::Rng::with_seed(5);
        for (a, b) in [(1.0, 1.0), (2.0, 8.0), (6.0, 1.5)] {
            let draws: Vec<f64> = (0..40_000).map(|_| sample_beta(a, b, &mut rng)).collect();
            assert!(draws.iter().all(|x| (0.0..=1.0).contains(x)));
            let (mean, var) = mean_and_variance(&draws);
            let want_mean = a / (a + b);
            let want_var = a * b / ((a + b).powi(2) * (a + b + 1.0));
            assert!((mean - want_mean).abs() < 0.01, "{a},{b}: mean {mean}");
            assert!(
                (var - want_var).abs() < 0.1 * want_var,
                "{a},{b}: var {var}"
            );
        }
    }

    #[test]
    fn beta_draws_are_deterministic_under_a_fixed_seed() {
        let draw = |seed| {
            let mut rng = fastrand::Rng::with_seed(seed);
            (0..5)
                .map(|_| sample_beta(3.0, 2.0, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn other_replicas_reports_are_merged_and_stale_ones_dropped() {
        let now = 100_000_000;
        let slow = TargetStats {
            latency_ms: Some(300.0),
            successes: 2.0,
            failures: 1.0,
        };
        let fast = TargetStats {
            latency_ms: Some(100.0),
            successes: 3.0,
            failures: 0.0,
        };
        let fields = HashMap::from([
            ("r#a#m|one".to_owned(), encode(&slow, now - 500)),
            ("r#a#m|two".to_owned(), encode(&fast, now - 500)),
            ("r#a#m|me".to_owned(), encode(&fast, now)),
            ("r#b#m|gone".to_owned(), encode(&fast, now - 60_000)),
            ("garbage".to_owned(), "x".to_owned()),
        ]);
        let (view, mut stale) = merge_reports(fields, "me", now);
        stale.sort();
        assert_eq!(stale, ["garbage", "r#b#m|gone"]);
        assert_eq!(view.len(), 1);
        let (merged, replicas) = view["r#a#m"];
        assert_eq!(replicas, 2);
        assert_eq!(merged.latency_ms, Some(200.0));
        assert_eq!((merged.successes, merged.failures), (5.0, 1.0));

        // Locally the remote view fills in for a target never tried here, and is
        // averaged with this replica's own record otherwise.
        let store = TargetStatsStore::default();
        store.update("r", "b", "m", |s| {
            s.observe_latency(Duration::from_millis(50))
        });
        store.set_remote(HashMap::from([
            ("r#a#m".to_owned(), (merged, replicas)),
            ("r#b#m".to_owned(), (fast, 1)),
        ]));
        assert_eq!(store.get("r", "a", "m").unwrap().latency_ms, Some(200.0));
        assert_eq!(store.get("r", "b", "m").unwrap().latency_ms, Some(75.0));
        // A Redis failure drops the remote part; local records stay.
        store.set_remote(HashMap::new());
        assert_eq!(store.get("r", "a", "m"), None);
        assert_eq!(store.get("r", "b", "m").unwrap().latency_ms, Some(50.0));
    }

    #[test]
    fn the_store_keeps_one_record_per_route_provider_and_model() {
        let store = TargetStatsStore::default();
        assert_eq!(store.get("r", "p", "m"), None);
        store.update("r", "p", "m", |s| s.observe_outcome(true));
        store.update("r", "p", "other", |s| s.observe_outcome(false));
        assert_eq!(store.get("r", "p", "m").unwrap().successes, 1.0);
        assert_eq!(store.get("r", "p", "other").unwrap().failures, 1.0);
    }
}
