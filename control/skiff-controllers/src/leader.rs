//! Leader election through a Lease (client-go's `leaderelection` with a `LeaseLock`), so that
//! several `skiff-control` replicas run one active set of scheduler and controllers.
//!
//! A candidate takes the Lease `kube-system/skiff-controller-manager` when it is absent or
//! its holder has not renewed it for `leaseDurationSeconds` (15 s) — measured by this
//! candidate's own clock from when it last saw the Lease change, so clock skew does not matter
//! — with a resourceVersion-guarded write, so two candidates never both win. The leader renews
//! every 2 s; if it cannot renew for 10 s it stops leading (its controllers are stopped) before
//! another candidate can take over. `holderIdentity`, `acquireTime`, `renewTime` and
//! `leaseTransitions` are kept as upstream does (`kubectl get lease -n kube-system`).

use std::{future::Future, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    chrono::Utc,
};
use kube::{Api, Client, ResourceExt, api::PostParams};
use tokio::time::Instant;

/// The Lease's namespace.
pub const NAMESPACE: &str = "kube-system";
/// The Lease's name.
pub const NAME: &str = "skiff-controller-manager";
/// How long a Lease holds without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How long a leader keeps trying to renew before it steps down.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often candidates and the leader try.
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// One candidate.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// The Lease as last seen, and when (by our clock) it last changed.
    observed: Option<(Lease, Instant)>,
}

impl Elector {
    /// A candidate named `identity` for the Lease `name` in [`NAMESPACE`].
    pub fn new(client: Client, name: &str, identity: String) -> Elector {
        Elector {
            api: Api::namespaced(client, NAMESPACE),
            name: name.to_string(),
            identity,
            observed: None,
        }
    }

    /// This candidate's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Tries once to acquire or renew; returns whether this candidate leads now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Utc::now());
        let current = match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(NAMESPACE.into()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(l) => {
                        self.observed = Some((l, Instant::now()));
                        Ok(true)
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                };
            }
            Some(l) => l,
        };
        // When did it last change, by our clock?
        let changed_at = match &self.observed {
            Some((seen, at)) if seen.resource_version() == current.resource_version() => *at,
            _ => Instant::now(),
        };
        self.observed = Some((current.clone(), changed_at));
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
        let ours = holder == self.identity;
        let expired = holder.is_empty() || changed_at.elapsed() > duration;
        if !ours && !expired {
            return Ok(false);
        }
        let mut next = current.clone();
        let s = next.spec.get_or_insert_with(Default::default);
        if !ours {
            s.holder_identity = Some(self.identity.clone());
            s.acquire_time = Some(now.clone());
            s.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        s.renew_time = Some(now);
        s.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
        // The resourceVersion makes this a compare-and-swap: a rival's write in between wins.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(l) => {
                if !ours {
                    tracing::info!(identity = %self.identity, previous = %holder, "became the leader");
                }
                self.observed = Some((l, Instant::now()));
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up (when this replica's controllers stop), so another candidate need not
    /// wait it out.
    pub async fn release(&mut self) {
        if let Ok(Some(mut l)) = self.api.get_opt(&self.name).await
            && l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                == Some(self.identity.as_str())
        {
            if let Some(s) = l.spec.as_mut() {
                s.holder_identity = None;
                s.lease_duration_seconds = Some(1);
            }
            let _ = self
                .api
                .replace(&self.name, &PostParams::default(), &l)
                .await;
        }
    }
}

/// Campaigns until elected, runs `lead()` while leading, and stops it when leadership is lost;
/// then campaigns again. Runs until the process ends.
pub async fn run<F, Fut>(client: Client, identity: String, lead: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut e = Elector::new(client, NAME, identity);
    loop {
        // Campaign.
        loop {
            match e.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(err) => tracing::debug!(error = %err, "leader election: lease unavailable"),
            }
            tokio::time::sleep(RETRY_PERIOD).await;
        }
        tracing::info!(identity = %e.identity(), "leading: starting the scheduler and controllers");
        let mut work = tokio::spawn(lead());
        let mut last_renewed = Instant::now();
        loop {
            tokio::select! {
                r = &mut work => {
                    match r {
                        Ok(Ok(())) => tracing::warn!("controllers stopped"),
                        Ok(Err(err)) => tracing::error!(error = format!("{err:#}"), "controllers stopped"),
                        Err(err) => tracing::error!(error = %err, "controllers panicked"),
                    }
                    // Hand over; another replica (or this one, after a pause) starts afresh.
                    e.release().await;
                    tokio::time::sleep(RETRY_PERIOD).await;
                    break;
                }
                () = tokio::time::sleep(RETRY_PERIOD) => {
                    match e.try_acquire_or_renew().await {
                        Ok(true) => last_renewed = Instant::now(),
                        Ok(false) => {
                            tracing::warn!("lost the lease to another replica; stopping the controllers");
                            work.abort();
                            let _ = (&mut work).await;
                            break;
                        }
                        Err(err) => tracing::debug!(error = %err, "renewing the lease failed"),
                    }
                    if last_renewed.elapsed() > RENEW_DEADLINE {
                        tracing::warn!("could not renew the lease in time; stopping the controllers");
                        work.abort();
                        let _ = (&mut work).await;
                        break;
                    }
                }
            }
        }
    }
}
