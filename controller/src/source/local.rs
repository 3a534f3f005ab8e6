//! The local source (the embedded default): a directory of YAML files in
//! Kubernetes shapes, watched for changes.
//!
//! - Each `*.yaml`/`*.yml` file is applied whole or not at all. A file that
//!   does not parse, or whose objects the translation refuses (an IP already
//!   taken, a policy that cannot be read), is reported (log, metric, REST
//!   `/api/v1/sources`) and its last accepted content keeps serving: one
//!   broken file never empties the mesh.
//! - Accepted contents are copied to `<data-dir>/accepted/`, so a file that
//!   breaks while the controller is down still serves its last good
//!   version after a restart.
//! - Changes are found by polling size and mtime every 250 ms: it works the
//!   same on every filesystem and editor (atomic renames included) and costs
//!   a `stat` per file. REST writes apply at once, without waiting.
//! - The REST API writes one file per object it manages
//!   (`<kind>.<namespace>.<name>.yaml`), atomically; objects in hand-written
//!   files are edited by hand.

use std::collections::{BTreeMap, HashMap, HashSet};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use weft_proto::model::Model;

use super::translate::{apply_pods, translate};
use super::{Object, Objects, SourceStatus, parse_documents};
use crate::ca::write_atomic;
use crate::state::ConfigStore;

/// What tells a changed file: mtime, size and inode (an editor's atomic
/// rename changes the inode even within one mtime tick).
type Stamp = (SystemTime, u64, u64);

const POLL: Duration = Duration::from_millis(250);
/// Largest file read; a config directory holds config, not bulk data.
const MAX_FILE: u64 = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("config directory {path}: {reason}")]
    Dir { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{id} is defined in {file}, which is edited by hand; change it there")]
    NotManaged { id: String, file: String },
    #[error("{0} does not exist")]
    NotFound(String),
}

#[derive(Clone)]
struct FileState {
    stamp: Stamp,
    /// Objects of the last accepted content.
    objects: Vec<Object>,
    accepted: Option<Arc<str>>,
    error: Option<String>,
}

pub struct LocalSource {
    dir: PathBuf,
    accepted_dir: PathBuf,
    trust_domain: String,
    store: ConfigStore,
    files: Mutex<BTreeMap<String, FileState>>,
    status: watch::Sender<Arc<SourceStatus>>,
    scanned: std::sync::atomic::AtomicBool,
    /// The objects behind the model served, once a full translation made it
    /// (what a pods-only change is applied against).
    served: Mutex<Option<Objects>>,
    /// Changes applied pod by pod rather than by a full translation.
    incremental: std::sync::atomic::AtomicU64,
}

impl LocalSource {
    /// Reads the directory (made if missing) and serves it; then watches it
    /// until `shutdown`.
    pub fn start(
        dir: &Path,
        data_dir: &Path,
        trust_domain: &str,
        store: ConfigStore,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, LocalError> {
        let err = |reason: std::io::Error| LocalError::Dir {
            path: dir.to_owned(),
            reason: reason.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let accepted_dir = data_dir.join("accepted");
        std::fs::create_dir_all(&accepted_dir).map_err(err)?;
        let source = Arc::new(LocalSource {
            dir: dir.to_owned(),
            accepted_dir,
            trust_domain: trust_domain.to_owned(),
            store,
            files: Mutex::new(BTreeMap::new()),
            scanned: Default::default(),
            served: Mutex::new(None),
            incremental: Default::default(),
            status: watch::channel(Arc::new(SourceStatus::local(dir))).0,
        });
        source.rescan();
        let poller = source.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let s = poller.clone();
                if tokio::task::spawn_blocking(move || s.rescan())
                    .await
                    .is_err()
                {
                    warn!("config directory scan panicked; retrying");
                }
            }
        });
        Ok(source)
    }

    /// How many changes were applied pod by pod.
    pub fn incremental_updates(&self) -> u64 {
        self.incremental.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn status(&self) -> watch::Receiver<Arc<SourceStatus>> {
        self.status.subscribe()
    }

    /// Applies what changed on disk; returns the new config version if the
    /// served config changed.
    pub fn rescan(&self) -> Option<u64> {
        let mut files = self.files.lock().expect("poisoned");
        self.rescan_locked(&mut files)
    }

    fn rescan_locked(&self, files: &mut BTreeMap<String, FileState>) -> Option<u64> {
        let on_disk = match self.list() {
            Ok(list) => list,
            Err(e) => {
                warn!(dir = %self.dir.display(), error = %e, "cannot list the config directory; keeping the config served");
                return None;
            }
        };
        let mut next = files.clone();
        next.retain(|name, _| on_disk.contains_key(name));
        let mut changed: Vec<String> = Vec::new();
        let removed = next.len() != files.len();
        for (name, stamp) in on_disk {
            if files.get(&name).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let previous = files.get(&name).cloned();
            let mut state = previous.unwrap_or_else(|| self.restored(&name, stamp));
            state.stamp = stamp;
            match self.read(&name) {
                Ok((text, objects)) => {
                    state.objects = objects;
                    state.accepted = Some(text.into());
                    state.error = None;
                    changed.push(name.clone());
                }
                Err(e) => {
                    state.error = Some(e);
                }
            }
            next.insert(name, state);
        }
        let others_unchanged = next
            .iter()
            .all(|(n, f)| changed.contains(n) || files.get(n).map(|o| &o.error) == Some(&f.error));
        if !removed
            && !changed.is_empty()
            && others_unchanged
            && let Some(version) = self.pods_only(files, &next, &changed)
        {
            for name in &changed {
                if let Some(text) = &next[name].accepted {
                    let _ = write_atomic(&self.accepted_dir.join(name), text.as_bytes(), 0o600);
                }
            }
            self.status.send_modify(|status| {
                let mut s = (**status).clone();
                s.files = next
                    .iter()
                    .map(|(name, f)| (name.clone(), (f.objects.len(), f.error.clone())))
                    .collect();
                *status = Arc::new(s);
            });
            *files = next;
            return Some(version);
        }
        // Refuse changed files whose objects clash or cannot be used, one
        // at a time, until what is left translates cleanly.
        // Refusals already there before this scan are not this scan's doing.
        let baseline: std::collections::HashSet<(String, String)> = self
            .status
            .borrow()
            .problems
            .iter()
            .filter(|p| p.refused)
            .map(|p| (p.object.clone(), p.reason.clone()))
            .collect();
        let (translation, assembled) = loop {
            let (objects, clashes) = assemble(&next);
            let t = translate(&objects, &self.trust_domain);
            // An object in two files: blame the one that changed (the
            // later one if both did).
            let clash = clashes.iter().find_map(|(files, object)| {
                let file = files.iter().rev().find(|f| changed.contains(f))?;
                let other = files.iter().find(|f| *f != file)?;
                Some((file.clone(), format!("{object}: also defined in {other}")))
            });
            let new: Vec<(String, String)> = t
                .problems
                .iter()
                .filter(|p| p.refused)
                .map(|p| (p.object.clone(), p.reason.clone()))
                .filter(|p| !baseline.contains(p))
                .collect();
            let in_file =
                |f: &String, object: &str| next[f].objects.iter().any(|o| o.id() == object);
            // Blame the changed file holding the refused object; failing
            // that (a newcomer took an IP an older object had, so the older
            // one was refused), the last changed file.
            let culprit = clash
                .or_else(|| {
                    new.iter().find_map(|(object, reason)| {
                        let file = changed.iter().find(|f| in_file(f, object))?;
                        Some((file.clone(), format!("{object}: {reason}")))
                    })
                })
                .or_else(|| {
                    let (object, reason) = new.first()?;
                    Some((changed.last()?.clone(), format!("{object}: {reason}")))
                });
            match culprit {
                None => break (t, objects),
                Some((file, reason)) => {
                    changed.retain(|f| *f != file);
                    let state = next.get_mut(&file).expect("changed file");
                    let last_good = files
                        .get(&file)
                        .cloned()
                        .unwrap_or_else(|| self.restored(&file, state.stamp));
                    state.objects = last_good.objects;
                    state.accepted = last_good.accepted;
                    state.error = Some(reason);
                }
            }
        };
        for (name, state) in &next {
            let was = files.get(name).and_then(|f| f.error.as_ref());
            match &state.error {
                Some(e) if was != Some(e) => {
                    metrics::counter!("weft_controller_config_errors_total").increment(1);
                    warn!(
                        file = name,
                        error = e,
                        "config file refused; its last accepted content keeps serving"
                    );
                }
                None if was.is_some() => info!(file = name, "config file accepted again"),
                _ => {}
            }
        }
        // The first scan always serves (restored copies included).
        let first = !self
            .scanned
            .swap(true, std::sync::atomic::Ordering::Relaxed);
        let apply = !changed.is_empty() || removed || first;
        let errors_changed = next
            .iter()
            .any(|(n, f)| files.get(n).map(|o| &o.error) != Some(&f.error));
        if !apply && !errors_changed {
            *files = next;
            return None;
        }
        for name in &changed {
            if let Some(text) = &next[name].accepted {
                let _ = write_atomic(&self.accepted_dir.join(name), text.as_bytes(), 0o600);
            }
        }
        if removed {
            for name in files.keys().filter(|n| !next.contains_key(*n)) {
                let _ = std::fs::remove_file(self.accepted_dir.join(name));
            }
        }
        let version = if apply {
            match Model::from_specs(translation.specs, &self.trust_domain) {
                Ok(model) => {
                    *self.served.lock().expect("poisoned") = Some(assembled);
                    Some(self.store.set(model))
                }
                Err(e) => {
                    // The translation avoids every clash the model checks;
                    // if one slips through, keep serving what was served.
                    warn!(error = %e, "translated config does not validate; keeping the config served");
                    None
                }
            }
        } else {
            None
        };
        self.status.send_replace(Arc::new(SourceStatus {
            source: "local".into(),
            location: self.dir.display().to_string(),
            files: next
                .iter()
                .map(|(name, f)| (name.clone(), (f.objects.len(), f.error.clone())))
                .collect(),
            problems: translation.problems,
            waypoints: translation.waypoints,
            routes: translation.routes,
        }));
        *files = next;
        version
    }

    /// A change that only adds, changes or removes pods, in a mesh served
    /// cleanly, is applied to the served model pod by pod (`Model::apply`):
    /// what a pod becomes depends only on its namespace, Services and
    /// EndpointSlices, which did not change. Anything else (or any doubt:
    /// a clash, a refusal, a named target port) takes the full
    /// translation, which also explains what it refuses.
    fn pods_only(
        &self,
        files: &BTreeMap<String, FileState>,
        next: &BTreeMap<String, FileState>,
        changed: &[String],
    ) -> Option<u64> {
        if !self.status.borrow().problems.is_empty() {
            return None;
        }
        let mut served = self.served.lock().expect("poisoned");
        let objects = served.as_mut()?;
        let mut upserts: Vec<(String, Arc<Pod>)> = Vec::new();
        let mut gone: Vec<String> = Vec::new();
        for name in changed {
            let old: &[Object] = files.get(name).map_or(&[], |f| &f.objects);
            let new = &next.get(name)?.objects;
            if !old.iter().chain(new).all(|o| matches!(o, Object::Pod(_))) {
                return None;
            }
            let old_keys: HashSet<String> = old.iter().map(Object::key).collect();
            let mut new_keys = HashSet::new();
            for o in new {
                let Object::Pod(pod) = o else { return None };
                let key = o.key();
                let served_pod = objects.pods.get(&key);
                if !old_keys.contains(&key) && served_pod.is_some() {
                    return None; // another file has it: the full path reports the clash
                }
                if !served_pod.is_some_and(|p| **p == **pod) {
                    upserts.push((key.clone(), pod.clone()));
                }
                new_keys.insert(key);
            }
            gone.extend(old_keys.difference(&new_keys).cloned());
        }
        let model = apply_pods(
            objects,
            &self.store.current().model,
            upserts,
            gone,
            &self.trust_domain,
        )?;
        self.incremental
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!("weft_controller_incremental_updates_total").increment(1);
        Some(self.store.set(model))
    }

    /// The state of a file seen for the first time: its accepted copy from
    /// before a restart, if there is one.
    fn restored(&self, name: &str, stamp: Stamp) -> FileState {
        let saved = std::fs::read_to_string(self.accepted_dir.join(name)).ok();
        let objects = saved.as_deref().and_then(|t| parse_documents(t).ok());
        FileState {
            stamp,
            accepted: saved.filter(|_| objects.is_some()).map(Into::into),
            objects: objects.unwrap_or_default(),
            error: None,
        }
    }

    fn list(&self) -> std::io::Result<BTreeMap<String, Stamp>> {
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Editors' and our own temporary files start with a dot or end in .tmp.
            if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
                continue;
            }
            let meta = entry.metadata()?;
            if meta.is_file() {
                out.insert(
                    name,
                    (
                        meta.modified()?,
                        meta.len(),
                        std::os::unix::fs::MetadataExt::ino(&meta),
                    ),
                );
            }
        }
        Ok(out)
    }

    fn read(&self, name: &str) -> Result<(String, Vec<Object>), String> {
        let path = self.dir.join(name);
        let len = std::fs::metadata(&path).map_err(|e| e.to_string())?.len();
        if len > MAX_FILE {
            return Err(format!("{len} bytes; files over {MAX_FILE} are not read"));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        let objects = parse_documents(&text)?;
        Ok((text, objects))
    }

    /// One object served (`Kind namespace/name`), without copying the rest.
    pub fn object(&self, id: &str) -> Option<Object> {
        let files = self.files.lock().expect("poisoned");
        files
            .values()
            .flat_map(|f| &f.objects)
            .find(|o| o.id() == id)
            .cloned()
    }

    /// Every object served, with the file it comes from.
    pub fn objects(&self) -> Vec<(String, Object)> {
        let files = self.files.lock().expect("poisoned");
        files
            .iter()
            .flat_map(|(name, f)| f.objects.iter().map(move |o| (name.clone(), o.clone())))
            .collect()
    }

    /// Creates or replaces one object through the REST API: written to its
    /// own file, applied at once; refused (and the file left as it was) if
    /// the object would not be served.
    pub fn put(&self, object: Object) -> Result<u64, LocalError> {
        let mut files = self.files.lock().expect("poisoned");
        let id = object.id();
        let name = managed_file(&object);
        self.check_managed(&files, &id, &name)?;
        let path = self.dir.join(&name);
        let before = std::fs::read(&path).ok();
        let yaml = serde_saphyr::to_string(&object.to_value())
            .map_err(|e| LocalError::Invalid(e.to_string()))?;
        let io = |e: crate::ca::CaError| LocalError::Dir {
            path: path.clone(),
            reason: e.to_string(),
        };
        write_atomic(&path, yaml.as_bytes(), 0o644).map_err(io)?;
        let version = self.rescan_locked(&mut files);
        if let Some(error) = files.get(&name).and_then(|f| f.error.clone()) {
            // Put the file back as it was; the next scan clears the error.
            match before {
                Some(b) => write_atomic(&path, &b, 0o644).map_err(io)?,
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
            self.rescan_locked(&mut files);
            return Err(LocalError::Invalid(error));
        }
        Ok(version.unwrap_or_else(|| self.store.current().version))
    }

    /// Deletes an object the REST API manages.
    pub fn delete(&self, kind: &str, key: &str) -> Result<u64, LocalError> {
        let mut files = self.files.lock().expect("poisoned");
        let id = format!("{kind} {key}");
        let (file, _) = files
            .iter()
            .find(|(_, f)| f.objects.iter().any(|o| o.id() == id))
            .ok_or_else(|| LocalError::NotFound(id.clone()))?;
        if !is_managed(file) {
            return Err(LocalError::NotManaged {
                id,
                file: file.clone(),
            });
        }
        let path = self.dir.join(file);
        std::fs::remove_file(&path).map_err(|e| LocalError::Dir {
            path,
            reason: e.to_string(),
        })?;
        let version = self.rescan_locked(&mut files);
        Ok(version.unwrap_or_else(|| self.store.current().version))
    }

    fn check_managed(
        &self,
        files: &BTreeMap<String, FileState>,
        id: &str,
        name: &str,
    ) -> Result<(), LocalError> {
        let elsewhere = files
            .iter()
            .find(|(file, f)| *file != name && f.objects.iter().any(|o| o.id() == id));
        match elsewhere {
            Some((file, _)) => Err(LocalError::NotManaged {
                id: id.to_owned(),
                file: file.clone(),
            }),
            None => Ok(()),
        }
    }
}

/// `<kind>.<namespace>.<name>.yaml`, lower-case kind; cluster-scoped: `<kind>.<name>.yaml`.
fn managed_file(object: &Object) -> String {
    format!(
        "{}.{}.yaml",
        object.kind().to_lowercase(),
        object.key().replace('/', ".")
    )
}

fn is_managed(file: &str) -> bool {
    let kind = file.split('.').next().unwrap_or_default();
    super::KINDS.iter().any(|(_, k)| k.to_lowercase() == kind) && file.matches('.').count() >= 2
}

/// All files' objects together, and the objects defined in two files
/// (both files, then the object's id); the first file's definition is used.
#[allow(clippy::type_complexity)]
fn assemble(files: &BTreeMap<String, FileState>) -> (Objects, Vec<([String; 2], String)>) {
    let mut objects = Objects::default();
    let mut seen: HashMap<String, &str> = HashMap::new();
    let mut clashes = Vec::new();
    for (name, f) in files {
        for o in &f.objects {
            let id = o.id();
            if let Some(first) = seen.get(&id) {
                clashes.push(([(*first).to_owned(), name.clone()], id));
                continue;
            }
            seen.insert(id, name);
            objects.insert(o.clone());
        }
    }
    (objects, clashes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{nodeName: a, containers: [{{name: c, image: i}}]}}\nstatus: {{podIP: {ip}}}\n---\n"
        )
    }

    fn workloads(store: &ConfigStore) -> Vec<String> {
        let mut keys: Vec<String> = store
            .current()
            .model
            .workloads
            .iter()
            .map(|w| w.key.clone())
            .collect();
        keys.sort();
        keys
    }

    #[tokio::test]
    async fn a_bad_file_keeps_its_last_good_content_across_restarts() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (dir, data) = (tmp.path().join("config"), tmp.path().join("data"));
        std::fs::create_dir_all(&dir).expect("dir");
        let store = ConfigStore::new();
        std::fs::write(dir.join("a.yaml"), pod("web", "10.0.0.1")).expect("write");
        let stop = CancellationToken::new();
        stop.cancel(); // scans are driven by hand below
        let source = LocalSource::start(&dir, &data, "cluster.local", store.clone(), stop.clone())
            .expect("start");
        assert_eq!(workloads(&store), ["shop/web"]);
        let v1 = store.current().version;

        // Broken YAML: refused, reported, the mesh keeps serving.
        std::fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: [",
        )
        .expect("write");
        assert_eq!(source.rescan(), None);
        assert_eq!(
            (workloads(&store), store.current().version),
            (vec!["shop/web".to_owned()], v1)
        );
        let status = source.status().borrow().clone();
        assert!(
            status.files["a.yaml"]
                .1
                .as_deref()
                .is_some_and(|e| e.contains("document 1")),
            "{status:?}"
        );

        // Another file clashing with a served IP is refused; a good one applies.
        std::fs::write(dir.join("b.yaml"), pod("api", "10.0.0.1")).expect("write");
        assert_eq!(source.rescan(), None);
        assert!(
            source.status().borrow().files["b.yaml"]
                .1
                .as_deref()
                .is_some_and(|e| e.contains("10.0.0.1"))
        );
        std::fs::write(dir.join("b.yaml"), pod("api", "10.0.0.2")).expect("write");
        assert!(source.rescan().is_some());
        assert_eq!(workloads(&store), ["shop/api", "shop/web"]);
        // The same object in two files: the file that changed is refused.
        std::fs::write(dir.join("c.yaml"), pod("api", "10.0.0.3")).expect("write");
        source.rescan();
        assert!(
            source.status().borrow().files["c.yaml"]
                .1
                .as_deref()
                .is_some_and(|e| e.contains("also defined in b.yaml"))
        );

        // A restart while a.yaml is still broken serves its accepted copy.
        let store = ConfigStore::new();
        let source =
            LocalSource::start(&dir, &data, "cluster.local", store.clone(), stop).expect("restart");
        assert_eq!(workloads(&store), ["shop/api", "shop/web"]);
        // Removing a file removes its objects.
        std::fs::remove_file(dir.join("b.yaml")).expect("rm");
        std::fs::remove_file(dir.join("c.yaml")).expect("rm");
        assert!(source.rescan().is_some());
        assert_eq!(workloads(&store), ["shop/web"]);
    }

    /// What the proxies would see of a model, comparable across builds.
    fn view(m: &Model) -> Vec<String> {
        let mut out: Vec<String> = m
            .workloads
            .iter()
            .map(|w| {
                format!(
                    "{} {:?} {} {} {:?}",
                    w.key, w.addresses, w.node, w.meshed, w.services
                )
            })
            .collect();
        for s in &m.services {
            let mut eps: Vec<&str> = s.endpoints().iter().map(|w| w.key.as_str()).collect();
            eps.sort();
            out.push(format!("{} {:?} {:?} {eps:?}", s.key, s.addresses, s.ports));
        }
        for w in &m.workloads {
            for ip in &w.addresses {
                assert!(
                    m.workload_by_ip(*ip).is_some_and(|x| x.key == w.key),
                    "{ip} indexed"
                );
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn pod_changes_applied_incrementally_equal_a_full_translation() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("config");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(
            dir.join("base.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {weft.dev/mesh: enabled}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.1, selector: {app: api}, ports: [{port: 80, targetPort: 8080}]}\n",
        )
        .expect("write");
        let pod = |name: &str, ip: &str, app: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: {app}}}}}\n\
                 spec: {{nodeName: a, containers: [{{name: c, image: i}}]}}\nstatus: {{podIP: {ip}}}\n---\n"
            )
        };
        std::fs::write(
            dir.join("pods.yaml"),
            pod("api-1", "10.0.0.1", "api") + &pod("api-2", "10.0.0.2", "api"),
        )
        .expect("write");
        let stop = CancellationToken::new();
        stop.cancel();
        let store = ConfigStore::new();
        let source = LocalSource::start(
            &dir,
            &tmp.path().join("data"),
            "cluster.local",
            store.clone(),
            stop.clone(),
        )
        .expect("start");
        let steps = [
            // An address moves; a pod arrives; two trade addresses.
            pod("api-1", "10.0.0.9", "api") + &pod("api-2", "10.0.0.2", "api"),
            pod("api-1", "10.0.0.9", "api")
                + &pod("api-2", "10.0.0.2", "api")
                + &pod("api-3", "10.0.0.3", "api"),
            pod("api-1", "10.0.0.2", "api")
                + &pod("api-2", "10.0.0.9", "api")
                + &pod("api-3", "10.0.0.3", "api"),
            // One stops being selected; one goes away.
            pod("api-1", "10.0.0.2", "web") + &pod("api-2", "10.0.0.9", "api"),
        ];
        for (i, yaml) in steps.iter().enumerate() {
            std::fs::write(dir.join("pods.yaml"), yaml).expect("write");
            assert!(source.rescan().is_some(), "step {i} applied");
            let fresh_store = ConfigStore::new();
            let data = tempfile::tempdir().expect("tempdir");
            LocalSource::start(
                &dir,
                data.path(),
                "cluster.local",
                fresh_store.clone(),
                stop.clone(),
            )
            .expect("full translation");
            assert_eq!(
                view(&store.current().model),
                view(&fresh_store.current().model),
                "step {i}"
            );
        }
        assert_eq!(
            source.incremental_updates(),
            steps.len() as u64,
            "every step took the pod-by-pod path"
        );
        // A clash is left to the full translation, which refuses the file.
        std::fs::write(dir.join("more.yaml"), pod("api-9", "10.0.0.9", "api")).expect("write");
        source.rescan();
        assert_eq!(source.incremental_updates(), steps.len() as u64);
        assert!(
            source.status().borrow().files["more.yaml"]
                .1
                .as_deref()
                .is_some_and(|e| e.contains("10.0.0.9"))
        );
    }
}
