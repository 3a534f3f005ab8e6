//! Putting weft-cni into a node's CNI chain, and taking it out again:
//! `weft-cni install`, the second container of the ztunnel DaemonSet.
//!
//! It copies its own binary into the node's CNI bin dir and appends a
//! `weft-cni` entry to the plugin chain of the config the container
//! runtime uses (the first `.conf`/`.conflist`/`.json` file by name, as
//! libcni picks it). A single-plugin `.conf` (old bridge and flannel
//! installs) becomes a `.conflist` of that plugin then weft's. It checks
//! again every interval, so when the primary CNI (Calico, Cilium, flannel)
//! rewrites its file, weft is chained in again.
//!
//! Each chaining records the bytes it replaced and the bytes it wrote
//! (`<state-dir>/cni-install.json`). On uninstall, a file still as weft
//! wrote it is put back byte for byte; one rewritten since loses only the
//! `weft-cni` entry. During a rolling update the new installer claims the
//! record on start, so the old one's exit leaves the chain alone; only the
//! last installer standing (the DaemonSet deleted) takes weft out.
//!
//! While the ztunnel is not ready, the chain stays: a pod started then
//! fails CNI ADD (weft-cni cannot reach the ztunnel) and the kubelet
//! retries, so no pod runs unmeshed in a meshed namespace.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub const PLUGIN: &str = "weft-cni";
const RECORD: &str = "cni-install.json";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CNI config {path} is not valid JSON ({reason}); fix or remove it")]
    BadConfig { path: PathBuf, reason: String },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstallError {
    let path = path.to_owned();
    move |source| InstallError::Io {
        action,
        path,
        source,
    }
}

/// Where things are on the node (host paths as mounted in the container).
#[derive(Debug, Clone)]
pub struct Installer {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub state_dir: PathBuf,
    /// The ztunnel's enrollment socket, as the host sees it.
    pub socket: PathBuf,
    /// Who this installer is (its pod's uid in the DaemonSet).
    pub me: String,
}

/// What the last chaining did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Record {
    owner: String,
    original_name: String,
    original: String,
    written_name: String,
    written: String,
}

/// The file the container runtime reads: the first config by name.
pub fn primary(conf_dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let entries = fs::read_dir(conf_dir).map_err(io_err("list", conf_dir))?;
    let mut configs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let ext = p.extension().and_then(|e| e.to_str());
            matches!(ext, Some("conf" | "conflist" | "json")) && p.is_file()
        })
        .collect();
    configs.sort();
    Ok(configs.into_iter().next())
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Value, InstallError> {
    serde_json::from_slice(bytes).map_err(|e| InstallError::BadConfig {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn is_weft(plugin: &Value) -> bool {
    plugin["type"] == PLUGIN
}

/// `config` with weft's `entry` last in its chain, and the file name to
/// write it under; `None` when weft is already in it.
pub fn chain(path: &Path, config: &Value, entry: &Value) -> Option<(PathBuf, Value)> {
    if let Some(plugins) = config["plugins"].as_array() {
        if plugins.iter().any(is_weft) {
            return None;
        }
        let mut out = config.clone();
        out["plugins"].as_array_mut()?.push(entry.clone());
        return Some((path.to_owned(), out));
    }
    // A single plugin: the list libcni would make of it, then weft.
    let list = json!({
        "cniVersion": config["cniVersion"],
        "name": config["name"],
        "plugins": [config, entry],
    });
    Some((path.with_extension("conflist"), list))
}

/// `config` without weft's entries.
pub fn unchain(config: &Value) -> Value {
    let mut out = config.clone();
    if let Some(plugins) = out["plugins"].as_array_mut() {
        plugins.retain(|p| !is_weft(p));
    }
    out
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(v).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    weft_proto::process::write_atomic(path, bytes, mode).map_err(io_err("write", path))
}

impl Installer {
    /// The entry weft adds to a chain.
    pub fn entry(&self) -> Value {
        json!({"type": PLUGIN, "socket": self.socket, "timeoutSeconds": 5})
    }

    fn record_path(&self) -> PathBuf {
        self.state_dir.join(RECORD)
    }

    fn record(&self) -> Option<Record> {
        let bytes = fs::read(self.record_path()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn save(&self, record: &Record) -> Result<(), InstallError> {
        fs::create_dir_all(&self.state_dir).map_err(io_err("create", &self.state_dir))?;
        let bytes = serde_json::to_vec(record).unwrap_or_default();
        write(&self.record_path(), &bytes, 0o600)
    }

    /// Takes over from an earlier installer (a rolling update): its exit
    /// then leaves the chain alone.
    pub fn claim(&self) -> Result<(), InstallError> {
        if let Some(mut r) = self.record() {
            r.owner = self.me.clone();
            self.save(&r)?;
        }
        Ok(())
    }

    fn owner(&self) -> bool {
        self.record().is_none_or(|r| r.owner == self.me)
    }

    /// Copies `exe` (this binary) into the bin dir, atomically: the
    /// runtime may be running the old one.
    pub fn copy_binary(&self, exe: &Path) -> Result<(), InstallError> {
        let bytes = fs::read(exe).map_err(io_err("read", exe))?;
        let target = self.bin_dir.join(PLUGIN);
        if fs::read(&target).ok().as_deref() != Some(&bytes[..]) {
            write(&target, &bytes, 0o755)?;
        }
        Ok(())
    }

    /// One look at the node's config: chains weft in if it is not there.
    /// Returns whether it wrote.
    pub fn pass(&self) -> Result<bool, InstallError> {
        if !self.owner() {
            return Ok(false);
        }
        let Some(path) = primary(&self.conf_dir)? else {
            return Ok(false); // the primary CNI has not written its config yet
        };
        let original = fs::read(&path).map_err(io_err("read", &path))?;
        let Some((target, chained)) = chain(&path, &parse(&path, &original)?, &self.entry()) else {
            return Ok(false);
        };
        let written = pretty(&chained);
        let record = Record {
            owner: self.me.clone(),
            original_name: path.display().to_string(),
            original: String::from_utf8_lossy(&original).into_owned(),
            written_name: target.display().to_string(),
            written: String::from_utf8_lossy(&written).into_owned(),
        };
        // Recorded first: an installer killed mid-way can still undo.
        self.save(&record)?;
        write(&target, &written, 0o644)?;
        if target != path {
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
        }
        tracing::info!(file = %target.display(), "weft-cni chained into the node's CNI config");
        Ok(true)
    }

    /// Takes weft out (when this installer still owns the chain): the file
    /// as it was if untouched since, else without weft's entry; and the
    /// binary. Returns whether it did.
    pub fn uninstall(&self) -> Result<bool, InstallError> {
        let Some(record) = self.record() else {
            return Ok(false);
        };
        if record.owner != self.me {
            tracing::info!(
                owner = record.owner,
                "a newer installer owns the chain; leaving it"
            );
            return Ok(false);
        }
        let written = PathBuf::from(&record.written_name);
        let current = fs::read(&written).ok();
        if current.as_deref() == Some(record.written.as_bytes()) {
            let original = PathBuf::from(&record.original_name);
            write(&original, record.original.as_bytes(), 0o644)?;
            if original != written {
                fs::remove_file(&written).map_err(io_err("remove", &written))?;
            }
        } else if let Some(bytes) = current {
            let config = parse(&written, &bytes)?;
            if unchain(&config) != config {
                write(&written, &pretty(&unchain(&config)), 0o644)?;
            }
        }
        let bin = self.bin_dir.join(PLUGIN);
        let _ = fs::remove_file(&bin);
        let _ = fs::remove_file(self.record_path());
        tracing::info!(file = %written.display(), "weft-cni taken out of the node's CNI config");
        Ok(true)
    }
}

/// `weft-cni install`: claims the chain, copies `exe` in, chains, looks
/// again every `interval` until SIGTERM or Ctrl-C, then takes weft out if
/// no newer installer has claimed the chain.
pub fn serve(
    installer: &Installer,
    exe: &Path,
    interval: std::time::Duration,
) -> Result<(), InstallError> {
    installer.claim()?;
    installer.copy_binary(exe)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("start a runtime for", exe))?;
    rt.block_on(async {
        let stop = weft_proto::process::shutdown_signal();
        tokio::pin!(stop);
        loop {
            if let Err(e) = installer.pass() {
                tracing::warn!(error = %e, "weft-cni not chained; trying again");
            }
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    });
    installer.uninstall().map(|_| ())
}

#[cfg(test)]
mod tests;
