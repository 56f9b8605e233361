//! Watch streams (`?watch=true`).
//!
//! A watch answers with newline-delimited JSON events over a chunked
//! response, as the API server does:
//!
//! 1. a backlog: either the current objects as `ADDED` (no resourceVersion,
//!    `resourceVersion=0` or `sendInitialEvents=true`, the latter followed by
//!    a bookmark annotated `k8s.io/initial-events-end`), or every recorded
//!    change newer than the requested resourceVersion. If those changes are
//!    no longer in the history the stream is a single `ERROR` event carrying
//!    a 410 `Expired` Status;
//! 2. live changes, filtered by namespace and selectors. A change that makes
//!    an object start matching a label selector is sent as `ADDED`, one that
//!    makes it stop matching as `DELETED`;
//! 3. periodic `BOOKMARK`s when `allowWatchBookmarks=true`;
//! 4. the end of the stream after `timeoutSeconds`, or when the test calls
//!    `Emulator::close_watches`, or when the watch falls too far behind.
//!
//! With a watch-cache lag (`Emulator::delay_watches`) every change, replayed
//! or live, is held until its commit time plus the lag before it is sent or
//! counted for bookmarks; the initial state is sent at once.

use crate::registry::{ResKey, ResourceDef};
use crate::selector::Selectors;
use crate::store::{Change, ChangeType, Store};
use axum::body::Bytes;
use futures_util::Stream;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};
use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, Interval, Sleep};

/// Parameters of one watch request.
#[derive(Clone, Debug)]
pub(crate) struct WatchParams {
    pub def: ResourceDef,
    /// `None` for a cluster-wide watch.
    pub namespace: Option<String>,
    pub selectors: Selectors,
    /// `None` (or 0): start with the current state.
    pub resource_version: Option<u64>,
    pub send_initial_events: bool,
    pub timeout: Duration,
    /// `None` when bookmarks were not requested.
    pub bookmark_interval: Option<Duration>,
    /// Send `PartialObjectMetadata` instead of full objects.
    pub metadata_only: bool,
}

/// Decides which changes a watch sees, and as which event type.
#[derive(Clone, Debug)]
struct Filter {
    res: ResKey,
    namespace: Option<String>,
    selectors: Selectors,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns))
            && self.selectors.matches(obj)
    }

    /// The event type this watch sees for `change`, if any.
    fn event_type(&self, change: &Change) -> Option<&'static str> {
        if change.res != self.res {
            return None;
        }
        let now = self.matches(&change.object);
        match change.change {
            ChangeType::Added => now.then_some("ADDED"),
            ChangeType::Deleted => now.then_some("DELETED"),
            ChangeType::Modified => {
                let before = change.previous.as_ref().is_some_and(|p| self.matches(p));
                match (before, now) {
                    (true, true) => Some("MODIFIED"),
                    (false, true) => Some("ADDED"),
                    (true, false) => Some("DELETED"),
                    (false, false) => None,
                }
            }
        }
    }
}

/// Everything a running watch stream needs between two events.
struct WatchState {
    params: WatchParams,
    filter: Filter,
    /// Lines to send before live changes; replayed changes carry their
    /// commit time (held back by the lag), the initial state does not.
    backlog: VecDeque<(Option<StdInstant>, Bytes)>,
    changes: broadcast::Receiver<Arc<Change>>,
    close: watch::Receiver<u64>,
    /// The watch-cache lag.
    lag: watch::Receiver<Duration>,
    deadline: Pin<Box<Sleep>>,
    bookmarks: Option<Interval>,
    /// Changes up to this rv were in the backlog; skip them when live.
    snapshot_rv: u64,
    /// Highest rv processed: the resourceVersion of the next bookmark.
    last_rv: u64,
    finished: bool,
}

/// Starts a watch. Must be called with the store locked, so that the
/// backlog and the live subscription meet exactly at the current rv.
pub(crate) fn start(
    store: &Store,
    params: WatchParams,
    close: watch::Receiver<u64>,
    lag: watch::Receiver<Duration>,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let filter = Filter {
        res: params.def.key(),
        namespace: params.namespace.clone(),
        selectors: params.selectors.clone(),
    };
    let changes = store.subscribe();
    let snapshot_rv = store.rv();
    let mut backlog = VecDeque::new();
    let mut finished = false;
    match params
        .resource_version
        .filter(|rv| *rv > 0 && !params.send_initial_events)
    {
        None => {
            let ns = params.namespace.as_deref();
            for obj in store.list(&params.def, ns, &params.selectors) {
                backlog.push_back((None, event_line("ADDED", &obj, params.metadata_only)));
            }
            if params.send_initial_events {
                let mut bm = bookmark(&params.def, snapshot_rv);
                bm["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                backlog.push_back((None, line(json!({"type": "BOOKMARK", "object": bm}))));
            }
        }
        Some(since) => match store.changes_since(&filter.res, since) {
            Ok(changes) => {
                for change in changes {
                    if let Some(ty) = filter.event_type(&change) {
                        let event = event_line(ty, &change.object, params.metadata_only);
                        backlog.push_back((Some(change.at), event));
                    }
                }
            }
            Err(gone) => {
                let error = line(json!({"type": "ERROR", "object": gone.to_status()}));
                backlog.push_back((None, error));
                finished = true;
            }
        },
    }
    let bookmarks = params.bookmark_interval.map(|every| {
        let mut interval = tokio::time::interval_at(Instant::now() + every, every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    let state = WatchState {
        deadline: Box::pin(tokio::time::sleep(params.timeout)),
        params,
        filter,
        backlog,
        changes,
        close,
        lag,
        bookmarks,
        snapshot_rv,
        last_rv: snapshot_rv,
        finished,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        let line = next_line(&mut st).await?;
        Some((Ok(line), st))
    })
}

/// The next line to send, or `None` when the stream ends.
async fn next_line(st: &mut WatchState) -> Option<Bytes> {
    if let Some((at, line)) = st.backlog.pop_front() {
        if let Some(at) = at
            && !wait_for_lag(st, at).await
        {
            return None;
        }
        return Some(line);
    }
    if st.finished {
        return None;
    }
    loop {
        // Biased: once the watch is closed or timed out nothing more is sent,
        // and pending changes go out before a bookmark.
        tokio::select! {
            biased;
            _ = st.close.changed() => return None,
            _ = st.deadline.as_mut() => return None,
            received = st.changes.recv() => match received {
                Ok(change) => {
                    if change.rv <= st.snapshot_rv {
                        continue;
                    }
                    if !wait_for_lag(st, change.at).await {
                        return None;
                    }
                    st.last_rv = st.last_rv.max(change.rv);
                    if let Some(ty) = st.filter.event_type(&change) {
                        return Some(event_line(ty, &change.object, st.params.metadata_only));
                    }
                }
                // Fell behind or the emulator is shutting down: end the
                // stream; the client resumes from its last resourceVersion.
                Err(_) => return None,
            },
            _ = async { st.bookmarks.as_mut()?.tick().await; Some(()) }, if st.bookmarks.is_some() => {
                let bm = bookmark(&st.params.def, st.last_rv);
                return Some(line(json!({"type": "BOOKMARK", "object": bm})));
            }
        }
    }
}

/// Waits until a change committed `at` is due under the current lag.
/// Returns `false` when the stream must end meanwhile (closed, timed out).
async fn wait_for_lag(st: &mut WatchState, at: StdInstant) -> bool {
    loop {
        let due = at + *st.lag.borrow_and_update();
        if due <= StdInstant::now() {
            return true;
        }
        tokio::select! {
            biased;
            _ = st.close.changed() => return false,
            _ = st.deadline.as_mut() => return false,
            changed = st.lag.changed() => if changed.is_err() {
                return false;
            },
            // Checked again above: never early, whatever the timer's rounding.
            _ = tokio::time::sleep_until(Instant::from_std(due)) => {}
        }
    }
}

fn bookmark(def: &ResourceDef, rv: u64) -> Value {
    json!({
        "kind": def.kind,
        "apiVersion": def.api_version(),
        "metadata": {"resourceVersion": rv.to_string()},
    })
}

fn event_line(ty: &str, obj: &Value, metadata_only: bool) -> Bytes {
    let obj = if metadata_only {
        partial_metadata(obj)
    } else {
        obj.clone()
    };
    line(json!({"type": ty, "object": obj}))
}

fn line(event: Value) -> Bytes {
    let mut text = event.to_string();
    text.push('\n');
    Bytes::from(text)
}

/// The `PartialObjectMetadata` form of an object (metadata-only requests).
pub(crate) fn partial_metadata(obj: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": obj["metadata"],
    })
}
