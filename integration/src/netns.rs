//! Network-namespace topologies for tests and the demo (needs root).
//!
//! Each node is a netns; the CNI `bridge` plugin run inside it makes the
//! node's bridge there, and each pod is a netns wired to it by `bridge` +
//! `host-local`. Nodes are joined by a veth pair with routes to each other's
//! pod subnets. Names carry a per-run suffix; everything is deleted on drop,
//! including when a test fails.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Where Debian's containernetworking-plugins live.
pub const CNI_PATH: &str = "/usr/lib/cni";

pub fn is_root() -> bool {
    nix_uid() == 0
}

fn nix_uid() -> u32 {
    // /proc/self/status: "Uid:\t0\t0\t0\t0"
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX)
}

/// Runs a command, panicking with its stderr on failure.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub struct Topology {
    sfx: String,
    namespaces: Vec<String>,
    pub dir: tempfile::TempDir,
}

pub struct NodeNs {
    pub name: String,
    pub netns: String,
    pub subnet: String,
}

pub struct PodNs {
    pub name: String,
    pub netns: String,
    pub path: PathBuf,
    pub ip: IpAddr,
    /// What the bridge plugin returned: the `prevResult` for a chained plugin.
    pub cni_result: serde_json::Value,
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Topology {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let sfx = format!(
            "{:x}{:x}",
            std::process::id() % 0xffff,
            N.fetch_add(1, Ordering::Relaxed)
        );
        Topology {
            sfx,
            namespaces: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn add_netns(&mut self, kind: &str, name: &str) -> String {
        let ns = format!("weft-{kind}-{}-{name}", self.sfx);
        run(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// A node whose pods get addresses from `subnet` (e.g. 10.244.1.0/24).
    pub fn node(&mut self, name: &str, subnet: &str) -> NodeNs {
        let netns = self.add_netns("node", name);
        run(&[
            "ip",
            "netns",
            "exec",
            &netns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        NodeNs {
            name: name.to_owned(),
            netns,
            subnet: subnet.to_owned(),
        }
    }

    /// Joins two nodes with a veth pair (10.99.0.1 ↔ 10.99.0.2) and routes
    /// each one's pod subnet via the other. Returns the interface name on
    /// `a`'s side, for packet captures.
    pub fn link(&mut self, a: &NodeNs, b: &NodeNs) -> String {
        let (ia, ib) = (format!("wa{}", self.sfx), format!("wb{}", self.sfx));
        run(&[
            "ip", "-n", &a.netns, "link", "add", &ia, "type", "veth", "peer", "name", &ib, "netns",
            &b.netns,
        ]);
        for (ns, dev, addr) in [
            (&a.netns, &ia, "10.99.0.1/30"),
            (&b.netns, &ib, "10.99.0.2/30"),
        ] {
            run(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        run(&[
            "ip",
            "-n",
            &a.netns,
            "route",
            "add",
            &b.subnet,
            "via",
            "10.99.0.2",
        ]);
        run(&[
            "ip",
            "-n",
            &b.netns,
            "route",
            "add",
            &a.subnet,
            "via",
            "10.99.0.1",
        ]);
        ia
    }

    /// A pod on `node`, wired by the real CNI bridge + host-local plugins.
    pub fn pod(&mut self, node: &NodeNs, name: &str) -> PodNs {
        let netns = self.add_netns("pod", name);
        let path = PathBuf::from(format!("/var/run/netns/{netns}"));
        let ipam_dir = self.dir.path().join(format!("ipam-{}", node.name));
        let config = format!(
            r#"{{"cniVersion":"1.0.0","name":"weft-test","type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":false,
               "ipam":{{"type":"host-local","subnet":"{}","dataDir":"{}","routes":[{{"dst":"0.0.0.0/0"}}]}}}}"#,
            node.subnet,
            ipam_dir.display()
        );
        let result = cni(&node.netns, "ADD", &netns, &path, &config);
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("CNI result without an IP: {result}"));
        PodNs {
            name: name.to_owned(),
            netns,
            path,
            ip,
            cni_result: result,
        }
    }
}

/// Runs a CNI plugin inside `node_netns`.
pub fn cni(
    node_netns: &str,
    command: &str,
    container: &str,
    path: &std::path::Path,
    config: &str,
) -> serde_json::Value {
    use std::io::Write;
    let plugin = format!("{CNI_PATH}/bridge");
    let mut child = Command::new("ip")
        .args(["netns", "exec", node_netns, &plugin])
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", path)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {plugin} (install containernetworking-plugins): {e}")
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(config.as_bytes())
        .expect("write CNI config");
    let out = child.wait_with_output().expect("CNI plugin");
    assert!(
        out.status.success(),
        "CNI {command} failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Pods first (their veths go with them), then nodes (bridges, links).
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}
