//! One writer among the controller's replicas: a `coordination.k8s.io`
//! Lease (`<namespace>/weft-controller`). Every replica serves the CA, the
//! config stream and REST reads; only the leader writes to the API
//! (waypoint Deployments, Gateway status).
//!
//! As client-go's elector does: a replica takes the Lease when it is free
//! or when its holder has not renewed it for a whole lease duration *as
//! this replica's clock measures it* (the time it last saw the Lease
//! change, never the timestamps in it, so clock skew between nodes cannot
//! hand leadership to two at once). Every write carries the
//! resourceVersion it read, so of two replicas racing, the API server lets
//! one win (the other gets `409 Conflict`). The leader renews every
//! `retry`; a leader that cannot renew for a lease duration steps down
//! before anyone may take over. On shutdown it gives the Lease up, so the
//! next replica leads at once.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub const LEASE: &str = "weft-controller";

#[derive(Debug, Clone)]
pub struct Election {
    pub namespace: String,
    /// This replica (its pod name).
    pub me: String,
    pub lease_duration: Duration,
    /// How often to renew, or to try to take the Lease.
    pub retry: Duration,
}

impl Election {
    pub fn new(namespace: &str, me: &str) -> Self {
        Election {
            namespace: namespace.into(),
            me: me.into(),
            lease_duration: Duration::from_secs(15),
            retry: Duration::from_secs(2),
        }
    }
}

/// What this replica last saw of the Lease, and when (its own clock).
struct Seen {
    holder: Option<String>,
    renew: Option<MicroTime>,
    at: Instant,
}

/// Runs the election until `stop`; the receiver says whether this replica
/// leads now.
pub fn spawn(client: Client, e: Election, stop: CancellationToken) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let api = Api::<Lease>::namespaced(client, &e.namespace);
        let mut seen: Option<Seen> = None;
        let mut renewed = Instant::now();
        loop {
            let leads = match round(&api, &e, &mut seen).await {
                Ok(leads) => {
                    if leads {
                        renewed = Instant::now();
                    }
                    leads
                }
                // Could not tell: keep leading only while the Lease we
                // last renewed is surely still ours.
                Err(err) => {
                    warn!(error = %err, "leader election: cannot reach the Lease");
                    *tx.borrow() && renewed.elapsed() < e.lease_duration
                }
            };
            // The gauge first: whoever sees the change sees it counted.
            if *tx.borrow() != leads {
                info!(me = e.me, leader = leads, "leadership changed");
                metrics::gauge!("weft_controller_leader").set(f64::from(u8::from(leads)));
            }
            tx.send_replace(leads);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(e.retry) => {}
            }
        }
        if *tx.borrow() {
            release(&api, &e).await;
            metrics::gauge!("weft_controller_leader").set(0.0);
            tx.send_replace(false);
        }
    });
    rx
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// One look at the Lease: take it, renew it, or leave it. Whether this
/// replica leads after it.
async fn round(api: &Api<Lease>, e: &Election, seen: &mut Option<Seen>) -> kube::Result<bool> {
    let Some(mut lease) = api.get_opt(LEASE).await? else {
        let fresh = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE.into()),
                ..Default::default()
            },
            spec: Some(spec_for(e, 0)),
        };
        return won(api.create(&PostParams::default(), &fresh).await);
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let changed = seen
        .as_ref()
        .is_none_or(|s| s.holder != spec.holder_identity || s.renew != spec.renew_time);
    if changed {
        *seen = Some(Seen {
            holder: spec.holder_identity.clone(),
            renew: spec.renew_time.clone(),
            at: Instant::now(),
        });
    }
    let mine = spec.holder_identity.as_deref() == Some(e.me.as_str());
    let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
    let expired = seen
        .as_ref()
        .is_some_and(|s| s.at.elapsed() > e.lease_duration);
    if !(mine || free || expired) {
        return Ok(false);
    }
    let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
    let mut next = spec_for(e, transitions);
    if mine {
        next.acquire_time = spec.acquire_time;
    }
    lease.spec = Some(next);
    won(api.replace(LEASE, &PostParams::default(), &lease).await)
}

/// A write that lost the race (409) is not an error: someone else leads.
fn won(result: kube::Result<Lease>) -> kube::Result<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

fn spec_for(e: &Election, transitions: i32) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(e.me.clone()),
        lease_duration_seconds: Some(e.lease_duration.as_secs().max(1) as i32),
        acquire_time: Some(now()),
        renew_time: Some(now()),
        lease_transitions: Some(transitions),
        ..Default::default()
    }
}

/// Gives the Lease up (on shutdown), so another replica leads at once.
async fn release(api: &Api<Lease>, e: &Election) {
    let Ok(Some(mut lease)) = api.get_opt(LEASE).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(e.me.as_str()) {
        return;
    }
    spec.holder_identity = None;
    match api.replace(LEASE, &PostParams::default(), &lease).await {
        Ok(_) => info!(me = e.me, "leadership given up"),
        Err(err) => warn!(error = %err, "could not give the Lease up; it expires"),
    }
}
