//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator
//! replicas exactly one writes. The algorithm is client-go's: acquire a Lease nobody
//! renewed for its duration (judged by *our* clock, from when we last saw it change, so
//! clock skew between nodes does not matter), renew it every retry period with an
//! optimistic-concurrency replace, stop leading when renewals fail for the renew deadline,
//! and release it on shutdown so a standby takes over at once.
//!
//! Leadership is also a [`Fence`] the controller checks before every write: it holds only
//! until the renew deadline after the last renewal began, so a leader that stalls (a
//! hung API call, a paused process) stops writing before any standby can take the Lease
//! over, even in the middle of a reconcile.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api,
    api::{PostParams, ResourceExt},
};
use tokio::{sync::watch, time::Instant};

/// Lease timing.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a Lease holds without renewal.
    pub duration: Duration,
    /// A leader that could not renew for this long stops leading.
    pub renew_deadline: Duration,
    /// Time between attempts.
    pub retry: Duration,
}

/// Whether this replica may write now. Cheap to clone and to check.
#[derive(Debug, Clone)]
pub struct Fence {
    /// Until when writes are allowed (`None`: not leading); no election: always.
    until: Option<Arc<Mutex<Option<Instant>>>>,
}

impl Fence {
    /// A fence that always holds: leader election is off.
    pub fn open() -> Self {
        Self { until: None }
    }

    fn closed() -> Self {
        Self {
            until: Some(Arc::new(Mutex::new(None))),
        }
    }

    /// Whether writes are allowed now.
    pub fn holds(&self) -> bool {
        self.until.as_ref().is_none_or(|until| {
            until
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|t| Instant::now() < t)
        })
    }

    fn set(&self, until: Option<Instant>) {
        if let Some(cell) = &self.until {
            *cell.lock().unwrap_or_else(|e| e.into_inner()) = until;
        }
    }
}

/// One replica's elector.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    /// The Lease's resourceVersion when we last saw it change, and when (our clock).
    observed: Option<(String, Instant)>,
    fence: Fence,
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl Elector {
    /// An elector for Lease `name` in `api`'s namespace.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: Timing) -> Self {
        Self {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            timing,
            observed: None,
            fence: Fence::closed(),
        }
    }

    /// The fence this elector opens while it holds the Lease.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    fn spec(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(jiff::Timestamp::now());
        let ours = previous
            .and_then(|p| p.holder_identity.as_deref())
            .is_some_and(|h| h == self.identity);
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.duration.as_secs().max(1) as i32),
            acquire_time: if ours {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if ours || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        }
    }

    /// One attempt: `Ok(true)` when we hold the Lease afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_code(&e, 409) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let version = lease.resource_version().unwrap_or_default();
        let now = Instant::now();
        let seen_at = match &self.observed {
            Some((v, at)) if *v == version => *at,
            _ => {
                self.observed = Some((version, now));
                now
            }
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let held_for = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
        if !holder.is_empty() && holder != self.identity && now < seen_at + held_for {
            return Ok(false);
        }
        lease.spec = Some(self.spec(Some(&spec)));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.observed = Some((written.resource_version().unwrap_or_default(), now));
                Ok(true)
            }
            Err(e) if is_code(&e, 409) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up (if we hold it), so a standby takes over without waiting.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        let now = MicroTime(jiff::Timestamp::now());
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(String::new()),
            lease_duration_seconds: Some(1),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: spec.lease_transitions,
            ..LeaseSpec::default()
        });
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }

    /// Campaigns until `shutdown` turns true, publishing whether we lead on `leading`;
    /// releases the Lease on the way out.
    pub async fn run(mut self, leading: watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
        let mut last_renewal: Option<Instant> = None;
        loop {
            let attempt = Instant::now();
            // A hung API call must not keep us "leading": give up on it at the deadline.
            let outcome =
                match tokio::time::timeout(self.timing.renew_deadline, self.try_acquire_or_renew())
                    .await
                {
                    Ok(outcome) => outcome.map_err(|e| e.to_string()),
                    Err(_) => Err("the API server did not answer in time".to_owned()),
                };
            match outcome {
                Ok(true) => {
                    // Counted from before the attempt: the Lease may have been written
                    // as soon as it was sent.
                    self.fence.set(Some(attempt + self.timing.renew_deadline));
                    last_renewal = Some(Instant::now());
                    if !*leading.borrow() {
                        tracing::info!(identity = %self.identity, lease = %self.name, "became the leader");
                        let _ = leading.send(true);
                    }
                }
                Ok(false) => {
                    self.fence.set(None);
                    if *leading.borrow() {
                        tracing::warn!(identity = %self.identity, "another replica holds the lease now; stopped leading");
                        let _ = leading.send(false);
                    }
                    last_renewal = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not acquire or renew the lease");
                    let expired =
                        last_renewal.is_none_or(|at| at.elapsed() >= self.timing.renew_deadline);
                    if expired {
                        self.fence.set(None);
                    }
                    if *leading.borrow() && expired {
                        tracing::error!(
                            "lease not renewed within the renew deadline; stopped leading"
                        );
                        let _ = leading.send(false);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.timing.retry) => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        self.fence.set(None);
        if *leading.borrow() {
            let _ = leading.send(false);
            match self.release().await {
                Ok(()) => tracing::info!("released the lease"),
                Err(e) => {
                    tracing::warn!(error = %e, "could not release the lease; it expires on its own")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{Request, Response};
    use kube::{Client, client::Body};
    use serde_json::{Value, json};
    use tower_test::mock::{self, Handle};

    use super::*;

    type ApiHandle = Handle<Request<Body>, Response<Body>>;

    fn elector() -> (Elector, ApiHandle) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "ops");
        let timing = Timing {
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        };
        (
            Elector::new(
                Api::namespaced(client, "ops"),
                "tollgate-operator",
                "me",
                timing,
            ),
            handle,
        )
    }

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases";

    fn lease(holder: &str, version: &str) -> Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "tollgate-operator", "namespace": "ops", "resourceVersion": version},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "leaseTransitions": 4,
                     "acquireTime": "2026-11-22T10:00:00.000000Z", "renewTime": "2026-11-22T10:00:00.000000Z"}
        })
    }

    fn respond(status: u16, body: Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap()
    }

    fn status(code: u16, reason: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason})
    }

    async fn expect(
        handle: &mut ApiHandle,
        method: &str,
        uri: &str,
        reply: Response<Body>,
    ) -> Value {
        let (request, send) = handle.next_request().await.expect("a request");
        assert_eq!(request.method().as_str(), method);
        assert_eq!(request.uri().to_string(), uri);
        let body = request.into_body().collect_bytes().await.unwrap();
        send.send_response(reply);
        if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap()
        }
    }

    #[test]
    fn the_fence_holds_only_until_the_renew_deadline_after_the_last_renewal() {
        assert!(Fence::open().holds(), "no election: always");
        let fence = Fence::closed();
        assert!(!fence.holds(), "not before the first renewal");
        fence.set(Some(Instant::now() + Duration::from_secs(5)));
        assert!(fence.clone().holds());
        fence.set(Some(Instant::now() - Duration::from_millis(1)));
        assert!(!fence.holds(), "a renewal too long ago");
        fence.set(None);
        assert!(!fence.holds());
    }

    #[tokio::test]
    async fn a_missing_lease_is_created_with_us_as_holder() {
        let (mut e, mut handle) = elector();
        let server = tokio::spawn(async move {
            let get = format!("{PATH}/tollgate-operator");
            expect(
                &mut handle,
                "GET",
                &get,
                respond(404, status(404, "NotFound")),
            )
            .await;
            let body = expect(
                &mut handle,
                "POST",
                &format!("{PATH}?"),
                respond(201, lease("me", "1")),
            )
            .await;
            assert_eq!(body["spec"]["holderIdentity"], "me");
            assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
            assert_eq!(body["spec"]["leaseTransitions"], 0);
        });
        assert!(e.try_acquire_or_renew().await.unwrap());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_lease_held_by_another_is_respected_until_it_goes_unrenewed() {
        let (mut e, mut handle) = elector();
        let get = format!("{PATH}/tollgate-operator");
        let server = tokio::spawn(async move {
            // First sight: held by "other", just observed: not ours.
            expect(&mut handle, "GET", &get, respond(200, lease("other", "7"))).await;
            handle
        });
        assert!(!e.try_acquire_or_renew().await.unwrap());
        let mut handle = server.await.unwrap();
        // Pretend we saw version 7 long ago: the holder stopped renewing.
        e.observed = Some(("7".into(), Instant::now() - Duration::from_secs(16)));
        let get = format!("{PATH}/tollgate-operator");
        let server = tokio::spawn(async move {
            expect(&mut handle, "GET", &get, respond(200, lease("other", "7"))).await;
            let put = format!("{PATH}/tollgate-operator?");
            let body = expect(&mut handle, "PUT", &put, respond(200, lease("me", "8"))).await;
            assert_eq!(
                body["metadata"]["resourceVersion"], "7",
                "replace is conditional"
            );
            assert_eq!(body["spec"]["holderIdentity"], "me");
            assert_eq!(body["spec"]["leaseTransitions"], 5);
        });
        assert!(e.try_acquire_or_renew().await.unwrap());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn losing_the_replace_race_means_not_leading() {
        let (mut e, mut handle) = elector();
        e.observed = Some(("3".into(), Instant::now() - Duration::from_secs(60)));
        let server = tokio::spawn(async move {
            let get = format!("{PATH}/tollgate-operator");
            expect(&mut handle, "GET", &get, respond(200, lease("other", "3"))).await;
            let put = format!("{PATH}/tollgate-operator?");
            expect(
                &mut handle,
                "PUT",
                &put,
                respond(409, status(409, "Conflict")),
            )
            .await;
        });
        assert!(!e.try_acquire_or_renew().await.unwrap());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn our_own_lease_is_renewed_and_released_on_shutdown() {
        let (mut e, mut handle) = elector();
        let server = tokio::spawn(async move {
            let get = format!("{PATH}/tollgate-operator");
            let put = format!("{PATH}/tollgate-operator?");
            expect(&mut handle, "GET", &get, respond(200, lease("me", "9"))).await;
            let body = expect(&mut handle, "PUT", &put, respond(200, lease("me", "10"))).await;
            assert_eq!(
                body["spec"]["leaseTransitions"], 4,
                "renewal is no transition"
            );
            assert_eq!(body["spec"]["acquireTime"], "2026-11-22T10:00:00.000000Z");
            expect(&mut handle, "GET", &get, respond(200, lease("me", "10"))).await;
            let body = expect(&mut handle, "PUT", &put, respond(200, lease("", "11"))).await;
            assert_eq!(body["spec"]["holderIdentity"], "");
            assert_eq!(body["spec"]["leaseDurationSeconds"], 1);
        });
        assert!(e.try_acquire_or_renew().await.unwrap());
        e.release().await.unwrap();
        server.await.unwrap();
    }
}
