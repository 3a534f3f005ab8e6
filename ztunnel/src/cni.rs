//! weft-cni: a chained CNI plugin (CNI spec 1.0) that hands each new pod to
//! the node's ztunnel and fails the ADD when the ztunnel does not confirm in
//! time, so no pod starts unprotected in a meshed namespace.
//!
//! Network config (a plugin entry after the cluster's CNI):
//! `{"type":"weft-cni","socket":"/var/run/weft/ztunnel.sock","timeoutSeconds":5}`

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::enroll::Reply;

pub const SUPPORTED: &[&str] = &["0.3.1", "0.4.0", "1.0.0"];
const DEFAULT_SOCKET: &str = "/var/run/weft/ztunnel.sock";

/// The CNI environment, as the runtime sets it.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub args: String,
}

impl Env {
    pub fn from_process() -> Self {
        let var = |k| std::env::var(k).unwrap_or_default();
        Env {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            args: var("CNI_ARGS"),
        }
    }
}

/// A CNI error result (printed on stdout, exit code 1).
#[derive(Debug, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: &str, details: impl ToString) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.to_string(),
        }
    }

    pub fn to_json(&self, version: &str) -> String {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
            .to_string()
    }
}

// CNI spec error codes.
const INCOMPATIBLE_VERSION: u32 = 1;
const INVALID_ENV: u32 = 4;
const DECODE_FAILURE: u32 = 6;
const TRY_AGAIN_LATER: u32 = 11;
const ENROLL_REFUSED: u32 = 100;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default)]
    timeout_seconds: Option<u64>,
    #[serde(default)]
    prev_result: Option<Value>,
}

/// Runs one CNI command; returns what to print on stdout.
pub fn run(env: &Env, stdin: &[u8]) -> Result<String, (String, CniError)> {
    if env.command == "VERSION" {
        return Ok(json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED}).to_string());
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        (
            "1.0.0".to_owned(),
            CniError::new(DECODE_FAILURE, "invalid network config", e),
        )
    })?;
    let version = conf.cni_version.clone();
    let fail = |e: CniError| (version.clone(), e);
    if !SUPPORTED.contains(&conf.cni_version.as_str()) {
        return Err(fail(CniError::new(
            INCOMPATIBLE_VERSION,
            "unsupported cniVersion",
            &conf.cni_version,
        )));
    }
    let socket = conf.socket.clone().unwrap_or_else(|| DEFAULT_SOCKET.into());
    let timeout = Duration::from_secs(conf.timeout_seconds.unwrap_or(5).clamp(1, 60));
    let args = parse_args(&env.args);
    match env.command.as_str() {
        "ADD" => {
            let prev = conf.prev_result.clone().ok_or_else(|| {
                fail(CniError::new(
                    INVALID_ENV,
                    "weft-cni must be chained",
                    "no prevResult from an earlier plugin",
                ))
            })?;
            let (namespace, name, uid) = pod_args(&args, env).map_err(fail)?;
            let line = json!({"op": "add", "uid": uid, "namespace": namespace, "name": name,
                              "netns": env.netns, "ips": prev_ips(&prev)})
            .to_string();
            send(&socket, &line, timeout).map_err(fail)?;
            // Chained plugins pass the previous result through unchanged.
            Ok(prev.to_string())
        }
        "DEL" => {
            // DEL must succeed when things are already gone, and must not
            // block pod deletion when the ztunnel is down.
            // A ztunnel that cannot be told finds a tombstone when it
            // restores, and does not bring the pod back.
            if let Ok((_, _, uid)) = pod_args(&args, env) {
                let told = send(
                    &socket,
                    &json!({"op": "remove", "uid": uid}).to_string(),
                    timeout,
                );
                if told.is_err() {
                    leave_tombstone(&socket, &uid);
                }
            }
            Ok(String::new())
        }
        "CHECK" => {
            let (_, _, uid) = pod_args(&args, env).map_err(fail)?;
            send(
                &socket,
                &json!({"op": "check", "uid": uid}).to_string(),
                timeout,
            )
            .map_err(fail)?;
            Ok(String::new())
        }
        other => Err(fail(CniError::new(
            INVALID_ENV,
            "unknown CNI_COMMAND",
            other,
        ))),
    }
}

/// Best effort: DEL succeeds whatever happens here.
fn leave_tombstone(socket: &std::path::Path, uid: &str) {
    let Some(name) = crate::enroll::tombstone_name(uid) else {
        return;
    };
    let dir = crate::enroll::tombstones(socket);
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join(name), b"");
    }
}

/// `K8S_POD_NAMESPACE=ns;K8S_POD_NAME=name;K8S_POD_UID=uid` → map.
fn parse_args(args: &str) -> HashMap<&str, &str> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .collect()
}

fn pod_args(args: &HashMap<&str, &str>, env: &Env) -> Result<(String, String, String), CniError> {
    let get = |k: &str| args.get(k).map(|v| v.to_string()).filter(|v| !v.is_empty());
    let namespace = get("K8S_POD_NAMESPACE");
    let name = get("K8S_POD_NAME");
    match (namespace, name) {
        (Some(ns), Some(name)) => {
            let uid = get("K8S_POD_UID").unwrap_or_else(|| env.container_id.clone());
            Ok((ns, name, uid))
        }
        _ => Err(CniError::new(
            INVALID_ENV,
            "missing pod identity",
            "CNI_ARGS needs K8S_POD_NAMESPACE and K8S_POD_NAME",
        )),
    }
}

fn prev_ips(prev: &Value) -> Vec<IpAddr> {
    prev["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .collect()
}

/// One request line, one reply line, all within `timeout`.
fn send(socket: &PathBuf, line: &str, timeout: Duration) -> Result<(), CniError> {
    let unreachable = |e: std::io::Error| {
        CniError::new(
            TRY_AGAIN_LATER,
            "ztunnel did not confirm enrollment",
            format!("{}: {e}", socket.display()),
        )
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(unreachable)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(unreachable)?;
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(unreachable)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .take(64 * 1024)
        .read_line(&mut reply)
        .map_err(unreachable)?;
    let reply: Reply = serde_json::from_str(&reply)
        .map_err(|e| CniError::new(TRY_AGAIN_LATER, "ztunnel did not confirm enrollment", e))?;
    if reply.ok {
        Ok(())
    } else {
        Err(CniError::new(
            ENROLL_REFUSED,
            "ztunnel refused the pod",
            reply.error.unwrap_or_default(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_and_bad_input() {
        let env = Env {
            command: "VERSION".into(),
            ..Env::default()
        };
        assert!(run(&env, b"").expect("version").contains("1.0.0"));
        let env = Env {
            command: "ADD".into(),
            ..Env::default()
        };
        let (_, e) = run(&env, b"{not json").expect_err("bad json");
        assert_eq!(e.code, DECODE_FAILURE);
        let (_, e) = run(&env, br#"{"cniVersion":"9.9.9"}"#).expect_err("version");
        assert_eq!(e.code, INCOMPATIBLE_VERSION);
        let (_, e) = run(&env, br#"{"cniVersion":"1.0.0"}"#).expect_err("not chained");
        assert!(e.details.contains("prevResult"));
        let (v, e) = run(&env, br#"{"cniVersion":"1.0.0","prevResult":{"ips":[]}}"#)
            .expect_err("no pod args");
        assert_eq!((v.as_str(), e.code), ("1.0.0", INVALID_ENV));
    }

    #[test]
    fn unreachable_ztunnel_fails_add_but_not_del() {
        let conf = br#"{"cniVersion":"1.0.0","socket":"/nonexistent/weft.sock","prevResult":{"ips":[{"address":"10.0.0.2/24"}]}}"#;
        let args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_UID=u1".to_owned();
        let add = Env {
            command: "ADD".into(),
            args: args.clone(),
            netns: "/x".into(),
            ..Env::default()
        };
        let (_, e) = run(&add, conf).expect_err("must fail");
        assert_eq!(e.code, TRY_AGAIN_LATER);
        let del = Env {
            command: "DEL".into(),
            args,
            ..Env::default()
        };
        assert_eq!(run(&del, conf).expect("DEL succeeds"), "");
    }

    #[test]
    fn del_while_the_ztunnel_is_away_leaves_a_tombstone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("ztunnel.sock");
        let conf = json!({"cniVersion": "1.0.0", "socket": socket}).to_string();
        let del = |uid: &str| Env {
            command: "DEL".into(),
            args: format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_UID={uid}"),
            ..Env::default()
        };
        let uid = "0b7e5c1a-3f4d-4c2e-9a61-2f1d8e7c6b5a";
        assert_eq!(run(&del(uid), conf.as_bytes()).expect("DEL succeeds"), "");
        assert!(dir.path().join("deleted").join(uid).exists());
        // A UID that could name another path leaves nothing.
        assert_eq!(run(&del("../../etc"), conf.as_bytes()).expect("DEL"), "");
        let left: Vec<_> = std::fs::read_dir(dir.path().join("deleted"))
            .expect("dir")
            .collect();
        assert_eq!(left.len(), 1);
    }
}
