//! The house's rules, checked on the real dependency graph (`cargo tree`,
//! offline, from the lockfile): the control plane links no data-plane code,
//! and the ztunnel links no control-plane machinery.

use std::process::Command;

/// The crates `package` links (normal dependencies), one name a line.
fn tree(package: &str, edges: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new(cargo)
        .current_dir(root)
        .args([
            "tree",
            "--offline",
            "--prefix",
            "none",
            "-e",
            edges,
            "-p",
            package,
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn links(tree: &str, krate: &str) -> bool {
    tree.lines()
        .any(|l| l.split_whitespace().next() == Some(krate))
}

#[test]
fn the_control_plane_links_no_data_plane() {
    let controller = tree("weft-controller", "normal");
    for data_plane in ["weft-ztunnel", "weft-waypoint", "weft-cli"] {
        assert!(
            !links(&controller, data_plane),
            "weft-controller links {data_plane}"
        );
    }
    assert!(links(&controller, "weft-proto"), "{controller}");
}

#[test]
fn the_ztunnel_links_no_control_plane_machinery() {
    let ztunnel = tree("weft-ztunnel", "normal");
    for control in [
        "weft-controller",
        "kube",
        "kube-client",
        "axum",
        "k8s-openapi",
    ] {
        assert!(!links(&ztunnel, control), "weft-ztunnel links {control}");
    }
    let features = tree("weft-ztunnel", "features");
    assert!(
        !features.contains("tonic feature \"server\""),
        "weft-ztunnel builds tonic's server"
    );
}
