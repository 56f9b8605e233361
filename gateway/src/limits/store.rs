//! The limits store the gateway uses: in process, or shared through Redis with a failure
//! mode for when Redis is unreachable (`failOpen`: the in-process limiter takes over per
//! replica; `failClosed`: requests that need a limit decision get 503).

use std::{
    collections::HashMap,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use clap::ValueEnum;

use super::{
    Ask, LocalLimits, Quota, Rejection, Reservation, UsageTotals, budget_slot,
    redis::{RedisLimits, SharedReservation, StoreError},
};

/// What to do when Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailureMode {
    /// Keep serving with in-process limits (per replica) until Redis is back.
    #[value(name = "failOpen")]
    FailOpen,
    /// Refuse requests that need a limit decision with 503.
    #[value(name = "failClosed")]
    FailClosed,
}

impl FailureMode {
    /// The name used in flags and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FailOpen => "failOpen",
            Self::FailClosed => "failClosed",
        }
    }
}

/// A reservation in whichever store admitted it.
#[derive(Debug, Clone)]
pub enum AnyReservation {
    /// In process.
    Local(Reservation),
    /// In Redis.
    Shared(SharedReservation),
}

/// Why admission did not happen.
#[derive(Debug)]
pub enum AdmitError {
    /// A limit or budget refused the request.
    Rejected(Rejection),
    /// Redis is unreachable and the failure mode is `failClosed`.
    Unavailable,
}

/// The store.
#[derive(Debug)]
pub struct Limits {
    local: LocalLimits,
    shared: Option<RedisLimits>,
    mode: FailureMode,
    /// Whether the last Redis call succeeded (for `/readyz`, metrics and transition logs).
    redis_up: AtomicBool,
    /// Usage on its way to Redis (started with the first answer).
    usage: OnceLock<tokio::sync::mpsc::UnboundedSender<UsageMsg>>,
    /// Usage counted in process when there is no Redis (for `/v1/usage`).
    local_usage: std::sync::Mutex<LocalUsage>,
}

/// Usage per key and period (day, month, `total`) of a gateway without Redis. Periods
/// older than the previous day and month are dropped when the day changes.
#[derive(Debug, Default)]
struct LocalUsage {
    day: String,
    counters: HashMap<(String, String), UsageTotals>,
}

impl LocalUsage {
    fn add(&mut self, key_id: &str, totals: UsageTotals, now: jiff::Timestamp) {
        let (day, month) = tollgate_api::usage::periods(now);
        if self.day != day {
            let keep = [
                day.clone(),
                month.clone(),
                previous_period(&day),
                previous_period(&month),
                tollgate_api::usage::TOTAL.to_owned(),
            ];
            self.counters.retain(|(_, p), _| keep.contains(p));
            self.day.clone_from(&day);
        }
        for period in [day, month, tollgate_api::usage::TOTAL.to_owned()] {
            self.counters
                .entry((key_id.to_owned(), period))
                .or_default()
                .add(totals);
        }
    }
}

/// The period before a day (`2026-11-01` → `2026-10-31`) or month (`2026-11` →
/// `2026-10`) id; `total` has none and gives itself back.
pub fn previous_period(id: &str) -> String {
    if let Ok(date) = id.parse::<jiff::civil::Date>() {
        return date
            .yesterday()
            .map_or_else(|_| id.to_owned(), |d| d.to_string());
    }
    if let Ok(date) = format!("{id}-01").parse::<jiff::civil::Date>() {
        return date.checked_sub(jiff::Span::new().months(1)).map_or_else(
            |_| id.to_owned(),
            |d| format!("{:04}-{:02}", d.year(), d.month()),
        );
    }
    id.to_owned()
}

/// How often usage counters are written to Redis: requests of the same key within one
/// interval cost one pipelined write, whatever the request rate.
pub const USAGE_FLUSH_INTERVAL: Duration = Duration::from_millis(250);

/// To the usage writer.
#[derive(Debug)]
enum UsageMsg {
    /// One answered request.
    Add {
        key_id: String,
        /// UTC day (`YYYY-MM-DD`) it was answered on.
        day: String,
        totals: UsageTotals,
    },
    /// Write everything now, then answer.
    Flush(tokio::sync::oneshot::Sender<()>),
}

impl Limits {
    /// In-process limits only.
    pub fn local() -> Self {
        Self {
            local: LocalLimits::default(),
            shared: None,
            mode: FailureMode::FailOpen,
            redis_up: AtomicBool::new(true),
            usage: OnceLock::new(),
            local_usage: Default::default(),
        }
    }

    /// Limits shared through Redis.
    pub fn shared(redis: RedisLimits, mode: FailureMode) -> Self {
        Self {
            local: LocalLimits::default(),
            shared: Some(redis),
            mode,
            redis_up: AtomicBool::new(true),
            usage: OnceLock::new(),
            local_usage: Default::default(),
        }
    }

    /// Whether Redis is configured, and if so whether it answered last time.
    pub fn redis_state(&self) -> Option<bool> {
        self.shared
            .as_ref()
            .map(|_| self.redis_up.load(Ordering::Relaxed))
    }

    /// The failure mode.
    pub fn mode(&self) -> FailureMode {
        self.mode
    }

    fn mark(&self, up: bool) {
        let was = self.redis_up.swap(up, Ordering::Relaxed);
        // One line per transition, never one per request.
        match (was, up) {
            (true, false) => {
                tracing::error!(mode = ?self.mode, "Redis unreachable: limits now follow the failure mode")
            }
            (false, true) => {
                tracing::info!("Redis reachable again: limits are shared across replicas")
            }
            _ => {}
        }
    }

    /// Checks and reserves every limit of `ask`.
    pub async fn admit(
        &self,
        ask: &Ask<'_>,
        reservation_id: &str,
    ) -> Result<(AnyReservation, Quota), AdmitError> {
        if let Some(redis) = &self.shared {
            match redis.admit(ask, reservation_id).await {
                Ok(Ok((r, q))) => {
                    self.mark(true);
                    return Ok((AnyReservation::Shared(r), q));
                }
                Ok(Err(rejection)) => {
                    self.mark(true);
                    return Err(AdmitError::Rejected(rejection));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "Redis admission failed");
                    self.mark(false);
                    if self.mode == FailureMode::FailClosed {
                        return Err(AdmitError::Unavailable);
                    }
                }
            }
        }
        self.local
            .admit(ask)
            .map(|(r, q)| (AnyReservation::Local(r), q))
            .map_err(AdmitError::Rejected)
    }

    /// Records an answered request in the shared usage counters (when Redis is
    /// configured). A background writer sums the requests of each key and writes them
    /// every [`USAGE_FLUSH_INTERVAL`]; what Redis refuses is kept and written once it is
    /// back, and shutdown flushes the rest ([`Limits::flush_usage`]).
    pub fn record_usage(self: &Arc<Self>, key_id: &str, input: u64, output: u64, spend: f64) {
        let totals = UsageTotals {
            requests: 1,
            input,
            output,
            spend,
        };
        let now = jiff::Timestamp::now();
        if self.shared.is_none() {
            self.local_usage
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .add(key_id, totals, now);
            return;
        }
        let Some(tx) = self.usage_writer() else {
            return;
        };
        let (day, _) = tollgate_api::usage::periods(now);
        let _ = tx.send(UsageMsg::Add {
            key_id: key_id.to_owned(),
            day,
            totals,
        });
    }

    /// A key's usage in each of `periods` (day, month or `total` ids): from Redis when it
    /// is configured (the counters every replica writes, as the operator reads them),
    /// else from this process.
    pub async fn usage(
        &self,
        key_id: &str,
        periods: &[String],
    ) -> Result<Vec<UsageTotals>, StoreError> {
        let Some(redis) = &self.shared else {
            let local = self.local_usage.lock().unwrap_or_else(|e| e.into_inner());
            return Ok(periods
                .iter()
                .map(|p| {
                    local
                        .counters
                        .get(&(key_id.to_owned(), p.clone()))
                        .copied()
                        .unwrap_or_default()
                })
                .collect());
        };
        let result = redis.usage(key_id, periods).await;
        self.mark(result.is_ok());
        Ok(result?.iter().map(UsageTotals::from_fields).collect())
    }

    /// Settled spend of a key in its current budget period, as admission counts it.
    pub async fn budget_spent(
        &self,
        key_id: &str,
        period: tollgate_api::v1alpha1::BudgetPeriod,
    ) -> Result<f64, StoreError> {
        match &self.shared {
            Some(redis) => {
                let result = redis.spent(key_id, period).await;
                self.mark(result.is_ok());
                result
            }
            None => Ok(self
                .local
                .spent(&budget_slot(key_id, period, jiff::Timestamp::now()).0)),
        }
    }

    /// Writes the usage not yet in Redis, waiting at most `deadline`.
    pub async fn flush_usage(&self, deadline: Duration) {
        let Some(tx) = self.usage.get() else {
            return;
        };
        let (done, wait) = tokio::sync::oneshot::channel();
        if tx.send(UsageMsg::Flush(done)).is_ok() {
            let _ = tokio::time::timeout(deadline, wait).await;
        }
    }

    fn usage_writer(self: &Arc<Self>) -> Option<&tokio::sync::mpsc::UnboundedSender<UsageMsg>> {
        if let Some(tx) = self.usage.get() {
            return Some(tx);
        }
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if self.usage.set(tx).is_ok() {
            // The writer holds a weak reference, so dropping the limits ends it.
            handle.spawn(write_usage(Arc::downgrade(self), rx));
        }
        self.usage.get()
    }

    /// Settles a reservation. Shared settlements run in the background so they never
    /// delay the response.
    pub fn settle(self: &Arc<Self>, reservation: AnyReservation, tokens: u64, cost: f64) {
        match reservation {
            AnyReservation::Local(r) => self.local.settle(&r, tokens, cost),
            AnyReservation::Shared(r) => {
                let this = self.clone();
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    handle.spawn(async move {
                        if let Some(redis) = &this.shared {
                            match redis.settle(&r, tokens, cost).await {
                                Ok(()) => this.mark(true),
                                Err(e) => {
                                    // The reservation's lease expires on its own.
                                    tracing::debug!(error = %e, "Redis settlement failed");
                                    this.mark(false);
                                }
                            }
                        }
                    });
                }
            }
        }
    }
}

/// A batch of one key's usage for one day, with the id that makes it count once.
#[derive(Debug)]
struct UsageBatch {
    id: String,
    /// The previous batch of the same counters, confirmed: its marker can go.
    confirmed: Option<String>,
    totals: UsageTotals,
}

/// The usage writer: sums usage per key and day, and writes it every
/// [`USAGE_FLUSH_INTERVAL`]. A batch that fails is retried with the same id (exactly
/// once, even when the failure was a timeout and the first try did apply); meanwhile new
/// usage of that key and day accumulates for the next batch, so an outage costs memory
/// per key, not per request.
async fn write_usage(
    limits: std::sync::Weak<Limits>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<UsageMsg>,
) {
    let mut pending: HashMap<(String, String), UsageTotals> = HashMap::new();
    let mut unconfirmed: HashMap<(String, String), UsageBatch> = HashMap::new();
    // The last confirmed batch of each key and day, whose marker the next one deletes.
    let mut confirmed: HashMap<(String, String), String> = HashMap::new();
    let mut ticker = tokio::time::interval(USAGE_FLUSH_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let done = tokio::select! {
            msg = rx.recv() => match msg {
                Some(UsageMsg::Add { key_id, day, totals }) => {
                    pending.entry((key_id, day)).or_default().add(totals);
                    continue;
                }
                Some(UsageMsg::Flush(done)) => Some(done),
                None => None,
            },
            _ = ticker.tick() => None,
        };
        // New batches only where none is awaiting confirmation.
        pending.retain(|slot, totals| {
            if unconfirmed.contains_key(slot) {
                return true;
            }
            let id = format!("{:016x}", fastrand::u64(..));
            let batch = UsageBatch {
                id,
                confirmed: confirmed.remove(slot),
                totals: *totals,
            };
            unconfirmed.insert(slot.clone(), batch);
            false
        });
        if !unconfirmed.is_empty() {
            let Some(limits) = limits.upgrade() else {
                return;
            };
            for (slot, id) in limits.write_batches(&mut unconfirmed).await {
                confirmed.insert(slot, id);
            }
            // Days gone by get no more batches: forget their last ids (the markers
            // expire on their own).
            if confirmed.len() > 1024 {
                let (today, _) = tollgate_api::usage::periods(jiff::Timestamp::now());
                confirmed.retain(|(_, day), _| *day == today);
            }
        }
        if let Some(done) = done {
            let _ = done.send(());
        }
    }
}

impl Limits {
    /// Writes the batches to Redis, removing and returning those confirmed.
    async fn write_batches(
        &self,
        batches: &mut HashMap<(String, String), UsageBatch>,
    ) -> Vec<((String, String), String)> {
        let Some(redis) = &self.shared else {
            batches.clear();
            return Vec::new();
        };
        let writes = batches.iter().map(|((key_id, day), batch)| async move {
            let result = redis
                .record_usage(
                    key_id,
                    day,
                    &batch.id,
                    batch.confirmed.as_deref(),
                    &batch.totals,
                )
                .await;
            ((key_id.clone(), day.clone()), result)
        });
        let mut done = Vec::new();
        for (slot, result) in futures_util::future::join_all(writes).await {
            match result {
                Ok(()) => {
                    if let Some(batch) = batches.remove(&slot) {
                        done.push((slot, batch.id));
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "recording usage in Redis failed; retried next time");
                    self.mark(false);
                }
            }
        }
        done
    }
}
