//! Waypoints in a cluster (SPEC §6): each Gateway of class `weft-waypoint`
//! becomes a ServiceAccount, a Deployment and a Service of its name in its
//! namespace, owned by the Gateway (deleting it deletes them), plus the
//! trust bundle ConfigMap its pods mount; the Gateway's status says whether
//! it is `Accepted` and `Programmed`, and at which address, as Gateway API
//! clients expect. Only the leader writes (crate::leader); it looks again
//! when the waypoints in the served config change (a Gateway, or its
//! instances — not every pod's churn) and every 30 s. Everything is
//! server-side applied, so a look that changes nothing writes nothing new.

use std::sync::Arc;
use std::time::Duration;

use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::Gateway;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::kube_ca::{BUNDLE_KEY, TRUST_BUNDLE};
use crate::source::gateway::GATEWAY_NAME_LABEL;
use crate::source::translate::WAYPOINT_CLASS;
use crate::state::Snapshot;

const MANAGER: &str = "weft-controller";
const HBONE_PORT: u16 = 15008;
const TOKEN_DIR: &str = "/var/run/secrets/weft";
const TRUST_DIR: &str = "/var/run/weft-trust";

/// What a waypoint Deployment runs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub image: String,
    /// The controller as the waypoint dials it.
    pub controller: String,
    /// The mesh root(s), PEM, followed: the trust bundle put beside each
    /// waypoint.
    pub roots: watch::Receiver<String>,
    /// Where waypoints export sampled requests' spans (OTLP/gRPC);
    /// `None`: not exported.
    pub otlp_endpoint: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            image: format!(
                "ghcr.io/weft-mesh/weft-waypoint:{}",
                env!("CARGO_PKG_VERSION")
            ),
            controller: "weft-controller.weft-system.svc:15012".into(),
            roots: watch::channel(String::new()).1,
            otlp_endpoint: None,
        }
    }
}

/// Keeps every waypoint Gateway programmed while this replica leads.
pub fn spawn(
    client: Client,
    settings: Settings,
    mut leader: watch::Receiver<bool>,
    mut config: watch::Receiver<Arc<Snapshot>>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        // The first tick is at once; then a pass every RESYNC mends drift.
        let mut resync = tokio::time::interval(RESYNC);
        let mut seen = None;
        let mut roots = settings.roots.clone();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = leader.changed() => if changed.is_err() { return },
                _ = resync.tick() => {}
                // A rotation: every waypoint's trust bundle follows.
                Ok(()) = roots.changed() => {}
                changed = config.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Most versions are pod churn: only a change to the
                    // waypoints (a Gateway, or its instances) needs a pass.
                    let now = waypoints_of(&config.borrow_and_update());
                    if seen.replace(now.clone()) == Some(now) {
                        continue;
                    }
                }
            }
            if *leader.borrow_and_update()
                && let Err(e) = reconcile(&client, &settings).await
            {
                warn!(error = %e, "waypoint deployments: will look again");
            }
        }
    });
}

/// How often the leader looks again when nothing it watches has moved.
const RESYNC: Duration = Duration::from_secs(30);

/// What a pass depends on in the served config: each waypoint and its
/// ready instances (which decide `Programmed`).
fn waypoints_of(snapshot: &Snapshot) -> Vec<(String, Vec<std::net::IpAddr>)> {
    let waypoints = &snapshot.model.waypoints;
    waypoints
        .iter()
        .map(|w| (w.key.clone(), w.addresses.clone()))
        .collect()
}

/// One pass over every waypoint Gateway.
pub async fn reconcile(client: &Client, s: &Settings) -> kube::Result<()> {
    let gateways = match Api::<Gateway>::all(client.clone())
        .list(&Default::default())
        .await
    {
        Ok(list) => list.items,
        // No Gateway API in this cluster: no waypoints to make.
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(e),
    };
    install_class(client).await?;
    for gw in gateways
        .iter()
        .filter(|g| g.spec.gateway_class_name == WAYPOINT_CLASS)
    {
        let programmed = program(client, s, gw).await;
        if let Err(e) = &programmed {
            warn!(gateway = %gw.name_any(), error = %e, "waypoint not programmed");
        }
        set_status(client, gw, programmed).await?;
    }
    Ok(())
}

/// The name waypoint Gateways are programmed by.
pub const CONTROLLER_NAME: &str = "weft.dev/waypoint-controller";

/// The GatewayClass `weft-waypoint`, made here (the Gateway API may arrive
/// after weft) and accepted.
async fn install_class(client: &Client) -> kube::Result<()> {
    let api = Api::<GatewayClass>::all(client.clone());
    let class = json!({"apiVersion": GatewayClass::api_version(&()), "kind": GatewayClass::kind(&()),
        "metadata": {"name": WAYPOINT_CLASS, "labels": {"app.kubernetes.io/managed-by": "weft"}},
        "spec": {"controllerName": CONTROLLER_NAME,
                 "description": "weft waypoints: the L7 hop for a namespace or service account"}});
    let made = api
        .patch(WAYPOINT_CLASS, &apply(), &Patch::Apply(class))
        .await?;
    let accepted = made
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Accepted" && c.status == "True");
    if accepted {
        return Ok(());
    }
    let status = json!({"apiVersion": GatewayClass::api_version(&()), "kind": GatewayClass::kind(&()),
        "status": {"conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
            "message": "handled by weft", "observedGeneration": made.metadata.generation.unwrap_or(0),
            "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string()}]}});
    api.patch_status(WAYPOINT_CLASS, &apply(), &Patch::Apply(status))
        .await?;
    Ok(())
}

fn apply() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// The Gateway as the owner of what is made for it (garbage-collected with
/// it). No `blockOwnerDeletion`: where the OwnerReferencesPermission
/// admission plugin runs, setting it needs delete rights on Gateways,
/// which the controller has no use for.
fn owner(gw: &Gateway) -> Value {
    json!([{"apiVersion": Gateway::api_version(&()), "kind": Gateway::kind(&()),
            "name": gw.name_any(), "uid": gw.uid().unwrap_or_default(),
            "controller": true}])
}

/// Applies the waypoint's objects; its Service's address and whether a
/// pod is available yet.
async fn program(client: &Client, s: &Settings, gw: &Gateway) -> kube::Result<(String, bool)> {
    let (ns, name) = (gw.namespace().unwrap_or_default(), gw.name_any());
    let meta = |kind: &str| {
        json!({"apiVersion": if kind == "Deployment" { "apps/v1" } else { "v1" }, "kind": kind,
               "metadata": {"name": name, "namespace": ns, "ownerReferences": owner(gw),
                            "labels": {GATEWAY_NAME_LABEL: name, "app.kubernetes.io/managed-by": "weft"}}})
    };
    let sa = meta("ServiceAccount");
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .patch(&name, &apply(), &Patch::Apply(sa))
        .await?;
    let bundle = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": TRUST_BUNDLE, "namespace": ns, "labels": {"app.kubernetes.io/part-of": "weft"}},
        "data": {BUNDLE_KEY: *s.roots.borrow()}});
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .patch(TRUST_BUNDLE, &apply(), &Patch::Apply(bundle))
        .await?;
    let mut deployment = meta("Deployment");
    deployment["spec"] = deployment_spec(s, &ns, &name);
    let made = Api::<Deployment>::namespaced(client.clone(), &ns)
        .patch(&name, &apply(), &Patch::Apply(deployment))
        .await?;
    let available = made
        .status
        .and_then(|st| st.available_replicas)
        .unwrap_or(0)
        > 0;
    let mut service = meta("Service");
    service["spec"] = json!({"selector": {GATEWAY_NAME_LABEL: name},
        "ports": [{"name": "mesh", "port": HBONE_PORT, "targetPort": HBONE_PORT, "protocol": "TCP"}]});
    let svc = Api::<Service>::namespaced(client.clone(), &ns)
        .patch(&name, &apply(), &Patch::Apply(service))
        .await?;
    let ip = svc.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
    Ok((ip, available))
}

fn deployment_spec(s: &Settings, ns: &str, name: &str) -> Value {
    let mut args = vec!["--name", name, "-n", ns, "--ca-addr", &s.controller];
    let (root, token) = (
        format!("{TRUST_DIR}/{BUNDLE_KEY}"),
        format!("{TOKEN_DIR}/token"),
    );
    args.extend(["--ca-root", &root, "--token-file", &token]);
    args.extend(["--log-format", "json"]);
    if let Some(endpoint) = &s.otlp_endpoint {
        args.extend(["--otlp-endpoint", endpoint]);
    }
    json!({
        "replicas": 1,
        "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
        "template": {
            "metadata": {"labels": {GATEWAY_NAME_LABEL: name}},
            "spec": {
                "serviceAccountName": name,
                "containers": [{
                    "name": "waypoint", "image": s.image, "args": args,
                    "ports": [{"name": "mesh", "containerPort": HBONE_PORT}],
                    "readinessProbe": {"tcpSocket": {"port": HBONE_PORT}},
                    "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}},
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532,
                        "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                        "capabilities": {"drop": ["ALL"]}},
                    "volumeMounts": [
                        {"name": "weft-token", "mountPath": TOKEN_DIR, "readOnly": true},
                        {"name": "trust-bundle", "mountPath": TRUST_DIR, "readOnly": true}],
                }],
                "volumes": [
                    {"name": "weft-token", "projected": {"sources": [{"serviceAccountToken":
                        {"path": "token", "audience": "weft-ca", "expirationSeconds": 3600}}]}},
                    {"name": "trust-bundle", "configMap": {"name": TRUST_BUNDLE}}],
            },
        },
    })
}

/// `Accepted` always (the class is ours); `Programmed` once a pod is
/// available, else why not; the Service's address.
async fn set_status(
    client: &Client,
    gw: &Gateway,
    programmed: kube::Result<(String, bool)>,
) -> kube::Result<()> {
    let generation = gw.metadata.generation.unwrap_or(0);
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let earlier = gw
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    // A condition keeps its transition time while its status holds.
    let since = |kind: &str, status: &str| {
        earlier
            .iter()
            .find(|c| c.type_ == kind && c.status == status)
            .map_or(now.clone(), |c| c.last_transition_time.0.to_string())
    };
    let condition = |kind: &str, ok: bool, reason: &str, message: &str| {
        let status = if ok { "True" } else { "False" };
        json!({"type": kind, "status": status, "reason": reason, "message": message,
               "observedGeneration": generation, "lastTransitionTime": since(kind, status)})
    };
    let (addresses, programmed) = match &programmed {
        Ok((ip, true)) => (
            ip.clone(),
            condition("Programmed", true, "Programmed", "waypoint running"),
        ),
        Ok((ip, false)) => (
            ip.clone(),
            condition(
                "Programmed",
                false,
                "Pending",
                "waiting for a waypoint pod to be available",
            ),
        ),
        Err(e) => (
            String::new(),
            condition(
                "Programmed",
                false,
                "Invalid",
                &format!("cannot make the waypoint's objects: {e}"),
            ),
        ),
    };
    let addresses: Vec<Value> = (!addresses.is_empty())
        .then(|| json!({"type": "IPAddress", "value": addresses}))
        .into_iter()
        .collect();
    let status = json!({"apiVersion": Gateway::api_version(&()), "kind": Gateway::kind(&()),
        "status": {"conditions": [condition("Accepted", true, "Accepted", "weft programs this waypoint"), programmed],
                   "addresses": addresses}});
    let ns = gw.namespace().unwrap_or_default();
    Api::<Gateway>::namespaced(client.clone(), &ns)
        .patch_status(&gw.name_any(), &apply(), &Patch::Apply(status))
        .await?;
    info!(gateway = %format!("{ns}/{}", gw.name_any()), "waypoint status written");
    Ok(())
}
