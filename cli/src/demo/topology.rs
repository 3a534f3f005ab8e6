//! Network-namespace topologies for tests and the demo (needs root).
//!
//! Each node is a netns; the CNI `bridge` plugin run inside it makes the
//! node's bridge there, and each pod is a netns wired to it by `bridge` +
//! `host-local`. Nodes are joined by a veth pair with routes to each other's
//! pod subnets. Names carry a per-run suffix; everything is deleted on drop,
//! including when a test fails.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
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

#[derive(Debug, thiserror::Error)]
#[error("`{command}` failed: {reason}")]
pub struct TopologyError {
    pub command: String,
    pub reason: String,
}

/// Runs a command; its stdout, or an error with its stderr.
pub fn try_run(args: &[&str]) -> Result<String, TopologyError> {
    let err = |reason: String| TopologyError {
        command: args.join(" "),
        reason,
    };
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command, panicking with its stderr on failure (for tests).
pub fn run(args: &[&str]) -> String {
    try_run(args).unwrap_or_else(|e| panic!("{e}"))
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

    fn add_netns(&mut self, kind: &str, name: &str) -> Result<String, TopologyError> {
        let ns = format!("weft-{kind}-{}-{name}", self.sfx);
        try_run(&["ip", "netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        try_run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A node whose pods get addresses from `subnet` (e.g. 10.244.1.0/24).
    pub fn node(&mut self, name: &str, subnet: &str) -> Result<NodeNs, TopologyError> {
        let netns = self.add_netns("node", name)?;
        try_run(&[
            "ip",
            "netns",
            "exec",
            &netns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        Ok(NodeNs {
            name: name.to_owned(),
            netns,
            subnet: subnet.to_owned(),
        })
    }

    /// Joins two nodes with a veth pair (10.99.0.1 ↔ 10.99.0.2) and routes
    /// each one's pod subnet via the other. Returns the interface name on
    /// `a`'s side, for packet captures.
    pub fn link(&mut self, a: &NodeNs, b: &NodeNs) -> Result<String, TopologyError> {
        let (ia, ib) = (format!("wa{}", self.sfx), format!("wb{}", self.sfx));
        let veth = ["ip", "-n", &a.netns, "link", "add", &ia, "type", "veth"];
        try_run(&[&veth[..], &["peer", "name", &ib, "netns", &b.netns]].concat())?;
        for (ns, dev, addr) in [
            (&a.netns, &ia, "10.99.0.1/30"),
            (&b.netns, &ib, "10.99.0.2/30"),
        ] {
            try_run(&["ip", "-n", ns, "addr", "add", addr, "dev", dev])?;
            try_run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        }
        try_run(&[
            "ip",
            "-n",
            &a.netns,
            "route",
            "add",
            &b.subnet,
            "via",
            "10.99.0.2",
        ])?;
        try_run(&[
            "ip",
            "-n",
            &b.netns,
            "route",
            "add",
            &a.subnet,
            "via",
            "10.99.0.1",
        ])?;
        Ok(ia)
    }

    /// A pod on `node`, wired by the real CNI bridge + host-local plugins.
    pub fn pod(&mut self, node: &NodeNs, name: &str) -> Result<PodNs, TopologyError> {
        let netns = self.add_netns("pod", name)?;
        let path = PathBuf::from(format!("/var/run/netns/{netns}"));
        let ipam_dir = self.dir.path().join(format!("ipam-{}", node.name));
        let config = format!(
            r#"{{"cniVersion":"1.0.0","name":"weft-test","type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":false,
               "ipam":{{"type":"host-local","subnet":"{}","dataDir":"{}","routes":[{{"dst":"0.0.0.0/0"}}]}}}}"#,
            node.subnet,
            ipam_dir.display()
        );
        let result = cni(&node.netns, "ADD", &netns, &path, &config)?;
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| TopologyError {
                command: "CNI bridge ADD".into(),
                reason: format!("result without an IP: {result}"),
            })?;
        Ok(PodNs {
            name: name.to_owned(),
            netns,
            path,
            ip,
            cni_result: result,
        })
    }
}

/// Runs a CNI plugin inside `node_netns`.
pub fn cni(
    node_netns: &str,
    command: &str,
    container: &str,
    path: &std::path::Path,
    config: &str,
) -> Result<serde_json::Value, TopologyError> {
    use std::io::Write;
    let plugin = format!("{CNI_PATH}/bridge");
    let err = |reason: String| TopologyError {
        command: format!("CNI {command} ({plugin})"),
        reason,
    };
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
        .map_err(|e| err(format!("{e} (install containernetworking-plugins)")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(config.as_bytes())
            .map_err(|e| err(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(format!(
            "{} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| err(format!("bad CNI result: {e}")))
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Pods first (their veths go with them), then nodes (bridges, links).
        // Retried, because a failing test may have left the machine short of
        // processes for a moment; whatever still fails is named.
        for ns in self.namespaces.iter().rev() {
            let deleted = (0..3).any(|_| {
                Command::new("ip")
                    .args(["netns", "del", ns])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
            if !deleted && Path::new("/var/run/netns").join(ns).exists() {
                eprintln!(
                    "weft: could not delete network namespace {ns}; remove it with `ip netns del {ns}`"
                );
            }
        }
    }
}

impl PodNs {
    /// Connects the way the pod's application would: an ordinary, unmarked
    /// socket inside the pod, so capture applies to it.
    pub async fn connect(
        &self,
        dst: std::net::SocketAddr,
    ) -> std::io::Result<tokio::net::TcpStream> {
        connect_in(&self.path, dst).await
    }

    /// A listener inside the pod (an application's socket).
    pub async fn listen(
        &self,
        addr: std::net::SocketAddr,
    ) -> std::io::Result<tokio::net::TcpListener> {
        weft_ztunnel::netns::Netns::open(&self.path)?
            .listen(addr)
            .await
    }
}

/// tcpdump on a link, if tcpdump is installed: what crossed the wire.
pub struct LinkCapture {
    child: std::process::Child,
    file: std::path::PathBuf,
    netns: String,
}

impl LinkCapture {
    /// Starts tcpdump on `dev` in `netns`, returning once it is capturing.
    pub fn start(netns: &str, dev: &str, dir: &std::path::Path) -> Option<LinkCapture> {
        use std::io::BufRead;
        let file = dir.join("link.pcap");
        let mut child = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "tcpdump",
                "-i",
                dev,
                "--immediate-mode",
                "-U",
                "-n",
                "-w",
            ])
            .arg(&file)
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let mut line = String::new();
        std::io::BufReader::new(child.stderr.take()?)
            .read_line(&mut line)
            .ok()?;
        line.contains("listening").then(|| LinkCapture {
            child,
            file,
            netns: netns.to_owned(),
        })
    }

    /// Stops the capture: (`marker` seen in clear, packets to/from 15008).
    pub async fn finish(mut self, marker: &[u8]) -> (bool, usize) {
        let file = self.file.clone();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async move {
            while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) <= 24 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        let _ = try_run(&["kill", "-INT", &self.child.id().to_string()]);
        let _ = self.child.wait();
        let raw = std::fs::read(&self.file).unwrap_or_default();
        let seen = raw.windows(marker.len()).any(|w| w == marker);
        let path = self.file.display().to_string();
        let hbone = try_run(&[
            "ip",
            "netns",
            "exec",
            &self.netns,
            "tcpdump",
            "-r",
            &path,
            "-n",
            "tcp port 15008",
        ])
        .map(|out| out.lines().count())
        .unwrap_or(0);
        (seen, hbone)
    }
}

/// Connects from inside the network namespace at `netns` (a pod's), as its
/// application would: an ordinary socket, so capture applies to it.
pub async fn connect_in(
    netns: &std::path::Path,
    dst: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let std = weft_ztunnel::netns::Netns::open(netns)?
        .run(move || {
            let s = std::net::TcpStream::connect_timeout(&dst, std::time::Duration::from_secs(3))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .await?;
    tokio::net::TcpStream::from_std(std)
}
