//! Circuit breaking and outlier detection, per Service at this waypoint
//! (`BackendPolicy.weft.dev`).
//!
//! - **Limits**: requests in flight (`maxRequests`), HTTP/1.1 exchanges in
//!   flight (`maxConnections`: each holds one upstream connection),
//!   requests allowed to wait for a slot (`maxPendingRequests`), retries
//!   in flight (`maxRetries`). Past a limit the request gets 503 `UO` at
//!   once (a retry past `maxRetries` is not made: the last answer stands).
//!   The breaker closes by itself as requests finish.
//! - **Outlier detection**: an endpoint that answers 5xx (or cannot be
//!   connected) `consecutive5xx` times in a row is ejected for
//!   `baseEjectionTime` × the number of times it has been ejected; at most
//!   `maxEjectionPercent` of the endpoints (at least one, never all) are
//!   out at once. Ejected endpoints are skipped until their time is up.
//! - **Rate limits** (`RateLimit.weft.dev` by `ExtensionRef`): a token
//!   bucket per limit (per client identity with `perSource`), kept by this
//!   instance; an empty bucket answers 429 with `retry-after`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use weft_proto::identity::Identity;
use weft_proto::pb::weft::v1 as pb;
use weft_proto::shards::FastMap;

use crate::upstream::Endpoint;

/// One Service's limits, with the slots they hand out.
#[derive(Debug)]
struct Breaker {
    limits: pb::BackendLimits,
    requests: Option<Arc<Semaphore>>,
    connections: Option<Arc<Semaphore>>,
    waiting: AtomicU32,
    retries: AtomicU32,
}

fn slots(n: u32) -> Option<Arc<Semaphore>> {
    (n > 0).then(|| Arc::new(Semaphore::new(n as usize)))
}

/// A request's place under its Service's limits, given back on drop.
#[derive(Debug)]
pub struct Admitted {
    _request: Option<OwnedSemaphorePermit>,
    _connection: Option<OwnedSemaphorePermit>,
}

/// A retry in flight, counted against `maxRetries` until dropped.
#[derive(Debug)]
pub struct Retrying(Option<Arc<Breaker>>);

impl Drop for Retrying {
    fn drop(&mut self) {
        if let Some(b) = &self.0 {
            b.retries.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// How an endpoint has been doing.
#[derive(Debug, Default, Clone, Copy)]
struct Health {
    consecutive: u32,
    ejections: u32,
    until: Option<Instant>,
}

impl Health {
    fn ejected(&self, now: Instant) -> bool {
        self.until.is_some_and(|t| t > now)
    }
}

#[derive(Debug, Default)]
pub struct Resilience {
    breakers: Mutex<FastMap<String, Arc<Breaker>>>,
    health: Mutex<FastMap<SocketAddr, Health>>,
}

impl Resilience {
    fn breaker(&self, service: &str, limits: &pb::BackendLimits) -> Arc<Breaker> {
        let mut breakers = self.breakers.lock().expect("poisoned");
        match breakers.get(service) {
            // New limits start new slots; requests holding old ones finish.
            Some(b) if b.limits == *limits => b.clone(),
            _ => {
                let b = Arc::new(Breaker {
                    limits: *limits,
                    requests: slots(limits.max_requests),
                    connections: slots(limits.max_connections),
                    waiting: AtomicU32::new(0),
                    retries: AtomicU32::new(0),
                });
                breakers.insert(service.to_owned(), b.clone());
                b
            }
        }
    }

    /// A slot for a request to `service`; `Err` (503 `UO`) when its limits
    /// are reached and no more may wait.
    pub async fn admit(
        &self,
        service: &str,
        limits: Option<&pb::BackendLimits>,
        http1: bool,
    ) -> Result<Admitted, String> {
        let Some(limits) = limits else {
            return Ok(Admitted {
                _request: None,
                _connection: None,
            });
        };
        let b = self.breaker(service, limits);
        let request = take(&b, b.requests.as_ref(), "maxRequests").await?;
        let connection = match http1 {
            true => take(&b, b.connections.as_ref(), "maxConnections").await?,
            false => None,
        };
        Ok(Admitted {
            _request: request,
            _connection: connection,
        })
    }

    /// Room for one more retry to `service` (`None`: `maxRetries` retries
    /// are already in flight).
    pub fn retry(&self, service: &str, limits: Option<&pb::BackendLimits>) -> Option<Retrying> {
        let Some(limits) = limits.filter(|l| l.max_retries > 0) else {
            return Some(Retrying(None));
        };
        let b = self.breaker(service, limits);
        let taken = b.retries.fetch_add(1, Ordering::Relaxed);
        if taken >= limits.max_retries {
            b.retries.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Retrying(Some(b)))
    }

    /// `eps` without the endpoints ejected now (all of them if that would
    /// leave none).
    pub fn healthy(&self, eps: &Arc<[Endpoint]>) -> Arc<[Endpoint]> {
        self.healthy_at(eps, Instant::now())
    }

    fn healthy_at(&self, eps: &Arc<[Endpoint]>, now: Instant) -> Arc<[Endpoint]> {
        let health = self.health.lock().expect("poisoned");
        let out = |e: &Endpoint| health.get(&e.addr).is_some_and(|h| h.ejected(now));
        if !eps.iter().any(out) {
            return eps.clone();
        }
        let kept: Vec<Endpoint> = eps.iter().filter(|e| !out(e)).cloned().collect();
        if kept.is_empty() {
            return eps.clone();
        }
        kept.into()
    }

    /// Records how `ep` answered (`failed`: 5xx or no connection), and
    /// ejects it when outlier detection says so; `true` when it was ejected
    /// now.
    pub fn report(
        &self,
        ep: SocketAddr,
        failed: bool,
        rules: (Option<&pb::OutlierDetection>, &[Endpoint]),
    ) -> bool {
        self.report_at(ep, failed, rules, Instant::now())
    }

    fn report_at(
        &self,
        ep: SocketAddr,
        failed: bool,
        (rules, siblings): (Option<&pb::OutlierDetection>, &[Endpoint]),
        now: Instant,
    ) -> bool {
        let Some(rules) = rules.filter(|r| r.consecutive_5xx > 0) else {
            return false;
        };
        let mut health = self.health.lock().expect("poisoned");
        let h = health.entry(ep).or_default();
        if !failed {
            h.consecutive = 0;
            return false;
        }
        h.consecutive += 1;
        if h.consecutive < rules.consecutive_5xx || h.ejected(now) {
            return false;
        }
        let n = siblings.len();
        let out = siblings
            .iter()
            .filter(|s| health.get(&s.addr).is_some_and(|h| h.ejected(now)))
            .count();
        let allowed = (n * rules.max_ejection_percent as usize / 100)
            .max(1)
            .min(n.saturating_sub(1));
        if out >= allowed {
            return false;
        }
        let h = health.entry(ep).or_default();
        h.consecutive = 0;
        h.ejections += 1;
        h.until = Some(now + Duration::from_millis(rules.base_ejection_ms) * h.ejections);
        true
    }
}

/// A permit from `slots` (none: unlimited), waiting while fewer than
/// `maxPendingRequests` already wait.
async fn take(
    b: &Breaker,
    slots: Option<&Arc<Semaphore>>,
    what: &str,
) -> Result<Option<OwnedSemaphorePermit>, String> {
    let Some(slots) = slots else { return Ok(None) };
    if let Ok(p) = slots.clone().try_acquire_owned() {
        return Ok(Some(p));
    }
    let waiting = b.waiting.fetch_add(1, Ordering::Relaxed);
    if waiting >= b.limits.max_pending_requests {
        b.waiting.fetch_sub(1, Ordering::Relaxed);
        return Err(format!("circuit open: {what} reached, no room to wait"));
    }
    let permit = slots.clone().acquire_owned().await;
    b.waiting.fetch_sub(1, Ordering::Relaxed);
    permit
        .map(Some)
        .map_err(|_| "circuit closed for good".to_owned())
}

/// Token buckets, one per rate limit (and client, with `perSource`).
#[derive(Debug, Default)]
pub struct Buckets(Mutex<HashMap<(String, String), Bucket>>);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets kept at most: past it, those full again are forgotten (a new
/// one starts full: nothing is given away).
const MAX_BUCKETS: usize = 65_536;

impl Buckets {
    /// Takes a token for a request from `source`; when none is left, how
    /// long until one is.
    pub fn take(&self, rl: &pb::RateLimit, source: &Identity) -> Result<(), Duration> {
        let who = if rl.per_source {
            source.to_string()
        } else {
            String::new()
        };
        let key = (rl.key.clone(), who);
        let per_ms = f64::from(rl.requests) / rl.interval_ms.max(1) as f64;
        let burst = f64::from(rl.burst.max(1));
        let now = Instant::now();
        let refilled = |b: &Bucket| {
            (b.tokens + now.duration_since(b.at).as_secs_f64() * 1000.0 * per_ms).min(burst)
        };
        let mut buckets = self.0.lock().expect("poisoned");
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&key) {
            buckets.retain(|_, b| refilled(b) < burst);
            if buckets.len() >= MAX_BUCKETS {
                return Err(Duration::from_secs(1)); // deny on doubt
            }
        }
        let b = buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = refilled(b);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_millis(
            ((1.0 - b.tokens) / per_ms).ceil() as u64
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(i: u8) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([10, 0, 0, i], 8080)),
            identity: "spiffe://cluster.local/ns/default/sa/api"
                .parse()
                .expect("id"),
        }
    }

    #[tokio::test]
    async fn limits_open_and_close() {
        let r = Resilience::default();
        let limits = pb::BackendLimits {
            max_requests: 2,
            max_pending_requests: 0,
            max_retries: 1,
            ..Default::default()
        };
        let a = r.admit("s", Some(&limits), false).await.expect("1st");
        let _b = r.admit("s", Some(&limits), false).await.expect("2nd");
        assert!(r.admit("s", Some(&limits), false).await.is_err(), "open");
        drop(a);
        assert!(
            r.admit("s", Some(&limits), false).await.is_ok(),
            "closed again"
        );
        let retry = r.retry("s", Some(&limits)).expect("one retry");
        assert!(r.retry("s", Some(&limits)).is_none(), "maxRetries");
        drop(retry);
        assert!(r.retry("s", Some(&limits)).is_some());
    }

    #[test]
    fn buckets_allow_the_burst_then_the_rate() {
        let b = Buckets::default();
        let rl = pb::RateLimit {
            key: "shop/rl".into(),
            requests: 1,
            interval_ms: 60_000,
            burst: 3,
            per_source: true,
        };
        let a: Identity = "spiffe://cluster.local/ns/shop/sa/a".parse().expect("id");
        let other: Identity = "spiffe://cluster.local/ns/shop/sa/b".parse().expect("id");
        let taken: Vec<bool> = (0..5).map(|_| b.take(&rl, &a).is_ok()).collect();
        assert_eq!(taken, [true, true, true, false, false]);
        let wait = b.take(&rl, &a).expect_err("empty");
        assert!(
            wait > Duration::from_secs(50) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        assert!(
            b.take(&rl, &other).is_ok(),
            "another source has its own budget"
        );
    }

    #[test]
    fn outliers_are_ejected_within_the_percentage_and_come_back() {
        let r = Resilience::default();
        let eps: Arc<[Endpoint]> = vec![ep(1), ep(2), ep(3), ep(4)].into();
        let rules = pb::OutlierDetection {
            consecutive_5xx: 2,
            base_ejection_ms: 60_000,
            max_ejection_percent: 25,
        };
        let report = |i: usize, failed| r.report(eps[i].addr, failed, (Some(&rules), &eps));
        assert!(!report(0, true), "one failure is not enough");
        assert!(
            !report(0, false) && !report(0, true),
            "a success resets the count"
        );
        assert!(report(0, true), "two in a row eject");
        assert_eq!(r.healthy(&eps).len(), 3);
        assert!(
            !report(1, true) && !report(1, true),
            "25% of 4: one out at most"
        );
        assert_eq!(r.healthy(&eps).len(), 3);
        // Back when its time is up (60 s after the first ejection)...
        let later = |s| Instant::now() + Duration::from_secs(s);
        assert_eq!(r.healthy_at(&eps, later(59)).len(), 3, "not before");
        assert_eq!(r.healthy_at(&eps, later(61)).len(), 4, "back after");
        // ...and out twice as long the second time.
        let again = later(61);
        let fail_at = |t| r.report_at(eps[0].addr, true, (Some(&rules), &eps), t);
        assert!(!fail_at(again) && fail_at(again), "ejected again");
        let after = |s| again + Duration::from_secs(s);
        assert_eq!(r.healthy_at(&eps, after(119)).len(), 3, "120 s this time");
        assert_eq!(r.healthy_at(&eps, after(121)).len(), 4);
        // A single endpoint is never ejected.
        let one: Arc<[Endpoint]> = vec![ep(9)].into();
        for _ in 0..5 {
            assert!(!r.report(one[0].addr, true, (Some(&rules), &one)));
        }
    }
}
