//! The CA in Kubernetes (SPEC §2): its material lives in Secret
//! `<namespace>/weft-ca`, so a rescheduled or second controller signs under
//! the same root; the root is published in ConfigMap
//! `<namespace>/weft-trust-bundle` for proxies to mount and follow.
//!
//! Start-up, on every replica: a Secret that exists wins (its four files
//! are written to the CA directory and loaded from there). Without one,
//! this replica's CA directory (an intermediate the user mounted, or a root
//! made now) is stored with a create that fails if another replica got
//! there first — and then that replica's is used. So however many start at
//! once, exactly one root comes out, and it survives every restart.
//!
//! A user plugs in an intermediate by creating the Secret before install,
//! with the keys `ca-cert.pem`, `ca-key.pem`, `root-cert.pem` and
//! `cert-chain.pem`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tracing::info;

use crate::ca::{CA_FILES, CA_KEY, CaError, CertificateAuthority, write_atomic};

pub const SECRET: &str = "weft-ca";
pub const TRUST_BUNDLE: &str = "weft-trust-bundle";
/// The ConfigMap key proxies read (`--ca-root` points at it).
pub const BUNDLE_KEY: &str = "root-cert.pem";
const MANAGER: &str = "weft-controller";

#[derive(Debug, thiserror::Error)]
pub enum KubeCaError {
    #[error("Kubernetes API, {action}: {source}")]
    Api {
        action: String,
        source: Box<kube::Error>,
    },
    #[error(
        "Secret {namespace}/{SECRET} lacks {missing}; give it all of ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem, or delete it to let weft make a root"
    )]
    Incomplete { namespace: String, missing: String },
    #[error(transparent)]
    Ca(#[from] CaError),
}

fn api_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeCaError {
    let action = action.into();
    move |source| KubeCaError::Api {
        action,
        source: Box::new(source),
    }
}

/// Makes `dir` hold the CA every replica shares (see the module doc).
pub async fn sync(
    client: &Client,
    namespace: &str,
    dir: &Path,
    trust_domain: &str,
    max_ttl: Duration,
) -> Result<(), KubeCaError> {
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    let read = api_err(format!("reading Secret {namespace}/{SECRET}"));
    if let Some(secret) = secrets.get_opt(SECRET).await.map_err(read)? {
        info!(secret = SECRET, namespace, "CA from the cluster's Secret");
        return write_files(&secret, namespace, dir);
    }
    // None yet: this replica's (made now if the directory is empty).
    CertificateAuthority::load_or_create(dir, trust_domain, max_ttl)?;
    let secret = secret_of(dir, namespace)?;
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(secret = SECRET, namespace, "CA stored in a new Secret");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            info!(
                secret = SECRET,
                namespace, "another replica stored the CA first; using it"
            );
            let read = api_err(format!("reading Secret {namespace}/{SECRET}"));
            let theirs = secrets.get(SECRET).await.map_err(read)?;
            write_files(&theirs, namespace, dir)
        }
        Err(e) => Err(api_err(format!("creating Secret {namespace}/{SECRET}"))(e)),
    }
}

/// Brings a changed Secret into `dir` (a rotation step made by editing the
/// Secret); `Ok(true)` when the files changed. Material that would not
/// load is refused and the files are left as they are. A Secret that is
/// gone changes nothing: a new root is never made while running.
pub async fn pull(client: &Client, namespace: &str, dir: &Path) -> Result<bool, KubeCaError> {
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    let read = api_err(format!("reading Secret {namespace}/{SECRET}"));
    let Some(secret) = secrets.get_opt(SECRET).await.map_err(read)? else {
        return Ok(false);
    };
    let data = secret.data.clone().unwrap_or_default();
    let unchanged = CA_FILES.iter().all(|f| {
        let on_disk = std::fs::read(dir.join(f)).ok();
        data.get(*f).map(|b| &b.0) == on_disk.as_ref()
    });
    if unchanged {
        return Ok(false);
    }
    let staging = dir.with_extension("next");
    write_files(&secret, namespace, &staging)?;
    let checked = CertificateAuthority::check(&staging);
    let _ = std::fs::remove_dir_all(&staging);
    checked?;
    write_files(&secret, namespace, dir)?;
    Ok(true)
}

/// Writes the Secret's four files into `dir` (the key 0600).
fn write_files(secret: &Secret, namespace: &str, dir: &Path) -> Result<(), KubeCaError> {
    let data = secret.data.clone().unwrap_or_default();
    let missing: Vec<&str> = CA_FILES
        .iter()
        .filter(|f| !data.contains_key(**f))
        .copied()
        .collect();
    if !missing.is_empty() {
        return Err(KubeCaError::Incomplete {
            namespace: namespace.to_owned(),
            missing: missing.join(", "),
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
        action: "create",
        path: dir.to_owned(),
        source,
    })?;
    for file in CA_FILES {
        let mode = if file == CA_KEY { 0o600 } else { 0o644 };
        write_atomic(&dir.join(file), &data[file].0, mode)?;
    }
    Ok(())
}

fn secret_of(dir: &Path, namespace: &str) -> Result<Secret, KubeCaError> {
    let mut data = BTreeMap::new();
    for file in CA_FILES {
        let path = dir.join(file);
        let bytes = std::fs::read(&path).map_err(|source| CaError::Io {
            action: "read",
            path,
            source,
        })?;
        data.insert(file.to_owned(), ByteString(bytes));
    }
    Ok(Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some(part_of_weft()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    })
}

fn part_of_weft() -> BTreeMap<String, String> {
    [("app.kubernetes.io/part-of".to_owned(), "weft".to_owned())].into()
}

/// Publishes `roots` (PEM, one or more: during a root rotation both) in
/// the trust-bundle ConfigMap; every replica applies the same content, so
/// the apply is idempotent.
pub async fn publish_trust_bundle(
    client: &Client,
    namespace: &str,
    roots: &str,
) -> Result<(), KubeCaError> {
    let map = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(TRUST_BUNDLE.into()),
            namespace: Some(namespace.into()),
            labels: Some(part_of_weft()),
            ..Default::default()
        },
        data: Some([(BUNDLE_KEY.to_owned(), roots.to_owned())].into()),
        ..Default::default()
    };
    let mut value = serde_json::to_value(&map).unwrap_or_default();
    value["apiVersion"] = "v1".into();
    value["kind"] = "ConfigMap".into();
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(
            TRUST_BUNDLE,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(value),
        )
        .await
        .map_err(api_err(format!(
            "applying ConfigMap {namespace}/{TRUST_BUNDLE}"
        )))?;
    info!(
        configmap = TRUST_BUNDLE,
        namespace, "trust bundle published"
    );
    Ok(())
}
