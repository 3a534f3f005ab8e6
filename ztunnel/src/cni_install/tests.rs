//! The installer against the config files real primary CNIs write
//! (`ztunnel/tests/cni-configs/`: Calico, Cilium, flannel, containerd's
//! bridge list, and a single-plugin bridge `.conf`), in a scratch node
//! layout: chained in, idempotent, re-chained after the primary rewrites,
//! and taken out leaving every file byte-identical.

use std::collections::BTreeMap;

use super::*;

const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cni-configs");

struct Node {
    _dir: tempfile::TempDir,
    installer: Installer,
}

fn node(me: &str, sample: &str) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let installer = installer_in(dir.path(), me);
    for d in [&installer.bin_dir, &installer.conf_dir] {
        fs::create_dir_all(d).expect("mkdir");
    }
    let from = Path::new(SAMPLES).join(sample);
    fs::copy(&from, installer.conf_dir.join(sample)).expect("sample");
    // A file the runtime does not pick (sorts later): never touched.
    let later = installer.conf_dir.join("99-loopback.conf");
    fs::write(
        later,
        r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#,
    )
    .expect("w");
    Node {
        _dir: dir,
        installer,
    }
}

fn installer_in(root: &Path, me: &str) -> Installer {
    Installer {
        bin_dir: root.join("opt/cni/bin"),
        conf_dir: root.join("etc/cni/net.d"),
        state_dir: root.join("var/lib/weft/ztunnel"),
        socket: "/var/run/weft/ztunnel.sock".into(),
        me: me.into(),
    }
}

/// Every file in `dir`, name → bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .expect("list")
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, fs::read(e.path()).expect("read"))
        })
        .collect()
}

fn chain_of(installer: &Installer) -> Vec<Value> {
    let path = primary(&installer.conf_dir)
        .expect("list")
        .expect("a config");
    let config: Value = serde_json::from_slice(&fs::read(path).expect("read")).expect("JSON");
    config["plugins"].as_array().cloned().unwrap_or_default()
}

#[test]
fn chains_into_each_primary_cni_and_leaves_it_as_it_was() {
    let samples = [
        "10-calico.conflist",
        "05-cilium.conflist",
        "10-flannel.conflist",
        "10-containerd-net.conflist",
        "10-bridge.conf",
    ];
    for sample in samples {
        let n = node("pod-a", sample);
        let i = &n.installer;
        let before = files(&i.conf_dir);
        let original: Value = serde_json::from_slice(&before[sample]).expect("sample is JSON");
        let exe = i.conf_dir.join("99-loopback.conf"); // any file stands in for the binary
        i.copy_binary(&exe).expect("copy");
        assert!(i.pass().expect("chain"), "{sample}: chained");
        let chain = chain_of(i);
        let theirs = original["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| vec![original.clone()]);
        assert_eq!(
            chain[..chain.len() - 1],
            theirs[..],
            "{sample}: their plugins kept, in order"
        );
        assert_eq!(
            chain.last().expect("weft")["type"],
            PLUGIN,
            "{sample}: weft last"
        );
        assert!(i.bin_dir.join(PLUGIN).exists());
        assert!(
            !i.pass().expect("again"),
            "{sample}: a second pass writes nothing"
        );

        assert!(i.uninstall().expect("uninstall"));
        assert_eq!(files(&i.conf_dir), before, "{sample}: byte-identical");
        assert!(!i.bin_dir.join(PLUGIN).exists(), "{sample}: binary removed");
    }
}

#[test]
fn a_single_plugin_conf_becomes_a_list_and_comes_back() {
    let n = node("pod-a", "10-bridge.conf");
    let i = &n.installer;
    i.pass().expect("chain");
    let names: Vec<String> = files(&i.conf_dir).into_keys().collect();
    assert_eq!(names, ["10-bridge.conflist", "99-loopback.conf"]);
    i.uninstall().expect("uninstall");
    let names: Vec<String> = files(&i.conf_dir).into_keys().collect();
    assert_eq!(names, ["10-bridge.conf", "99-loopback.conf"]);
}

#[test]
fn rechains_when_the_primary_rewrites_its_config() {
    let n = node("pod-a", "10-calico.conflist");
    let i = &n.installer;
    i.pass().expect("chain");
    // Calico's install container rewrites its file (a new node name).
    let path = i.conf_dir.join("10-calico.conflist");
    let rewritten = fs::read_to_string(Path::new(SAMPLES).join("10-calico.conflist"))
        .expect("sample")
        .replace("worker-1", "worker-1b");
    fs::write(&path, &rewritten).expect("rewrite");
    assert!(i.pass().expect("rechain"), "weft chained in again");
    assert_eq!(chain_of(i).last().expect("weft")["type"], PLUGIN);
    i.uninstall().expect("uninstall");
    assert_eq!(fs::read_to_string(&path).expect("read"), rewritten);

    // Edited by someone else after weft chained it: only weft's entry goes.
    i.pass().expect("chain");
    let mut edited: Value = serde_json::from_slice(&fs::read(&path).expect("r")).expect("j");
    edited["name"] = json!("edited");
    fs::write(&path, serde_json::to_vec(&edited).expect("j")).expect("w");
    i.uninstall().expect("uninstall");
    let left: Value = serde_json::from_slice(&fs::read(&path).expect("r")).expect("j");
    assert_eq!(left["name"], "edited");
    assert!(
        !left["plugins"]
            .as_array()
            .expect("list")
            .iter()
            .any(is_weft)
    );
}

#[test]
fn in_a_rolling_update_only_the_last_installer_takes_weft_out() {
    let n = node("old-pod", "10-flannel.conflist");
    let old = &n.installer;
    let before = files(&old.conf_dir);
    old.pass().expect("chain");
    let root = old
        .bin_dir
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent);
    let new = installer_in(root.expect("root"), "new-pod");
    new.claim().expect("claim");
    assert!(!new.pass().expect("pass"), "already chained");
    assert!(
        !old.uninstall().expect("old exits"),
        "the old one leaves it"
    );
    assert_eq!(chain_of(old).last().expect("weft")["type"], PLUGIN);
    assert!(
        !old.pass().expect("old pass"),
        "a displaced installer writes nothing"
    );
    assert!(new.uninstall().expect("new exits"));
    assert_eq!(files(&old.conf_dir), before);
}

#[test]
fn a_config_that_is_not_json_is_refused_and_left_alone() {
    let n = node("pod-a", "10-flannel.conflist");
    let i = &n.installer;
    let path = i.conf_dir.join("10-flannel.conflist");
    fs::write(&path, "{ not json").expect("w");
    let err = i.pass().expect_err("refused");
    assert!(err.to_string().contains("10-flannel.conflist"), "{err}");
    assert_eq!(fs::read_to_string(&path).expect("r"), "{ not json");
}
