//! The OCI images, built here offline by `images/build.sh` with buildah from
//! the binaries this test run built: each runs its `--help` inside its own
//! root filesystem (chroot into the image, so a missing shared library
//! fails), the ztunnel image's `nft` too, and each runs as the user the
//! manifests expect. Sizes are printed (docs/benchmarks.md has the release
//! ones). Needs root and buildah (CI installs it).

use std::path::{Path, PathBuf};
use std::process::Command;

use weft_integration::netns::is_root;

/// `target/<profile>`: where cargo put this run's binaries.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_owned()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Removes the test's images however the test ends.
struct Images(Vec<String>);

impl Drop for Images {
    fn drop(&mut self) {
        for image in &self.0 {
            let _ = Command::new("buildah").args(["rmi", "-f", image]).output();
        }
    }
}

/// Runs `program --help` (or `args`) chrooted into `image`'s filesystem.
fn run_inside(image: &str, args: &[&str]) -> String {
    let ctr = run(Command::new("buildah").args(["from", "--quiet", image]));
    let ctr = ctr.trim();
    let mnt = run(Command::new("buildah").args(["mount", ctr]));
    let out = Command::new("chroot").arg(mnt.trim()).args(args).output();
    let _ = Command::new("buildah").args(["rm", ctr]).output();
    let out = out.expect("chroot");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?} in {image}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn images_build_offline_and_run_their_binaries() {
    if !is_root() {
        eprintln!("skipped: needs root for buildah (CI runs as root)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tag = format!("test-{}", std::process::id());
    let built = run(Command::new("bash")
        .arg(root.join("images/build.sh"))
        .arg("--bin-dir")
        .arg(bin_dir())
        .args(["--tag", &tag, "--registry", "localhost/weft-test"]));
    let refs: Vec<String> = built
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    let _cleanup = Images(refs.clone());
    eprintln!("{built}");
    let image = |name: &str| format!("localhost/weft-test/{name}:{tag}");
    assert_eq!(
        refs,
        [
            image("weft-controller"),
            image("ztunnel"),
            image("weft-waypoint")
        ]
    );

    let checks: [(&str, &[&str], &str); 5] = [
        (
            "weft-controller",
            &["/usr/local/bin/weft-controller", "--help"],
            "Usage: weft-controller",
        ),
        (
            "ztunnel",
            &["/usr/local/bin/weft-ztunnel", "--help"],
            "Usage: weft-ztunnel",
        ),
        (
            "ztunnel",
            &["/usr/local/bin/weft-cni", "--help"],
            "chained CNI plugin",
        ),
        ("ztunnel", &["/usr/sbin/nft", "--version"], "nftables"),
        (
            "weft-waypoint",
            &["/usr/local/bin/weft-waypoint", "--help"],
            "Usage: weft-waypoint",
        ),
    ];
    for (name, args, expect) in checks {
        let out = run_inside(&image(name), args);
        assert!(out.contains(expect), "{name} {args:?}: {out}");
    }
    for (name, user) in [
        ("weft-controller", "65532:65532"),
        ("ztunnel", "0:0"),
        ("weft-waypoint", "65532:65532"),
    ] {
        let config = run(Command::new("buildah").args([
            "inspect",
            "--format",
            "{{.OCIv1.Config.User}} {{.OCIv1.Config.Entrypoint}}",
            &image(name),
        ]));
        assert!(config.starts_with(user), "{name} runs as {config}");
    }
}
