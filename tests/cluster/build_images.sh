#!/usr/bin/env bash
# Build the images the real node runs, offline of any registry, with Debian's debootstrap and
# buildah (no Docker engine here):
#   base      Debian bookworm minbase + python3 in a venv on PATH (python, pip), this machine's
#             CA bundle (pip reaches PyPI through it): what python:3.11-slim is to users
#   operator  images/operator.Dockerfile  FROM the base  -> ghcr.io/b3-operator/operator:$VERSION
#   worker    images/worker.Dockerfile    FROM the base  -> ghcr.io/b3-operator/worker:$VERSION
#   pause     the kubelet's sandbox image, pause.c from the k8s.io/kubernetes module, static
# into $bin/images/NAME.tar (docker-archive, for `ctr images import`), each kept with the hash of
# what made it: a warm machine builds nothing. buildah's storage and cache stay under $bin.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin="${B3_TESTCLUSTER_BIN_DIR:-$HOME/.cache/b3-testcluster/bin}"
out="$bin/images" work="$bin/buildah"
mkdir -p "$out" "$work/tmp"
version=$(sed -n 's/^appVersion: "\(.*\)"/\1/p' "$repo/charts/b3-operator/Chart.yaml")
PAUSE_IMAGE=registry.k8s.io/pause:3.10.1  # the name containerd's config gives the sandbox image
BASE_IMAGE=localhost/b3-test-base:bookworm
export TMPDIR="$work/tmp"
buildah() { command buildah --root "$work/root" --runroot "$work/run" --storage-driver overlay "$@"; }

stamp() { cat "$@" | sha256sum | cut -c1-16; }
stale() { [ "$(cat "$out/$1.stamp" 2>/dev/null)" != "$2" ] || [ ! -s "$out/$1.tar" ]; }
built() { echo "$2" > "$out/$1.stamp"; echo "build: image $1 in $(( $(date +%s) - $3 ))s" >&2; }
# export NAME IMAGE: the image as a docker-archive for ctr; buildah's copy is dropped
export_image() {
  rm -f "$out/$1.tar" "$out/$1.tar.new"  # the old archive first: the worker's is 6.4 GB
  buildah push -q "$2" "docker-archive:$out/$1.tar.new:$2" >/dev/null
  mv "$out/$1.tar.new" "$out/$1.tar"
}

# what makes the base: the recipe below (bump BASE_RECIPE when it changes) and the CA bundle
BASE_RECIPE="bookworm minbase python3 python3-venv ca-certificates venv=/opt/python 1"
want=$(echo "$BASE_RECIPE" | stamp - /etc/ssl/certs/ca-certificates.crt)
if stale base "$want"; then
  echo "build: image base (debootstrap, about a minute)" >&2
  started=$(date +%s)
  rootfs="$work/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  chroot "$rootfs" /usr/bin/python3 -m venv /opt/python
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  container=$(buildah from scratch)
  buildah copy "$container" "$rootfs" / >/dev/null
  buildah config --env PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt --env LANG=C.UTF-8 --cmd python "$container"
  buildah commit -q --rm "$container" "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  export_image base "$BASE_IMAGE"
  built base "$want" "$started"
fi
base_stamp=$(cat "$out/base.stamp")

# the inputs of an image: its Dockerfile, the files it copies (.dockerignore's list), the base
inputs() { (cd "$repo" && { echo "$base_stamp"; find "images/$1.Dockerfile" .dockerignore constraints.txt \
  pyproject.toml README.md images/operator-requirements.txt b3 jobs operator -type f \
  ! -path '*/__pycache__/*' ! -path '*.egg-info/*' | sort | xargs sha256sum; } | stamp); }
# the base in buildah's storage (the FROM of both Dockerfiles), from its archive if it went
buildah inspect "$BASE_IMAGE" >/dev/null 2>&1 || buildah pull -q "docker-archive:$out/base.tar" >/dev/null
for name in operator worker; do
  want=$(inputs "$name")
  if stale "$name" "$want"; then
    echo "build: image $name (cold: operator under a minute, worker about 4, most of it PyPI's CUDA torch)" >&2
    started=$(date +%s)
    image="ghcr.io/b3-operator/$name:$version"
    (cd "$repo" && buildah bud --isolation chroot --network host --layers --pull-never \
      --build-arg "BASE=$BASE_IMAGE" -f "images/$name.Dockerfile" -t "$image" . >"$work/$name.log" 2>&1) || {
      tail -40 "$work/$name.log" >&2; buildah rm --all >/dev/null; exit 1; }  # a failed step's container
    export_image "$name" "$image"
    # the image stays in buildah's storage: removing it would drop the cached layers (--layers)
    # that let the next build after a code change skip the dependencies' layer; the image it
    # replaced goes (the worker is 6.4 GB: a few rebuilds would fill the disk)
    buildah rmi --prune >/dev/null
    built "$name" "$want" "$started"
  fi
done

kubernetes="$(go env GOMODCACHE)/k8s.io/kubernetes@v1.37.2"
want=$(echo "$PAUSE_IMAGE static 1" | stamp - "$kubernetes/build/pause/linux/pause.c")
if stale pause "$want"; then
  started=$(date +%s)
  rootfs="$work/pause"
  rm -rf "$rootfs" && mkdir -p "$rootfs"
  gcc -Os -static -DVERSION=3.10.1 -o "$rootfs/pause" "$kubernetes/build/pause/linux/pause.c"
  container=$(buildah from scratch)
  buildah copy "$container" "$rootfs/pause" /pause >/dev/null
  buildah config --entrypoint '["/pause"]' --user 65535:65535 "$container"
  buildah commit -q --rm "$container" "$PAUSE_IMAGE" >/dev/null
  export_image pause "$PAUSE_IMAGE"
  buildah rmi "$PAUSE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  built pause "$want" "$started"
fi
echo "$out"
