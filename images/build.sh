#!/usr/bin/env bash
# Builds weft's OCI images offline with buildah, from scratch: each image
# holds its binaries (debug info stripped) and exactly the shared libraries
# they link (as ldd resolves them on this machine), the ztunnel's also nft,
# a passwd/group naming root and nonroot (65532), and /tmp. Nothing else:
# no shell, no package manager. The Dockerfiles beside this script build the same images where
# a container builder and the network are at hand.
#
#   cargo build --profile dist -p weft-controller -p weft-ztunnel -p weft-waypoint
#   sudo images/build.sh                     # from target/dist, tag 0.1.0
#   sudo images/build.sh --bin-dir target/release --tag dev
#
# Prints one line per image: its name and size.
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir=target/dist
tag=0.1.0
registry=ghcr.io/weft-mesh
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --registry) registry=$2; shift 2 ;;
    *) echo "usage: $0 [--bin-dir DIR] [--tag TAG] [--registry NAME]" >&2; exit 2 ;;
  esac
done
command -v buildah >/dev/null || { echo "buildah not found: apt-get install buildah" >&2; exit 1; }

# The files a binary needs at run time: its shared libraries and loader.
libs_of() {
  ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u
}

# copy_in ROOT FILE DEST: FILE (debug info stripped) at DEST in ROOT, with
# the shared libraries it links.
copy_in() {
  local root=$1 file=$2 dest=$3 lib
  mkdir -p "$root$(dirname "$dest")"
  strip --strip-debug -o "$root$dest" "$file"
  for lib in $(libs_of "$file"); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

# image NAME USER "BIN..." ["HOST_TOOL..."]: weft binaries from the bin dir
# (the first is the entrypoint) and programs from this machine they run.
image() {
  local name=$1 user=$2 bins=($3) tools=(${4:-})
  local ctr root ref b
  for b in "${bins[@]}"; do
    [ -x "$bin_dir/$b" ] || { echo "$bin_dir/$b missing: cargo build the binaries first (see the top of $0)" >&2; exit 1; }
  done
  for b in "${tools[@]}"; do
    [ -x "$b" ] || { echo "$b missing on this machine (apt-get install nftables)" >&2; exit 1; }
  done
  ctr=$(buildah from scratch)
  root=$(buildah mount "$ctr")
  mkdir -p "$root/tmp" "$root/etc"
  chmod 1777 "$root/tmp"
  for b in "${bins[@]}"; do copy_in "$root" "$bin_dir/$b" "/usr/local/bin/$b"; done
  for b in "${tools[@]}"; do copy_in "$root" "$b" "$b"; done
  printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
  buildah umount "$ctr" >/dev/null
  buildah config --user "$user" --entrypoint "[\"/usr/local/bin/${bins[0]}\"]" --cmd '' \
    --label org.opencontainers.image.title="$name" \
    --label org.opencontainers.image.version="$tag" "$ctr"
  ref="$registry/$name:$tag"
  buildah commit --rm --quiet "$ctr" "$ref" >/dev/null
  echo "$ref $(buildah images --format '{{.Size}}' "$ref")"
}

image weft-controller 65532:65532 weft-controller
# Root with NET_ADMIN/SYS_ADMIN (the DaemonSet grants them): it enters pod
# network namespaces and installs nftables rules with nft. weft-cni rides
# along for the DaemonSet's install-cni container.
image ztunnel 0:0 "weft-ztunnel weft-cni" "$(command -v nft || echo /usr/sbin/nft)"
image weft-waypoint 65532:65532 weft-waypoint
