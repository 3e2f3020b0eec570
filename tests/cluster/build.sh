#!/usr/bin/env bash
# Build what the cluster tests run, from Go modules, with this machine's Go:
#   b3-testcluster   etcd, kube-apiserver, kube-controller-manager, kube-scheduler (go.mod here)
#   b3-kubelet       the kubelet of the real node (the same module and replace lines)
#   coredns          the real node's cluster DNS (github.com/coredns/coredns at COREDNS_VERSION)
#   helm             the real Helm CLI (helm.sh/helm/v4/cmd/helm at HELM_VERSION)
#   prometheus       Prometheus PROMETHEUS_RELEASE (its module's v0 version), which scrapes the
#                    real node's pods found through kubernetes_sd_configs (Debian's prometheus
#                    is built without the Kubernetes service discovery)
#   kueue            Kueue's manager (sigs.k8s.io/kueue/cmd/kueue at KUEUE_VERSION), with its
#                    CRDs and webhook configurations in kueue-config/ (from the same module)
#   s3-server        moto's S3 server mode in a venv of its own (s3-server-requirements.txt),
#                    the object store of the transient-fault tests
#   images/          the operator, worker and pause images (build_images.sh)
# into $B3_TESTCLUSTER_BIN_DIR (default ~/.cache/b3-testcluster/bin). Each binary is kept
# with the hash of what made it: a warm machine rebuilds nothing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${B3_TESTCLUSTER_BIN_DIR:-$HOME/.cache/b3-testcluster/bin}"
HELM_VERSION=v4.3.1
KUEUE_VERSION=v0.17.0
COREDNS_VERSION=v1.15.0
PROMETHEUS_VERSION=v0.316.0 PROMETHEUS_RELEASE=3.16.0  # the module's v0.316.0 is release 3.16.0
KUBERAY_VERSION=v1.5.0
version=k8s.io/component-base/version  # what `kubectl version` and clients see
mkdir -p "$bin"
export GOFLAGS="${GOFLAGS:--buildvcs=false}"

stamp() { cat "$@" | sha256sum | cut -c1-16; }
# stale NAME WANT: NAME is missing or was built from something else; built NAME WANT STARTED: record it
stale() { [ "$(cat "$bin/$1.stamp" 2>/dev/null)" != "$2" ] || [ ! -x "$bin/$1" ]; }
built() { echo "$2" > "$bin/$1.stamp"; echo "build: $1 in $(( $(date +%s) - $3 ))s" >&2; }

# this module's two mains (cmd/NAME), reporting the Kubernetes version clients see
for name in b3-testcluster b3-kubelet; do
  want=$(cd "$here" && { go version; stamp build.sh go.mod go.sum "cmd/$name/main.go"; } | stamp)
  if stale "$name" "$want"; then
    echo "build: $name (cold: the control plane about 7 minutes on 2 cores, the kubelet under 2 after it)" >&2
    started=$(date +%s)
    (cd "$here" && go build -trimpath -o "$bin/$name.new" \
      -ldflags="-s -w -X $version.gitVersion=v1.37.2 -X $version.gitMajor=1 -X $version.gitMinor=37" \
      "./cmd/$name")
    mv "$bin/$name.new" "$bin/$name"
    built "$name" "$want" "$started"
  fi
done

want=$( { go version; echo "$COREDNS_VERSION"; } | stamp)
if stale coredns "$want"; then
  echo "build: coredns $COREDNS_VERSION (cold: about 2 minutes)" >&2
  started=$(date +%s)
  GOBIN="$bin" go install -trimpath -ldflags="-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
  built coredns "$want" "$started"
fi

want=$( { go version; echo "$HELM_VERSION"; } | stamp)
if stale helm "$want"; then
  echo "build: helm $HELM_VERSION" >&2
  started=$(date +%s)
  GOBIN="$bin" go install -trimpath -ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
  built helm "$want" "$started"
fi

want=$( { go version; echo "$PROMETHEUS_VERSION"; } | stamp)
if stale prometheus "$want"; then
  echo "build: prometheus $PROMETHEUS_RELEASE (cold: about 3 minutes on 2 cores)" >&2
  started=$(date +%s)
  GOBIN="$bin" go install -trimpath \
    -ldflags="-s -w -X github.com/prometheus/common/version.Version=$PROMETHEUS_RELEASE" \
    "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION"
  built prometheus "$want" "$started"
fi

want=$( { go version; echo "$KUEUE_VERSION"; } | stamp)
if stale kueue "$want"; then
  echo "build: kueue $KUEUE_VERSION (cold: about 3 minutes on 2 cores)" >&2
  started=$(date +%s)
  GOBIN="$bin" go install -trimpath -ldflags="-s -w" "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"
  module="$(go env GOMODCACHE)/sigs.k8s.io/kueue@$KUEUE_VERSION/config/components"
  rm -rf "$bin/kueue-config" && mkdir -p "$bin/kueue-config"
  cp "$module"/crd/bases/*.yaml "$bin/kueue-config/"
  cp "$module/webhook/manifests.yaml" "$bin/kueue-config/webhooks.yaml.in"  # not applied as is
  chmod -R u+w "$bin/kueue-config"
  built kueue "$want" "$started"
fi
want=$( { go version; echo "$KUBERAY_VERSION"; } | stamp)
if stale ray-operator "$want"; then
  echo "build: kuberay $KUBERAY_VERSION (cold: about 2.5 minutes on 2 cores)" >&2
  started=$(date +%s)
  GOBIN="$bin" go install -trimpath -ldflags="-s -w" "github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION"
  rm -rf "$bin/kuberay-crds" && mkdir -p "$bin/kuberay-crds"
  cp "$(go env GOMODCACHE)/github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION"/config/crd/bases/*.yaml \
    "$bin/kuberay-crds/"
  chmod -R u+w "$bin/kuberay-crds"
  built ray-operator "$want" "$started"
fi
want=$( { python3 --version; stamp "$here/s3-server-requirements.txt"; } | stamp)
if stale s3-server "$want"; then
  echo "build: s3-server (moto, a venv of its own)" >&2
  started=$(date +%s)
  rm -rf "$bin/s3-server-venv"
  python3 -m venv "$bin/s3-server-venv"
  "$bin/s3-server-venv/bin/pip" install -q --disable-pip-version-check -r "$here/s3-server-requirements.txt"
  ln -sf s3-server-venv/bin/moto_server "$bin/s3-server"
  built s3-server "$want" "$started"
fi
# the real node's images, and what it runs them with (Debian packages)
packages="containerd runc containernetworking-plugins buildah debootstrap iptables"
if ! dpkg -s $packages >/dev/null 2>&1; then
  sudo_cmd=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo")
  $sudo_cmd apt-get install -y -q $packages >/dev/null 2>&1 || {
    $sudo_cmd apt-get update -q >/dev/null && $sudo_cmd apt-get install -y -q $packages >/dev/null; }
fi
B3_TESTCLUSTER_BIN_DIR="$bin" bash "$here/build_images.sh" >/dev/null
echo "$bin"
