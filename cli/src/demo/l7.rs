//! The demo's second act: a waypoint for the `api` service account, as a
//! user adds one — `kubectl weft waypoint apply`, a label on the Service,
//! an HTTPRoute — then what it does: a 90/10 split, a header route, a retry
//! that hides a failing backend, an injected delay and an abort; then the
//! same waypoint guarding api: an L7 DENY however the path is spelled, a
//! circuit breaker opening under a burst, a rate limit, an endpoint
//! ejected for failing, and the waypoint's request metrics.

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_controller::app::Bound as Controller;

use super::mesh::{Check, VIP, check};
use super::topology::PodNs;
use super::waypoint::{Waypoint, start_waypoint};
use crate::commands::{self, Target, WaypointSpec};

/// The Services, routes and faults of the act (what a user would apply).
fn l7_yaml(waypoint: &PodNs) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: waypoint, namespace: default, labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}}}
spec: {{nodeName: node-b, serviceAccountName: waypoint, containers: [{{name: waypoint, image: weft-waypoint}}]}}
status: {{phase: Running, podIP: {ip}}}
---
apiVersion: v1
kind: Service
metadata: {{name: api-v1, namespace: default}}
spec: {{clusterIP: 10.96.0.11, selector: {{version: v1}}, ports: [{{port: 80, targetPort: http}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: api-v2, namespace: default}}
spec: {{clusterIP: 10.96.0.12, selector: {{version: v2}}, ports: [{{port: 80, targetPort: http}}]}}
---
apiVersion: weft.dev/v1alpha1
kind: FaultInjection
metadata: {{name: slow, namespace: default}}
spec: {{delay: {{fixed: 300ms, percentage: 100}}}}
---
apiVersion: weft.dev/v1alpha1
kind: FaultInjection
metadata: {{name: half-down, namespace: default}}
spec: {{abort: {{httpStatus: 503, percentage: 50}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: api, namespace: default}}
spec:
  parentRefs: [{{group: "", kind: Service, name: api, port: 80}}]
  rules:
    - matches: [{{headers: [{{name: x-version, value: v2}}]}}]
      backendRefs: [{{name: api-v2, port: 80}}]
    - matches: [{{path: {{type: PathPrefix, value: /flaky}}}}]
      retry: {{attempts: 2, codes: [503]}}
      backendRefs: [{{name: api-v1, port: 80}}]
    - matches: [{{path: {{type: PathPrefix, value: /slow}}}}]
      filters: [{{type: ExtensionRef, extensionRef: {{group: weft.dev, kind: FaultInjection, name: slow}}}}]
      backendRefs: [{{name: api, port: 80}}]
    - matches: [{{path: {{type: PathPrefix, value: /abort}}}}]
      filters: [{{type: ExtensionRef, extensionRef: {{group: weft.dev, kind: FaultInjection, name: half-down}}}}]
      backendRefs: [{{name: api, port: 80}}]
    - matches: [{{path: {{type: PathPrefix, value: /hold}}}}]
      backendRefs: [{{name: api-v1, port: 80}}]
    - matches: [{{path: {{type: PathPrefix, value: /limited}}}}]
      filters: [{{type: ExtensionRef, extensionRef: {{group: weft.dev, kind: RateLimit, name: ten-a-minute}}}}]
      backendRefs: [{{name: api-v1, port: 80}}]
    - matches: [{{path: {{type: PathPrefix, value: /sick}}}}]
      backendRefs: [{{name: api, port: 80}}]
    - backendRefs: [{{name: api-v1, port: 80, weight: 90}}, {{name: api-v2, port: 80, weight: 10}}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: default}}
spec:
  targetRefs: [{{group: "", kind: Service, name: api}}]
  action: DENY
  rules: [{{paths: [/admin, /admin/*]}}]
---
apiVersion: weft.dev/v1alpha1
kind: BackendPolicy
metadata: {{name: api-v1-limits, namespace: default}}
spec: {{targetRef: {{kind: Service, name: api-v1}}, limits: {{maxRequests: 2, maxPendingRequests: 0}}}}
---
apiVersion: weft.dev/v1alpha1
kind: BackendPolicy
metadata: {{name: api-outliers, namespace: default}}
spec:
  targetRef: {{kind: Service, name: api}}
  outlierDetection: {{consecutive5xx: 3, baseEjectionTime: 30s, maxEjectionPercent: 50}}
---
apiVersion: weft.dev/v1alpha1
kind: RateLimit
metadata: {{name: ten-a-minute, namespace: default}}
spec: {{requests: 10, interval: 1m}}
"#,
        ip = waypoint.ip
    )
}

/// Applies the act's config, starts the waypoint, and waits until every
/// proxy holds the config that binds `api` to it.
pub async fn set_up(
    ctl: &Controller,
    config_dir: &Path,
    waypoint_pod: &PodNs,
    dir: &Path,
) -> anyhow::Result<Waypoint> {
    std::fs::write(config_dir.join("l7.yaml"), l7_yaml(waypoint_pod))?;
    let target = Target::local(
        format!("http://{}", ctl.rest_addr),
        dir.join("controller/api-token"),
    );
    let spec = WaypointSpec {
        namespace: "default".into(),
        name: "waypoint".into(),
        for_service_account: Some("api".into()),
        enroll_namespace: false,
    };
    let applied = commands::waypoint_apply(&target, &spec).await?;
    println!("$ kubectl weft waypoint apply -n default --for-service-account api");
    print!("{}", indent(&applied));
    // The user labels their Service in their own file.
    let shop = config_dir.join("shop.yaml");
    let labelled = std::fs::read_to_string(&shop)?.replace(
        "metadata: {name: api, namespace: default}",
        "metadata: {name: api, namespace: default, labels: {weft.dev/use-waypoint: waypoint}}",
    );
    std::fs::write(&shop, labelled)?;
    println!(
        "$ label Service default/api weft.dev/use-waypoint=waypoint; apply l7.yaml (HTTPRoute, FaultInjections)"
    );
    let bound = async {
        let mut rx = ctl.sources.clone();
        loop {
            let m = ctl.config.current().model.clone();
            let api = m.service("default/api").and_then(|s| s.waypoint.clone());
            if api.is_some()
                && m.routes.len() == 1
                && m.waypoint("default/waypoint")
                    .is_some_and(|w| !w.addresses.is_empty())
            {
                return anyhow::Ok(());
            }
            rx.changed().await?;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), bound)
        .await
        .context("the controller did not serve the waypoint config within 10 s")??;
    let wp = start_waypoint(
        ctl,
        "default/waypoint",
        "waypoint",
        waypoint_pod,
        &dir.join("waypoint"),
    )
    .await?;
    all_acked(ctl).await?;
    println!(
        "waypoint     default/waypoint in its own pod {} :15008, for service account api; ztunnels and waypoint ACKed",
        waypoint_pod.ip
    );
    Ok(wp)
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("             {l}\n"))
        .collect()
}

/// Waits (bounded) until every connected proxy ACKed the current version.
async fn all_acked(ctl: &Controller) -> anyhow::Result<()> {
    let acked = async {
        loop {
            let version = ctl.config.current().version;
            let proxies = ctl.proxies.all();
            let done = proxies.len() >= 3
                && proxies
                    .values()
                    .all(|p| p.connected && p.acked.values().all(|v| *v == version));
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), acked)
        .await
        .context("the proxies did not ACK the waypoint config within 10 s")
}

/// One HTTP/1.1 GET from inside `pod`, `header` lines added: (status,
/// body), bounded.
pub async fn request(
    pod: &PodNs,
    dst: SocketAddr,
    path: &str,
    header: &str,
) -> Result<(u16, String), String> {
    let exchange = async {
        let mut s = pod.connect(dst).await.map_err(|e| e.to_string())?;
        let req =
            format!("GET {path} HTTP/1.1\r\nhost: {dst}\r\n{header}connection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or("no response")?;
        let body = resp
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .trim()
            .to_owned();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// Sends `n` requests and counts the answers (`<status> <body>`).
async fn tally(pod: &PodNs, path: &str, header: &str, n: usize) -> BTreeMap<String, usize> {
    let vip: SocketAddr = format!("{VIP}:80").parse().expect("static address");
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let key = match request(pod, vip, path, header).await {
            Ok((200, body)) => body,
            Ok((status, _)) => status.to_string(),
            Err(e) => format!("error: {e}"),
        };
        *seen.entry(key).or_default() += 1;
    }
    seen
}

fn show(what: &str, seen: &BTreeMap<String, usize>) {
    let parts: Vec<String> = seen.iter().map(|(k, n)| format!("{n} × {k}")).collect();
    println!("{what:<13}{}", parts.join(", "));
}

/// The act's traffic and its checks.
pub async fn run(web: &PodNs, wp: &Waypoint) -> Vec<Check> {
    let mut checks = Vec::new();
    let get = |seen: &BTreeMap<String, usize>, k: &str| seen.get(k).copied().unwrap_or(0);
    // 90/10: api-2's share of 100 is Binomial(100, 0.1); [1, 25] holds it
    // but with p < 0.001.
    let split = tally(web, "/", "", 100).await;
    show("split", &split);
    let v2 = get(&split, "api-2");
    checks.push(check(
        get(&split, "api-1") + v2 == 100 && (1..=25).contains(&v2),
        format!("the waypoint splits api 90/10 (api-2 got {v2} of 100)"),
    ));
    let header = tally(web, "/", "x-version: v2\r\n", 10).await;
    show("header route", &header);
    checks.push(check(
        get(&header, "api-2") == 10,
        "x-version: v2 goes to api-2, every time",
    ));
    let retries = wp.proxy.stats.retries.load(Ordering::Relaxed);
    let flaky = tally(web, "/flaky", "", 10).await;
    let retried = wp.proxy.stats.retries.load(Ordering::Relaxed) - retries;
    show("retry", &flaky);
    println!(
        "             api-1 fails every other /flaky request; the waypoint retried {retried} times"
    );
    checks.push(check(
        get(&flaky, "api-1") == 10 && retried == 10,
        "a retry hides a backend failing every other request (10 of 10 answered, 10 retries)",
    ));
    let started = Instant::now();
    let slow = tally(web, "/slow", "", 3).await;
    let each = started.elapsed() / 3;
    show("delay", &slow);
    println!(
        "             {} ms per request with a 300 ms injected delay",
        each.as_millis()
    );
    checks.push(check(
        slow.values().sum::<usize>() == 3
            && get(&slow, "503") == 0
            && each >= Duration::from_millis(300),
        "an injected 300 ms delay holds each request at least that long",
    ));
    // Half aborted: Binomial(40, 0.5); [6, 34] fails by chance with p < 0.001.
    let abort = tally(web, "/abort", "", 40).await;
    show("abort", &abort);
    let aborted = get(&abort, "503");
    checks.push(check(
        (6..=34).contains(&aborted) && aborted + get(&abort, "api-1") + get(&abort, "api-2") == 40,
        format!("a 50% abort answers 503 to about half ({aborted} of 40)"),
    ));
    checks
}

/// The act's third part: what the waypoint enforces, and its metrics.
pub async fn guard(web: &PodNs, wp: &Waypoint) -> Vec<Check> {
    let mut checks = Vec::new();
    let get = |seen: &BTreeMap<String, usize>, k: &str| seen.get(k).copied().unwrap_or(0);
    let stats = &wp.proxy.stats.requests;
    let denied = stats.get("DENY");
    let mut admin = BTreeMap::new();
    for path in [
        "/admin/users",
        "/%61dmin/users",
        "/x/../admin/users",
        "//admin",
    ] {
        *admin
            .entry(format!("{path} → {}", status_of(web, path).await))
            .or_default() += 1;
    }
    show("L7 DENY", &admin);
    let users = status_of(web, "/users").await;
    println!("             /users → {users} (policy default/no-admin denies /admin and /admin/*)");
    checks.push(check(
        admin.keys().all(|k| k.ends_with("403")) && users == 200 && stats.get("DENY") - denied == 4,
        "an L7 DENY holds however the path is spelled (4 × 403, counted), other paths pass",
    ));

    let open = stats.get("UO");
    let burst = burst(web, "/hold").await;
    show("breaker", &burst);
    println!("             8 at once to api-v1 (maxRequests 2, no room to wait; each held 300 ms)");
    checks.push(check(
        get(&burst, "503") >= 4
            && get(&burst, "api-1") >= 2
            && stats.get("UO") - open == get(&burst, "503") as u64,
        "a circuit breaker opens under a burst (503 UO past 2 in flight) and closes after",
    ));

    let limited = tally(web, "/limited", "", 15).await;
    show("rate limit", &limited);
    checks.push(check(
        (10..=11).contains(&get(&limited, "api-1"))
            && get(&limited, "429") + get(&limited, "api-1") == 15,
        "a rate limit of 10 a minute answers the rest of a burst of 15 with 429",
    ));

    let first = tally(web, "/sick", "", 8).await;
    let then = tally(web, "/sick", "", 8).await;
    show("outlier", &first);
    show("  then", &then);
    checks.push(check(
        (3..=4).contains(&get(&first, "503")) && get(&then, "api-2") == 8,
        "an endpoint failing 3 times in a row is ejected; its peer serves the rest",
    ));
    print_metrics();
    checks
}

async fn status_of(pod: &PodNs, path: &str) -> u16 {
    let vip: SocketAddr = format!("{VIP}:80").parse().expect("static address");
    request(pod, vip, path, "").await.map_or(0, |(s, _)| s)
}

/// Eight requests at once; the answers counted as [`tally`] does.
async fn burst(pod: &PodNs, path: &str) -> BTreeMap<String, usize> {
    let vip: SocketAddr = format!("{VIP}:80").parse().expect("static address");
    let one = || request(pod, vip, path, "");
    let all = tokio::join!(one(), one(), one(), one(), one(), one(), one(), one());
    let mut seen = BTreeMap::new();
    for r in [all.0, all.1, all.2, all.3, all.4, all.5, all.6, all.7] {
        let key = match r {
            Ok((200, body)) => body,
            Ok((status, _)) => status.to_string(),
            Err(e) => format!("error: {e}"),
        };
        *seen.entry(key).or_default() += 1;
    }
    seen
}

/// The waypoint's request counts for api's Services, from its metrics.
fn print_metrics() {
    let text = weft_proto::process::prometheus().render();
    let label = |line: &str, name: &str| {
        let start = line.find(&format!("{name}=\""))? + name.len() + 2;
        line[start..].split('"').next().map(str::to_owned)
    };
    let mut rows: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("weft_requests_total{"))
    {
        let (Some(service), Some(code), Some(flags)) = (
            label(line, "destination_service"),
            label(line, "response_code"),
            label(line, "response_flags"),
        ) else {
            continue;
        };
        let n: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *rows.entry((service, code, flags)).or_default() += n;
    }
    println!(
        "\nwaypoint metrics  weft_requests_total by destination_service, response_code, response_flags"
    );
    for ((service, code, flags), n) in rows {
        println!("             {service:<16} {code}  {flags:<5} {n}");
    }
}
