//! `kubectl weft` against a cluster (`--kubeconfig`, `--context` or
//! `--kubernetes`): the commands that change the mesh write Kubernetes
//! objects with the user's own kubeconfig credentials — a Namespace label,
//! a Gateway — so cluster RBAC decides who may, as with kubectl. The
//! controller picks the change up from its watches.

use std::path::PathBuf;
use std::time::Duration;

use gateway_api::gateways::Gateway;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use weft_controller::source::translate::{MESH_LABEL, USE_WAYPOINT};

use crate::commands::{
    CliError, Output, Target, WaypointSpec, s, structured, table, waypoint_gateway,
};

const MANAGER: &str = "kubectl-weft";

/// A kube error as the user should read it: the API's refusal (with the
/// RBAC hint for 403), or the API server out of reach.
fn kube_err(what: &str) -> impl FnOnce(kube::Error) -> CliError + '_ {
    move |e| match e {
        kube::Error::Api(s) if s.code == 403 => CliError::Refused(format!(
            "{what}: forbidden by the cluster ({}); ask for RBAC on it",
            s.message
        )),
        kube::Error::Api(s) => CliError::Refused(format!("{what}: {}", s.message)),
        other => CliError::Unreachable {
            url: "the Kubernetes API".into(),
            reason: format!("{what}: {other}"),
        },
    }
}

pub struct Cluster {
    client: Client,
}

impl Cluster {
    /// The API server the kubeconfig names (default: `$KUBECONFIG`, else
    /// `~/.kube/config`, its current context).
    pub async fn connect(
        kubeconfig: Option<PathBuf>,
        context: Option<String>,
    ) -> Result<Self, CliError> {
        let access = weft_controller::app::KubeAccess {
            kubeconfig,
            context,
            ..Default::default()
        };
        let unreachable = |reason: String| CliError::Unreachable {
            url: "the Kubernetes API".into(),
            reason,
        };
        let mut config = weft_controller::source::kubernetes::config(&access)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        // A person is waiting: an API server's 503 is reported, not
        // retried for minutes as a controller would.
        config.default_retry = false;
        let client = Client::try_from(config).map_err(|e| unreachable(e.to_string()))?;
        Ok(Cluster { client })
    }

    /// Reads of the controller's state, through the API server's
    /// aggregated API, as the kubeconfig's user.
    pub fn target(&self) -> Target {
        Target {
            controller: "the API server (api.weft.dev)".into(),
            token_file: Default::default(),
            cluster: Some(self.client.clone()),
        }
    }

    async fn namespace(&self, ns: &str) -> Result<Namespace, CliError> {
        let found = Api::<Namespace>::all(self.client.clone())
            .get_opt(ns)
            .await
            .map_err(kube_err("reading the namespace"))?;
        found.ok_or_else(|| {
            CliError::Refused(format!(
                "namespace {ns} does not exist (kubectl get namespaces lists them)"
            ))
        })
    }

    async fn label(&self, ns: &str, key: &str, value: Option<&str>) -> Result<(), CliError> {
        let patch = json!({"metadata": {"labels": {key: value}}});
        Api::<Namespace>::all(self.client.clone())
            .patch(ns, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(kube_err("labelling the namespace"))?;
        Ok(())
    }

    /// `join` / `leave`: the namespace's `weft.dev/mesh` label.
    pub async fn set_membership(&self, ns: &str, join: bool) -> Result<String, CliError> {
        let current = self.namespace(ns).await?;
        let labels = current.metadata.labels.unwrap_or_default();
        let member = labels.get(MESH_LABEL).is_some_and(|v| v == "enabled");
        if member == join {
            let state = if join { "already in" } else { "not in" };
            return Ok(format!("namespace {ns} is {state} the mesh\n"));
        }
        self.label(ns, MESH_LABEL, join.then_some("enabled"))
            .await?;
        let verb = if join { "joined" } else { "left" };
        let hint = if join {
            "; restart its pods to mesh them (kubectl rollout restart deploy -n NS)"
        } else {
            ""
        };
        Ok(format!("namespace {ns} {verb} the mesh{hint}\n"))
    }

    /// `waypoint apply`: the Gateway, server-side applied; the leader
    /// deploys it.
    pub async fn waypoint_apply(&self, spec: &WaypointSpec) -> Result<String, CliError> {
        let (ns, name) = (&spec.namespace, &spec.name);
        self.namespace(ns).await?;
        Api::<Gateway>::namespaced(self.client.clone(), ns)
            .patch(
                name,
                &PatchParams::apply(MANAGER),
                &Patch::Apply(waypoint_gateway(spec)),
            )
            .await
            .map_err(kube_err("applying the waypoint's Gateway"))?;
        let mut out = format!("waypoint {ns}/{name} applied\n");
        if spec.enroll_namespace {
            self.label(ns, USE_WAYPOINT, Some(name)).await?;
            out += &format!("namespace {ns} now uses it\n");
        }
        Ok(out)
    }

    /// `waypoint delete`: the Gateway (its Deployment and Service go with
    /// it), and the namespace's binding when it names this waypoint.
    pub async fn waypoint_delete(&self, ns: &str, name: &str) -> Result<String, CliError> {
        let deleted = Api::<Gateway>::namespaced(self.client.clone(), ns)
            .delete(name, &DeleteParams::default())
            .await;
        match deleted {
            Err(kube::Error::Api(s)) if s.code == 404 => {
                return Err(CliError::Refused(format!(
                    "no waypoint {ns}/{name} (kubectl get gateways -n {ns} lists them)"
                )));
            }
            other => {
                other.map_err(kube_err("deleting the waypoint's Gateway"))?;
            }
        }
        let mut out = format!("waypoint {ns}/{name} deleted\n");
        let labels = self
            .namespace(ns)
            .await?
            .metadata
            .labels
            .unwrap_or_default();
        if labels.get(USE_WAYPOINT).is_some_and(|w| w == name) {
            self.label(ns, USE_WAYPOINT, None).await?;
            out += &format!("namespace {ns} no longer uses it\n");
        }
        Ok(out)
    }

    /// `status` in a cluster, from the objects weft runs as: controller
    /// replicas and the leader (its Lease), ztunnels per node, and each
    /// waypoint Gateway's `Programmed` condition.
    pub async fn status(&self, ns: &str) -> Result<String, CliError> {
        use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
        use k8s_openapi::api::coordination::v1::Lease;
        let deploy = Api::<Deployment>::namespaced(self.client.clone(), ns)
            .get_opt("weft-controller")
            .await
            .map_err(kube_err("reading the controller's Deployment"))?
            .ok_or_else(|| {
                CliError::Refused(format!(
                    "weft is not installed in namespace {ns} (kubectl weft install | kubectl apply -f -)"
                ))
            })?;
        let status = deploy.status.unwrap_or_default();
        let wanted = deploy.spec.and_then(|s| s.replicas).unwrap_or(1);
        let lease = Api::<Lease>::namespaced(self.client.clone(), ns)
            .get_opt(weft_controller::leader::LEASE)
            .await
            .map_err(kube_err("reading the leader Lease"))?;
        let leader = lease
            .and_then(|l| l.spec?.holder_identity)
            .unwrap_or_else(|| "none (no replica leads: waypoints are not deployed)".into());
        let mut out = format!(
            "controller  {}/{wanted} replicas ready, leader {leader}\n",
            status.ready_replicas.unwrap_or(0)
        );
        let ds = Api::<DaemonSet>::namespaced(self.client.clone(), ns)
            .get_opt("ztunnel")
            .await
            .map_err(kube_err("reading the ztunnel DaemonSet"))?;
        let ds = ds.and_then(|d| d.status).unwrap_or_default();
        out += &format!(
            "ztunnel     {}/{} nodes ready\n",
            ds.number_ready, ds.desired_number_scheduled
        );
        out += &self.waypoints_status().await?;
        // The controller's own view, when the aggregated API answers.
        match crate::commands::controller_view(&self.target()).await {
            Ok(view) => out += &view,
            Err(e) => out += &format!("config      unknown: {e}\n"),
        }
        Ok(out)
    }

    /// Every Gateway of class `weft-waypoint`; `None` without the Gateway API.
    async fn waypoint_gateways(&self) -> Result<Option<Vec<Gateway>>, CliError> {
        let listed = Api::<Gateway>::all(self.client.clone())
            .list(&Default::default())
            .await;
        match listed {
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            other => Ok(Some(
                other
                    .map_err(kube_err("listing Gateways"))?
                    .items
                    .into_iter()
                    .filter(|g| g.spec.gateway_class_name == "weft-waypoint")
                    .collect(),
            )),
        }
    }

    async fn waypoints_status(&self) -> Result<String, CliError> {
        let Some(gateways) = self.waypoint_gateways().await? else {
            return Ok("waypoints   none (the Gateway API is not installed)\n".into());
        };
        let mut out = String::new();
        for gw in &gateways {
            let programmed = programmed(gw);
            let state = match programmed["status"].as_str() {
                Some("True") => "programmed".to_owned(),
                _ => format!(
                    "not programmed: {}",
                    programmed["message"].as_str().unwrap_or("no status yet")
                ),
            };
            let key = format!(
                "{}/{}",
                gw.metadata.namespace.as_deref().unwrap_or_default(),
                gw.metadata.name.as_deref().unwrap_or_default()
            );
            out += &format!("waypoint    {key} {state}\n");
        }
        if out.is_empty() {
            out = "waypoints   none\n".into();
        }
        Ok(out)
    }

    /// `waypoint list` in a cluster: each waypoint Gateway, its scope, its
    /// `Programmed` condition and address, and the Namespaces and Services
    /// bound to one (by their `weft.dev/use-waypoint` label).
    pub async fn waypoint_list(&self, output: Output) -> Result<String, CliError> {
        use k8s_openapi::api::core::v1::Service;
        let mut items = Vec::new();
        for gw in self.waypoint_gateways().await?.unwrap_or_default() {
            let v = serde_json::to_value(&gw).unwrap_or(Value::Null);
            let programmed = programmed(&gw);
            items.push(json!({
                "waypoint": format!("{}/{}", s(&v["metadata"]["namespace"]), s(&v["metadata"]["name"])),
                "forServiceAccount": v["metadata"]["labels"]["weft.dev/for-service-account"],
                "programmed": programmed["status"], "reason": programmed["message"],
                "addresses": v["status"]["addresses"].as_array().map(|a| a.iter().map(|x| x["value"].clone()).collect::<Vec<_>>()),
            }));
        }
        let labelled = kube::api::ListParams::default().labels(USE_WAYPOINT);
        let mut bindings = Vec::new();
        for ns in Api::<Namespace>::all(self.client.clone())
            .list(&labelled)
            .await
            .map_err(kube_err("listing Namespaces"))?
        {
            let name = ns.metadata.name.unwrap_or_default();
            let to = ns
                .metadata
                .labels
                .unwrap_or_default()
                .remove(USE_WAYPOINT)
                .unwrap_or_default();
            bindings.push(
                json!({"kind": "Namespace", "name": name, "waypoint": format!("{name}/{to}")}),
            );
        }
        for svc in Api::<Service>::all(self.client.clone())
            .list(&labelled)
            .await
            .map_err(kube_err("listing Services"))?
        {
            let ns = svc.metadata.namespace.unwrap_or_default();
            let name = format!("{ns}/{}", svc.metadata.name.unwrap_or_default());
            let to = svc
                .metadata
                .labels
                .unwrap_or_default()
                .remove(USE_WAYPOINT)
                .unwrap_or_default();
            bindings
                .push(json!({"kind": "Service", "name": name, "waypoint": format!("{ns}/{to}")}));
        }
        let v = json!({"items": items, "bindings": bindings});
        if let Some(text) = structured(&v, output) {
            return Ok(text);
        }
        let rows = |key: &str, fields: &[&str]| -> Vec<Vec<String>> {
            v[key]
                .as_array()
                .into_iter()
                .flatten()
                .map(|i| fields.iter().map(|f| s(&i[*f])).collect())
                .collect()
        };
        let waypoints = table(
            &["WAYPOINT", "FOR-SA", "PROGRAMMED", "ADDRESSES", "REASON"],
            rows(
                "items",
                &[
                    "waypoint",
                    "forServiceAccount",
                    "programmed",
                    "addresses",
                    "reason",
                ],
            ),
        );
        let bound = table(
            &["KIND", "NAME", "WAYPOINT"],
            rows("bindings", &["kind", "name", "waypoint"]),
        );
        Ok(format!("{waypoints}\n{bound}"))
    }

    /// `waypoint apply --wait`: until the Gateway says `Programmed`.
    pub async fn waypoint_wait(
        &self,
        ns: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<String, CliError> {
        let api = Api::<Gateway>::namespaced(self.client.clone(), ns);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let gw = api
                .get(name)
                .await
                .map_err(kube_err("reading the Gateway"))?;
            let programmed = programmed(&gw);
            if programmed["status"] == "True" {
                return Ok(format!("waypoint {ns}/{name} is programmed\n"));
            }
            if tokio::time::Instant::now() >= deadline {
                let why = programmed["message"]
                    .as_str()
                    .unwrap_or("no status from the controller yet (is weft installed?)");
                return Err(CliError::Refused(format!(
                    "waypoint {ns}/{name} not programmed after {}s: {why}",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// A Gateway's `Programmed` condition (null when there is none yet).
fn programmed(gw: &Gateway) -> Value {
    let status = serde_json::to_value(&gw.status).unwrap_or(Value::Null);
    let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
    conditions
        .into_iter()
        .find(|c| c["type"] == "Programmed")
        .unwrap_or(Value::Null)
}
