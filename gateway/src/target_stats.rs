//! What the gateway has recently seen of each upstream target (route, provider and
//! model): a moving average of latency and a fading success/failure tally, the inputs of
//! the `leastLatency` and `adaptive` routing strategies. Kept in process (like circuit
//! breakers it outlives configuration reloads); with Redis, [`share`] publishes each
//! replica's records and reads the other replicas' back, off the request path.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, OnceLock, atomic::AtomicU64},
    time::{Duration, Instant},
};

use prometheus_client::metrics::gauge::Gauge;

use tollgate_api::v1alpha1::StrategyOptions;

use crate::metrics::{Metrics, RouteTargetLabels};

/// What a failed attempt adds to its own duration as a latency sample: a failure costs
/// the client at least a retry elsewhere, so a target that fails fast must not look fast.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// A target's recent record. How fast its past fades is the route's
/// [`StrategyOptions::memory`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TargetStats {
    /// Moving average of the time to the first token of streams, in milliseconds;
    /// `None` before the first sample.
    pub first_token_ms: Option<f64>,
    /// Moving average of the total time of whole answers and of completed streams, in
    /// milliseconds; `None` before the first sample.
    pub total_ms: Option<f64>,
    /// Fading count of healthy answers.
    pub successes: f64,
    /// Fading count of failures (connection errors, timeouts, 429, 5xx, broken streams).
    pub failures: f64,
}

/// Which latency a request is judged by: what its client waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latency {
    /// Time to the first token (streamed requests).
    FirstToken,
    /// Time to the whole answer.
    Total,
}

impl Latency {
    /// The measure a request of this kind is ranked by.
    pub fn of_request(stream: bool) -> Self {
        if stream {
            Self::FirstToken
        } else {
            Self::Total
        }
    }

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FirstToken => "first_token",
            Self::Total => "total",
        }
    }
}

fn ewma(average: &mut Option<f64>, sample: Duration, alpha: f64) {
    let ms = sample.as_secs_f64() * 1e3;
    *average = Some(match *average {
        None => ms,
        Some(avg) => avg + alpha * (ms - avg),
    });
}

impl TargetStats {
    /// The moving average of `which`, if measured.
    pub fn latency_ms(&self, which: Latency) -> Option<f64> {
        match which {
            Latency::FirstToken => self.first_token_ms,
            Latency::Total => self.total_ms,
        }
    }

    /// Adds one latency sample of `which` to its moving average.
    pub fn observe_latency(
        &mut self,
        which: Latency,
        latency: Duration,
        options: &StrategyOptions,
    ) {
        let average = match which {
            Latency::FirstToken => &mut self.first_token_ms,
            Latency::Total => &mut self.total_ms,
        };
        ewma(average, latency, options.ewma_alpha());
    }

    /// Records a failed attempt that took `elapsed`: a failure in the tally and a sample
    /// of `elapsed` plus [`FAILURE_PENALTY`] in both averages. A stream that broke after a
    /// fast first token counts too: its client got no answer, and `leastLatency`, which
    /// has no tally, must not keep choosing a target that breaks every stream.
    pub fn observe_failure(&mut self, elapsed: Duration, options: &StrategyOptions) {
        self.observe_outcome(false, options);
        let sample = elapsed + FAILURE_PENALTY;
        self.observe_latency(Latency::FirstToken, sample, options);
        self.observe_latency(Latency::Total, sample, options);
    }

    /// Adds one outcome to the tally, fading the older ones.
    pub fn observe_outcome(&mut self, success: bool, options: &StrategyOptions) {
        let decay = options.outcome_decay();
        self.successes *= decay;
        self.failures *= decay;
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
                let average = |a: Option<f64>, b: Option<f64>| match (a, b) {
                    (Some(a), Some(b)) => Some((a + b * k) / (1.0 + k)),
                    (a, b) => a.or(b),
                };
                Some(TargetStats {
                    first_token_ms: average(l.first_token_ms, r.first_token_ms),
                    total_ms: average(l.total_ms, r.total_ms),
                    successes: l.successes + r.successes,
                    failures: l.failures + r.failures,
                })
            }
        }
    }
}

/// One route target's record, handed out once per configuration load
/// ([`crate::targets::ResolvedTarget`]) and kept by the store across reloads.
#[derive(Debug)]
pub struct Slot {
    labels: RouteTargetLabels,
    entry: Mutex<Entry>,
    /// Its latency gauges, taken from the registry at the first record.
    gauges: OnceLock<[Gauge<f64, AtomicU64>; 2]>,
}

impl Slot {
    fn new(route: &str, provider: &str, model: &str) -> Self {
        Self {
            labels: RouteTargetLabels {
                route: route.to_owned(),
                provider: provider.to_owned(),
                model: model.to_owned(),
                latency: Latency::Total.as_str(),
            },
            entry: Mutex::default(),
            gauges: OnceLock::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entry> {
        self.entry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record (this replica's merged with the others' when shared), if any attempt
    /// went to the target.
    pub fn get(&self) -> Option<TargetStats> {
        self.lock().merged()
    }

    /// Updates this replica's record and returns the new one. The lock is held only for
    /// the arithmetic, never across an await.
    pub fn update(&self, change: impl FnOnce(&mut TargetStats)) -> TargetStats {
        let mut entry = self.lock();
        let stats = entry.local.get_or_insert_with(TargetStats::default);
        change(stats);
        *stats
    }

    /// Updates the record and mirrors its latency averages into
    /// `tollgate_target_latency_ewma_seconds`.
    pub fn record(&self, metrics: &Metrics, change: impl FnOnce(&mut TargetStats)) {
        let stats = self.update(change);
        let gauges = self.gauges.get_or_init(|| {
            [Latency::FirstToken, Latency::Total].map(|which| {
                metrics
                    .target_latency
                    .get_or_create(&RouteTargetLabels {
                        latency: which.as_str(),
                        ..self.labels.clone()
                    })
                    .clone()
            })
        });
        for (which, gauge) in [Latency::FirstToken, Latency::Total].iter().zip(gauges) {
            if let Some(ms) = stats.latency_ms(*which) {
                gauge.set(ms / 1e3);
            }
        }
    }
}

/// Statistics of every target, by `route#provider#model` (the key only matters when
/// slots are handed out and when records are shared with other replicas).
#[derive(Debug, Default)]
pub struct TargetStatsStore {
    map: Mutex<HashMap<String, Arc<Slot>>>,
}

impl TargetStatsStore {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The slot of a target, created empty on first use.
    pub fn slot(&self, route: &str, provider: &str, model: &str) -> Arc<Slot> {
        self.lock()
            .entry(key(route, provider, model))
            .or_insert_with(|| Arc::new(Slot::new(route, provider, model)))
            .clone()
    }

    /// The record of a target, if any attempt went to it (tests).
    pub fn get(&self, route: &str, provider: &str, model: &str) -> Option<TargetStats> {
        self.lock()
            .get(&key(route, provider, model))
            .and_then(|s| s.get())
    }

    /// This replica's own records, by target key.
    fn local(&self) -> Vec<(String, TargetStats)> {
        self.lock()
            .iter()
            .filter_map(|(k, s)| s.lock().local.map(|l| (k.clone(), l)))
            .collect()
    }

    /// Replaces the other replicas' view: `(target key, record, replicas)`. Targets absent
    /// from `remote` lose their remote part (their reports expired). Slots nobody holds
    /// and nothing is known of are forgotten.
    fn set_remote(&self, remote: HashMap<String, (TargetStats, u32)>) {
        let mut map = self.lock();
        for slot in map.values() {
            let mut entry = slot.lock();
            entry.remote = None;
            entry.replicas = 0;
        }
        for (k, (stats, replicas)) in remote {
            let slot = map.entry(k).or_insert_with_key(|k| {
                let mut parts = k.splitn(3, '#');
                let mut part = || parts.next().unwrap_or_default();
                let (route, provider, model) = (part(), part(), part());
                Arc::new(Slot::new(route, provider, model))
            });
            let mut entry = slot.lock();
            entry.remote = Some(stats);
            entry.replicas = replicas;
        }
        map.retain(|_, s| {
            let e = s.lock();
            Arc::strong_count(s) > 1 || e.local.is_some() || e.remote.is_some()
        });
    }
}

/// Redis hash holding every replica's records, field `<target key>|<instance>`, value
/// `<first-token ms> <total ms> <successes> <failures> <unix ms>` (an average not yet
/// measured is empty).
pub const SHARED_KEY: &str = "tollgate:{routing}:targets";
/// How often records are published and read back.
pub const SHARE_EVERY: Duration = Duration::from_secs(1);
/// Reports older than this are ignored and removed (a replica that went away).
pub const FORGET_AFTER: Duration = Duration::from_secs(30);

fn encode(stats: &TargetStats, now_ms: i64) -> String {
    let ms = |v: Option<f64>| v.map(|l| format!("{l:.3}")).unwrap_or_default();
    format!(
        "{} {} {} {} {now_ms}",
        ms(stats.first_token_ms),
        ms(stats.total_ms),
        stats.successes,
        stats.failures
    )
}

fn decode(value: &str) -> Option<(TargetStats, i64)> {
    let mut parts = value.split(' ');
    let mut ms = || -> Option<Option<f64>> {
        let part = parts.next()?;
        if part.is_empty() {
            Some(None)
        } else {
            part.parse().ok().filter(|v: &f64| v.is_finite()).map(Some)
        }
    };
    let first_token_ms = ms()?;
    let total_ms = ms()?;
    let mut count = || -> Option<f64> {
        parts
            .next()?
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
    };
    let stats = TargetStats {
        first_token_ms,
        total_ms,
        successes: count()?,
        failures: count()?,
    };
    let at = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((stats, at))
}

/// Sums of the other replicas' reports of one target.
#[derive(Default)]
struct Reports {
    stats: TargetStats,
    replicas: u32,
    first_token: (f64, u32),
    total: (f64, u32),
}

/// Merges the other replicas' fresh reports (`fields` of [`SHARED_KEY`]) per target,
/// skipping `instance`'s own; returns the merged view (latency averaged over the
/// replicas that measured it, tallies summed) and the stale fields to remove.
fn merge_reports(
    fields: HashMap<String, String>,
    instance: &str,
    now_ms: i64,
) -> (HashMap<String, (TargetStats, u32)>, Vec<String>) {
    let mut merged: HashMap<String, Reports> = HashMap::new();
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
        let sum = merged.entry(target.to_owned()).or_default();
        sum.stats.successes += stats.successes;
        sum.stats.failures += stats.failures;
        sum.replicas += 1;
        for (average, (total, measured)) in [
            (stats.first_token_ms, &mut sum.first_token),
            (stats.total_ms, &mut sum.total),
        ] {
            if let Some(ms) = average {
                *total += ms;
                *measured += 1;
            }
        }
    }
    let mean = |(total, n): (f64, u32)| (n > 0).then(|| total / f64::from(n));
    let view = merged
        .into_iter()
        .map(|(k, mut sum)| {
            sum.stats.first_token_ms = mean(sum.first_token);
            sum.stats.total_ms = mean(sum.total);
            (k, (sum.stats, sum.replicas))
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

/// What a relayed stream reports back to routing: its first token, then how it ended.
/// A stream the client abandons reports no outcome (the target did nothing wrong).
#[derive(Debug)]
pub struct StreamFeedback {
    /// The target's record.
    pub slot: Arc<Slot>,
    /// Where the latency gauges are.
    pub metrics: Arc<Metrics>,
    /// The route's tuning.
    pub options: StrategyOptions,
    /// When the attempt started.
    pub started: Instant,
    /// Whether a token has been relayed.
    pub first_token_seen: bool,
}

impl StreamFeedback {
    fn record(&self, change: impl FnOnce(&mut TargetStats)) {
        self.slot.record(&self.metrics, change);
    }

    /// The first token was relayed: a first-token sample.
    pub fn first_token(&mut self) {
        if std::mem::replace(&mut self.first_token_seen, true) {
            return;
        }
        let (elapsed, options) = (self.started.elapsed(), self.options);
        self.record(|s| s.observe_latency(Latency::FirstToken, elapsed, &options));
    }

    /// The upstream finished the stream: a success and a total-latency sample.
    pub fn completed(self) {
        let (elapsed, options) = (self.started.elapsed(), self.options);
        self.record(|s| {
            s.observe_outcome(true, &options);
            s.observe_latency(Latency::Total, elapsed, &options);
        });
    }

    /// The upstream broke the stream (reset, silence, malformed events): a failure.
    pub fn failed(self) {
        let (elapsed, options) = (self.started.elapsed(), self.options);
        self.record(|s| s.observe_failure(elapsed, &options));
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

    const DEFAULTS: StrategyOptions = StrategyOptions {
        exploration_percent: 10,
        memory: 5,
        latency_weight: 50,
        cost_weight: 0,
    };

    #[test]
    fn the_latency_average_starts_at_the_first_sample_and_moves_by_alpha() {
        assert_eq!(DEFAULTS, StrategyOptions::default());
        let mut s = TargetStats::default();
        s.observe_latency(Latency::Total, Duration::from_millis(100), &DEFAULTS);
        assert_eq!(s.total_ms, Some(100.0));
        assert_eq!(s.first_token_ms, None, "the other average is untouched");
        // memory 5: a new sample weighs 2/6.
        s.observe_latency(Latency::Total, Duration::from_millis(400), &DEFAULTS);
        assert!(
            (s.total_ms.unwrap() - 200.0).abs() < 1e-9,
            "{:?}",
            s.total_ms
        );
        // A lasting change dominates within a handful of samples.
        for _ in 0..10 {
            s.observe_latency(Latency::Total, Duration::from_millis(10), &DEFAULTS);
        }
        assert!(s.total_ms.unwrap() < 14.0, "{:?}", s.total_ms);
        // A shorter memory reacts faster; memory 1 keeps only the last sample.
        let quick = StrategyOptions {
            memory: 1,
            ..DEFAULTS
        };
        s.observe_latency(Latency::Total, Duration::from_millis(70), &quick);
        assert_eq!(s.total_ms, Some(70.0));
    }

    #[test]
    fn first_token_and_total_latency_are_kept_apart() {
        let mut s = TargetStats::default();
        s.observe_latency(Latency::FirstToken, Duration::from_millis(30), &DEFAULTS);
        s.observe_latency(Latency::Total, Duration::from_millis(900), &DEFAULTS);
        assert_eq!(s.latency_ms(Latency::FirstToken), Some(30.0));
        assert_eq!(s.latency_ms(Latency::Total), Some(900.0));
        assert_eq!(Latency::of_request(true), Latency::FirstToken);
        assert_eq!(Latency::of_request(false), Latency::Total);
    }

    #[test]
    fn a_fast_failure_counts_as_slow() {
        let mut s = TargetStats::default();
        s.observe_latency(Latency::FirstToken, Duration::from_millis(10), &DEFAULTS);
        s.observe_latency(Latency::Total, Duration::from_millis(10), &DEFAULTS);
        s.observe_failure(Duration::from_millis(1), &DEFAULTS);
        assert!(s.first_token_ms.unwrap() > 300.0, "{:?}", s.first_token_ms);
        assert!(s.total_ms.unwrap() > 300.0, "{:?}", s.total_ms);
        assert_eq!(s.failures, 1.0);
        // A stream that broke after a fast first token: slow in both, not only in total.
        let mut s = TargetStats::default();
        s.observe_latency(Latency::FirstToken, Duration::from_millis(10), &DEFAULTS);
        s.observe_failure(Duration::from_millis(200), &DEFAULTS);
        assert!((s.first_token_ms.unwrap() - 406.666).abs() < 0.01, "{s:?}");
        assert_eq!(s.total_ms, Some(1_200.0));
    }

    #[test]
    fn old_outcomes_fade_so_a_recovered_target_regains_its_rate() {
        for memory in [2, 5, 20] {
            let options = StrategyOptions { memory, ..DEFAULTS };
            let mut s = TargetStats::default();
            for _ in 0..200 {
                s.observe_outcome(false, &options);
            }
            assert!(
                s.failures <= f64::from(memory) + 1e-9,
                "memory {memory}: bounded by it, {}",
                s.failures
            );
            assert_eq!(s.successes, 0.0);
            let mean = |s: &TargetStats| (1.0 + s.successes) / (2.0 + s.successes + s.failures);
            assert!(
                mean(&s) < 0.35,
                "memory {memory}: after failures {}",
                mean(&s)
            );
            // About twice the memory in successes brings the rate back up.
            for _ in 0..2 * memory {
                s.observe_outcome(true, &options);
            }
            assert!(
                mean(&s) > 0.7,
                "memory {memory}: after successes {}",
                mean(&s)
            );
        }
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
            first_token_ms: None,
            total_ms: Some(300.0),
            successes: 2.0,
            failures: 1.0,
        };
        let fast = TargetStats {
            first_token_ms: Some(40.0),
            total_ms: Some(100.0),
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
        assert_eq!(merged.total_ms, Some(200.0));
        assert_eq!(
            merged.first_token_ms,
            Some(40.0),
            "averaged over the replicas that measured it"
        );
        assert_eq!((merged.successes, merged.failures), (5.0, 1.0));

        // Locally the remote view fills in for a target never tried here, and is
        // averaged with this replica's own record otherwise.
        let store = TargetStatsStore::default();
        store
            .slot("r", "b", "m")
            .update(|s| s.observe_latency(Latency::Total, Duration::from_millis(50), &DEFAULTS));
        store.set_remote(HashMap::from([
            ("r#a#m".to_owned(), (merged, replicas)),
            ("r#b#m".to_owned(), (fast, 1)),
        ]));
        assert_eq!(store.get("r", "a", "m").unwrap().total_ms, Some(200.0));
        assert_eq!(store.get("r", "b", "m").unwrap().total_ms, Some(75.0));
        assert_eq!(store.get("r", "b", "m").unwrap().first_token_ms, Some(40.0));
        // A Redis failure drops the remote part; local records stay.
        store.set_remote(HashMap::new());
        assert_eq!(store.get("r", "a", "m"), None);
        assert_eq!(store.get("r", "b", "m").unwrap().total_ms, Some(50.0));
    }

    #[test]
    fn the_store_keeps_one_record_per_route_provider_and_model() {
        let store = TargetStatsStore::default();
        assert_eq!(store.get("r", "p", "m"), None);
        store
            .slot("r", "p", "m")
            .update(|s| s.observe_outcome(true, &DEFAULTS));
        store
            .slot("r", "p", "other")
            .update(|s| s.observe_outcome(false, &DEFAULTS));
        assert_eq!(store.get("r", "p", "m").unwrap().successes, 1.0);
        assert_eq!(store.get("r", "p", "other").unwrap().failures, 1.0);
    }

    #[test]
    fn records_survive_encoding_and_malformed_ones_are_refused() {
        let stats = TargetStats {
            first_token_ms: None,
            total_ms: Some(12.5),
            successes: 1.5,
            failures: 0.25,
        };
        assert_eq!(decode(&encode(&stats, 42)), Some((stats, 42)));
        for bad in [
            "",
            "1 2 3 4",
            "1 2 3 4 5 6",
            "x 2 3 4 5",
            "1 2 -3 4 5",
            "1 2 NaN 4 5",
            "inf 2 3 4 5",
            "1 2 3 4 x",
        ] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }
}
