//! The limits store the gateway uses: in process, or shared through Redis with a failure
//! mode for when Redis is unreachable (`failOpen`: the in-process limiter takes over per
//! replica; `failClosed`: requests that need a limit decision get 503).

use std::sync::Arc;

use clap::ValueEnum;

use super::{
    Ask, LocalLimits, Quota, Rejection, Reservation, budget_slot,
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
}

impl Limits {
    /// In-process limits only.
    pub fn local() -> Self {
        Self {
            local: LocalLimits::default(),
            shared: None,
            mode: FailureMode::FailOpen,
        }
    }

    /// Limits shared through Redis.
    pub fn shared(redis: RedisLimits, mode: FailureMode) -> Self {
        redis.redis().set_failure_mode(mode.as_str());
        Self {
            local: LocalLimits::default(),
            shared: Some(redis),
            mode,
        }
    }

    /// Whether Redis is configured, and if so whether it answered last time.
    pub fn redis_state(&self) -> Option<bool> {
        self.shared.as_ref().map(|r| r.redis().is_up())
    }

    /// The failure mode.
    pub fn mode(&self) -> FailureMode {
        self.mode
    }

    fn mark(&self, up: bool) {
        if let Some(redis) = &self.shared {
            redis.redis().mark(up);
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
