//! Usage counters per API key (requests, input and output tokens, spend) by day, month
//! and in total: what `/v1/usage` answers and the operator reports on `ApiKey` status.
//!
//! With Redis, every replica adds its answered requests to the same counters: a
//! background writer sums them per key and writes one batch per key and day every
//! [`USAGE_FLUSH_INTERVAL`], exactly once per batch (`usage.lua`). Without Redis they are
//! counted in process.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use redis::Script;

use crate::redis::{Redis, StoreError};

/// How long a batch's marker lives: a retry within that time of a batch that did apply
/// cannot count it twice.
pub const USAGE_BATCH_MARKER_TTL: Duration = Duration::from_secs(3600);

/// Counters added to a key's usage for one day.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UsageTotals {
    /// Answered requests.
    pub requests: u64,
    /// Input tokens.
    pub input: u64,
    /// Output tokens.
    pub output: u64,
    /// Input tokens read from the provider's prompt cache (part of `input`).
    pub cached_input: u64,
    /// Input tokens written to the provider's prompt cache (part of `input`).
    pub cache_write: u64,
    /// Spend.
    pub spend: f64,
}

impl UsageTotals {
    pub(crate) fn add(&mut self, other: Self) {
        self.requests += other.requests;
        self.input += other.input;
        self.output += other.output;
        self.cached_input += other.cached_input;
        self.cache_write += other.cache_write;
        self.spend += other.spend;
    }
}

impl UsageTotals {
    pub(crate) fn from_fields(fields: &HashMap<String, String>) -> Self {
        let int = |k: &str| fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        Self {
            requests: int(tollgate_api::usage::REQUESTS),
            input: int(tollgate_api::usage::INPUT_TOKENS),
            output: int(tollgate_api::usage::OUTPUT_TOKENS),
            cached_input: int(tollgate_api::usage::CACHED_INPUT_TOKENS),
            cache_write: int(tollgate_api::usage::CACHE_WRITE_TOKENS),
            spend: fields
                .get(tollgate_api::usage::SPEND)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0),
        }
    }
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

/// The usage counters.
#[derive(Debug)]
pub struct Usage {
    /// Redis and the batch script, when usage is shared.
    shared: Option<(Redis, Script)>,
    /// Usage on its way to Redis (started with the first answer).
    writer: OnceLock<tokio::sync::mpsc::UnboundedSender<UsageMsg>>,
    /// Usage counted in process when there is no Redis.
    local: Mutex<LocalUsage>,
}

impl Usage {
    /// Counted in process.
    pub fn local() -> Self {
        Self {
            shared: None,
            writer: OnceLock::new(),
            local: Mutex::default(),
        }
    }

    /// Counted in `redis`, shared with every replica.
    pub fn shared(redis: Redis) -> Self {
        Self {
            shared: Some((redis, Script::new(include_str!("usage.lua")))),
            ..Self::local()
        }
    }

    /// Whether the counters are Redis's (shared by every replica) rather than this
    /// process's.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Records an answered request in the shared usage counters (when Redis is
    /// configured). A background writer sums the requests of each key and writes them
    /// every [`USAGE_FLUSH_INTERVAL`]; what Redis refuses is kept and written once it is
    /// back, and shutdown flushes the rest ([`Usage::flush`]).
    pub fn record(self: &Arc<Self>, key_id: &str, usage: &crate::pricing::Usage, spend: f64) {
        let totals = UsageTotals {
            requests: 1,
            input: usage.prompt,
            output: usage.completion,
            cached_input: usage.cached,
            cache_write: usage.cache_write,
            spend,
        };
        let now = jiff::Timestamp::now();
        if self.shared.is_none() {
            self.local
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
    pub async fn read(
        &self,
        key_id: &str,
        periods: &[String],
    ) -> Result<Vec<UsageTotals>, StoreError> {
        let Some((redis, _)) = &self.shared else {
            let local = self.local.lock().unwrap_or_else(|e| e.into_inner());
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
        let result = read(redis, key_id, periods).await;
        redis.mark(result.is_ok());
        Ok(result?.iter().map(UsageTotals::from_fields).collect())
    }

    /// Writes the usage not yet in Redis, waiting at most `deadline`.
    pub async fn flush(&self, deadline: Duration) {
        let Some(tx) = self.writer.get() else {
            return;
        };
        let (done, wait) = tokio::sync::oneshot::channel();
        if tx.send(UsageMsg::Flush(done)).is_ok() {
            let _ = tokio::time::timeout(deadline, wait).await;
        }
    }

    fn usage_writer(self: &Arc<Self>) -> Option<&tokio::sync::mpsc::UnboundedSender<UsageMsg>> {
        if let Some(tx) = self.writer.get() {
            return Some(tx);
        }
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if self.writer.set(tx).is_ok() {
            // The writer holds a weak reference, so dropping the limits ends it.
            handle.spawn(write_usage(Arc::downgrade(self), rx));
        }
        self.writer.get()
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
    usage: std::sync::Weak<Usage>,
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
            let Some(usage) = usage.upgrade() else {
                return;
            };
            for (slot, id) in usage.write_batches(&mut unconfirmed).await {
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

impl Usage {
    /// Writes the batches to Redis, removing and returning those confirmed.
    async fn write_batches(
        &self,
        batches: &mut HashMap<(String, String), UsageBatch>,
    ) -> Vec<((String, String), String)> {
        let Some((redis, script)) = &self.shared else {
            batches.clear();
            return Vec::new();
        };
        let writes = batches.iter().map(|((key_id, day), batch)| async move {
            let result = write_batch(
                redis,
                script,
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
                    redis.mark(false);
                }
            }
        }
        done
    }
}

/// Adds one batch of usage to a key's daily, monthly and total counters, exactly once per
/// `batch_id` (a retry of a batch that did apply changes nothing), and deletes the marker
/// of `confirmed`, the previous batch already known to have applied. The key's counters
/// and the markers share a hash slot.
async fn write_batch(
    redis: &Redis,
    script: &Script,
    key_id: &str,
    day: &str,
    batch_id: &str,
    confirmed: Option<&str>,
    totals: &UsageTotals,
) -> Result<(), StoreError> {
    use tollgate_api::usage;
    // `YYYY-MM-DD` names the day; its first seven characters, the month.
    let month = day.get(..7).unwrap_or(day);
    let markers = usage::usage_key(key_id, "batch");
    let marker = format!("{markers}:{batch_id}");
    let previous = format!("{markers}:{}", confirmed.unwrap_or("none"));
    let mut invocation = script.prepare_invoke();
    invocation
        .key(marker)
        .key(usage::usage_key(key_id, day))
        .key(usage::usage_key(key_id, month))
        .key(usage::usage_key(key_id, usage::TOTAL))
        .key(previous)
        .arg(usage::DAILY_TTL_SECS)
        .arg(usage::MONTHLY_TTL_SECS)
        .arg(USAGE_BATCH_MARKER_TTL.as_millis() as u64)
        .arg(if confirmed.is_some() { "1" } else { "0" })
        .arg(usage::SPEND)
        .arg(totals.spend);
    // The counters, by name: those at 0 are left out (no field is made for nothing).
    for (field, count) in [
        (usage::REQUESTS, totals.requests),
        (usage::INPUT_TOKENS, totals.input),
        (usage::OUTPUT_TOKENS, totals.output),
        (usage::CACHED_INPUT_TOKENS, totals.cached_input),
        (usage::CACHE_WRITE_TOKENS, totals.cache_write),
    ] {
        if count > 0 {
            invocation.arg(field).arg(count);
        }
    }
    let mut conn = redis.conn();
    let _: i64 = redis
        .call("usage", invocation.invoke_async(&mut conn))
        .await?;
    Ok(())
}

/// The usage hashes of a key in `periods` (day, month or `total` ids), in order; an
/// absent hash reads as empty.
async fn read(
    redis: &Redis,
    key_id: &str,
    periods: &[String],
) -> Result<Vec<HashMap<String, String>>, StoreError> {
    let mut conn = redis.conn();
    let mut pipe = redis::pipe();
    for period in periods {
        pipe.cmd("HGETALL")
            .arg(tollgate_api::usage::usage_key(key_id, period));
    }
    redis.call("usage_read", pipe.query_async(&mut conn)).await
}
