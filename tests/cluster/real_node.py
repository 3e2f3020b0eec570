"""A real node for the cluster tests: the upstream kubelet (built from k8s.io/kubernetes by
build.sh), Debian's containerd, runc and CNI plugins on a bridge of its own, CoreDNS (built
from its module) as the cluster DNS, and the images of build_images.sh loaded into
containerd. Pods run in real containers: their own network namespace and IP, cgroups with
their limits, the image's filesystem, runAsUser, read-only roots, `kubectl logs`.

    node = RealNode(root, plane)     # plane: a ControlPlane started with node="real"
    node.start(); ...; node.stop()   # stop() undoes what the node did to the machine

Layout on the machine (everything else stays under `root` and the image cache):
- bridge BRIDGE with NODE_IP (pods get POD_CIDR addresses; the node's InternalIP is NODE_IP,
  since a loopback node IP is refused);
- the apiserver's Service IP reaches the apiserver through one DNAT rule (there is no
  kube-proxy): Pods use in-cluster config as on any cluster;
- CoreDNS on NODE_IP:53 answers cluster.local from the API server;
- cgroups under CGROUP_ROOT in every hierarchy (cgroup v1 here: `failCgroupV1: false`).

What the kubelet and the CNI plugins change on the machine, and stop() undoes: sysctls
(`vm.overcommit_memory`, `kernel.panic`, `kernel.panic_on_oops`, `net.ipv4.ip_forward`),
iptables chains (KUBE-FIREWALL, KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT), cgroups, mounts,
the bridge and a few folders (/run/containerd for the shims' sockets, /var/log/containers).
`machine_state()` is what the tests compare before and after.

Facts behind the settings: ../shared/KUBERNETES-TESTING.md ("A real node").
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import yaml
from control_plane import NODE_IP, free_port, stop_group

BRIDGE = "b3-cni0"
POD_CIDR = "10.244.0.0/24"
CGROUP_ROOT = "b3-testnode"  # the kubelet's cgroupRoot: /b3-testnode in every hierarchy
CGROUPS = Path("/sys/fs/cgroup")
PAUSE_IMAGE = "registry.k8s.io/pause:3.10.1"  # build_images.sh tags its pause image so
IMAGES = ("pause", "operator", "worker")  # build_images.sh's archives the node loads
CNI_BIN = "/usr/lib/cni"  # Debian's containernetworking-plugins
# the folders the node's programs make outside `root` (shim sockets, kubelet log links, CNI
# result cache); removed by stop() where they did not exist before
MADE_OUTSIDE = ["/run/containerd", "/var/log/containers", "/var/lib/cni", "/run/netns"]
# sysctls that change by themselves (counters, entropy, pids, per-boot randomness)
VOLATILE_SYSCTL = re.compile(
    r"^(fs\.(dentry-state|file-nr|inode-nr|inode-state|quota\..*)|kernel\.(random\..*|ns_last_pid|pty\.nr|tainted)"
    r"|net\.netfilter\.nf_conntrack_count|kernel\.sched_domain\..*|vm\.stat_.*|fs\.binfmt_misc\..*)$")  # fmt: skip


def _run(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if check and result.returncode != 0:
        raise RuntimeError(f"{shlex.join(args)}: exit {result.returncode}\n{result.stderr}")
    return result


# --- what the machine looks like -------------------------------------------------------------


def _sysctls() -> dict[str, str]:
    out = {}
    for line in _run("sysctl", "-a", check=False).stdout.splitlines():
        key, _, value = line.partition(" = ")
        if key and not VOLATILE_SYSCTL.match(key):
            out[key] = value
    return out


def _iptables() -> dict[str, list[str]]:
    """`-N`/`-A` lines of every table, per family (counters and comments dropped)."""
    out = {}
    for family in ("iptables", "ip6tables"):
        table = None
        for line in _run(f"{family}-save", check=False).stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":"):
                out.setdefault(f"{family} {table}", []).append("-N " + line[1:].split()[0])
            elif line.startswith("-A"):
                out.setdefault(f"{family} {table}", []).append(line)
    return out


def _nft_tables() -> list[str]:
    """nftables tables ("ip nat", ...): iptables-nft makes a table at its first rule in it."""
    return sorted(line.removeprefix("table ") for line in _run("nft", "list", "tables", check=False).stdout.splitlines())


def _cgroups() -> list[str]:
    """Every cgroup folder below the hierarchies' roots, to the kubelet's depth and more."""
    found = []
    for hierarchy in sorted(CGROUPS.iterdir()):
        if hierarchy.is_symlink() or not hierarchy.is_dir():
            continue
        for folder, subfolders, _ in os.walk(hierarchy):
            depth = Path(folder).relative_to(hierarchy).parts
            if len(depth) >= 4:
                subfolders.clear()
            if folder != str(hierarchy):
                found.append(folder)
    return sorted(found)


def _mounts() -> list[str]:
    return sorted(line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())


def _links() -> list[str]:
    return sorted(link["ifname"] for link in json.loads(_run("ip", "-j", "link", "show").stdout))


def bridge_ports() -> list[str]:
    """The links on the node's bridge: one veth per pod sandbox whose network is set up."""
    result = _run("ip", "-j", "link", "show", "master", BRIDGE, check=False)
    return [link["ifname"] for link in json.loads(result.stdout or "[]")] if result.returncode == 0 else []


def machine_state() -> dict:
    """What a real node changes: sysctls, iptables, cgroups, mounts, links, folders."""
    return {"sysctls": _sysctls(), "iptables": _iptables(), "nft_tables": _nft_tables(), "cgroups": _cgroups(), "mounts": _mounts(),
            "links": _links(), "folders": sorted(p for p in MADE_OUTSIDE if os.path.lexists(p))}  # fmt: skip


def state_differences(before: dict, after: dict) -> list[str]:
    """One line per difference, naming it (empty: the machine is as it was)."""
    out = []
    for key in ("sysctls",):
        for name in sorted(set(before[key]) | set(after[key])):
            if before[key].get(name) != after[key].get(name):
                out.append(f"sysctl {name}: {before[key].get(name)!r} -> {after[key].get(name)!r}")
    for table in sorted(set(before["iptables"]) | set(after["iptables"])):
        was, now = before["iptables"].get(table, []), after["iptables"].get(table, [])
        out += [f"{table}: added {r}" for r in now if r not in was]
        out += [f"{table}: removed {r}" for r in was if r not in now]
    for key in ("nft_tables", "cgroups", "mounts", "links", "folders"):
        out += [f"{key}: added {x}" for x in after[key] if x not in before[key]]
        out += [f"{key}: removed {x}" for x in before[key] if x not in after[key]]
    return out


def restore(before: dict) -> None:
    """Undo what the node left: sysctls back, added iptables rules and chains out, cgroups and
    mounts it made removed, its bridge and folders gone. Nothing that was there is touched."""
    now = machine_state()
    for name, value in before["sysctls"].items():
        if now["sysctls"].get(name, value) != value:
            _run("sysctl", "-q", "-w", f"{name}={value}", check=False)
    for table in set(now["nft_tables"]) - set(before["nft_tables"]):  # made by the node: all ours
        _run("nft", "delete", "table", *table.split(), check=False)
    now["iptables"] = _iptables()
    for table, rules in now["iptables"].items():
        family, name = table.split()
        was = before["iptables"].get(table, [])
        added = [r for r in rules if r not in was]
        for rule in (r for r in added if r.startswith("-A")):
            _run(family, "-w", "-t", name, "-D", *shlex.split(rule)[1:], check=False)
        for chain in (r.split()[1] for r in added if r.startswith("-N")):
            _run(family, "-w", "-t", name, "-F", chain, check=False)
        for chain in (r.split()[1] for r in added if r.startswith("-N")):
            _run(family, "-w", "-t", name, "-X", chain, check=False)
    for mount in sorted(set(now["mounts"]) - set(before["mounts"]), key=len, reverse=True):
        _run("umount", "-l", mount, check=False)
    for folder in sorted(set(now["cgroups"]) - set(before["cgroups"]), key=len, reverse=True):
        procs = Path(folder, "cgroup.procs")
        if f"/{CGROUP_ROOT}/" in f"{folder}/" and procs.exists():  # only the node's pods live there
            for pid in procs.read_text().split():
                os.kill(int(pid), signal.SIGKILL)
        _rmdir_cgroup(Path(folder))
    if BRIDGE in now["links"] and BRIDGE not in before["links"]:
        for link in bridge_ports():  # pods' veths whose sandbox was not torn down: ours
            _run("ip", "link", "delete", link, check=False)
        _run("ip", "link", "delete", BRIDGE, check=False)
    for path in set(now["folders"]) - set(before["folders"]):
        _run("rm", "-rf", "--one-file-system", path, check=False)


def _rmdir_cgroup(folder: Path, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while folder.exists():
        try:
            folder.rmdir()
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


# --- the node ----------------------------------------------------------------------------------


class RealNode:
    """kubelet + containerd + CNI + CoreDNS for one ControlPlane, state under `root`; images
    and containerd's content store under `cache` (kept between runs: the worker is 7 GB)."""

    def __init__(self, root: Path, plane, images: Path, cache: Path, kubelet: Path, coredns: Path):
        self.root, self.plane, self.images, self.cache = Path(root), plane, Path(images), Path(cache)
        self.kubelet_bin, self.coredns_bin = kubelet, coredns
        self.socket = self.root / "run" / "containerd.sock"
        self.before: dict | None = None
        self.processes: list[tuple[str, subprocess.Popen]] = []

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run("ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args, check=check, timeout=900)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.plane.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((name, proc))
        return proc

    # --- start ---------------------------------------------------------------------------------

    @staticmethod
    def make_bridge() -> None:
        """The CNI bridge with the node's address, before the apiserver binds and the kubelet
        registers NODE_IP (the bridge plugin adopts a bridge of its name)."""
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")

    def start(self, timeout: float = 180) -> RealNode:
        for folder in ("run", "state", "cni", "kubelet", "pod-logs"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._write_configs()
        self._spawn("containerd", ["containerd", "--config", str(self.root / "containerd.toml")])
        _wait("containerd answers", lambda: self.ctr("version", check=False).returncode == 0, 60, self.processes)
        self.load_images()
        # the apiserver's Service IP (pods' in-cluster config) to the apiserver on the bridge
        _run("iptables", "-w", "-t", "nat", "-A", "PREROUTING", "-d", self.plane.service_ip, "-p", "tcp",
             "--dport", "443", "-j", "DNAT", "--to-destination", f"{NODE_IP}:{self.plane.port}")  # fmt: skip
        for hierarchy in CGROUPS.iterdir():
            if hierarchy.is_dir() and not hierarchy.is_symlink() and not (hierarchy / CGROUP_ROOT).exists():
                (hierarchy / CGROUP_ROOT).mkdir()
                for name in ("cpuset.cpus", "cpuset.mems"):  # a new v1 cpuset starts empty
                    if (hierarchy / name).exists():
                        (hierarchy / CGROUP_ROOT / name).write_text((hierarchy / name).read_text())
        self._spawn("coredns", [str(self.coredns_bin), "-conf", str(self.root / "Corefile")])
        self._spawn("kubelet", [
            str(self.kubelet_bin), f"--config={self.root / 'kubelet.yaml'}",
            f"--kubeconfig={self.plane.kubeconfig}", f"--root-dir={self.root / 'kubelet'}",
            f"--cert-dir={self.root / 'kubelet' / 'pki'}", f"--node-ip={NODE_IP}",
            f"--hostname-override={self.plane.node_name}", "--v=1",
        ])  # fmt: skip
        _wait("the node Ready", self._ready, timeout, self.processes)
        return self

    def _ready(self) -> bool:
        result = self.plane.kubectl("get", "node", self.plane.node_name, "-o", "json", check=False)
        if result.returncode != 0:
            return False
        node = json.loads(result.stdout)
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))
        return ready and not any(t["key"] == "node.kubernetes.io/not-ready" for t in node["spec"].get("taints", []))

    def load_images(self) -> None:
        """Import each image archive containerd does not hold yet (by the archive's stamp)."""
        marks = self.cache / "imported"
        marks.mkdir(parents=True, exist_ok=True)
        for archive in (self.images / f"{name}.tar" for name in IMAGES):
            if not archive.exists():
                raise FileNotFoundError(f"{archive} is missing: run tests/cluster/build.sh")
            stamp = (archive.with_suffix(".stamp")).read_text()
            if (marks / archive.stem).exists() and (marks / archive.stem).read_text() == stamp:
                continue
            started = time.time()
            # the image it replaces goes first, with its content (the worker is 6.4 GB twice:
            # layers and snapshot), instead of staying pinned by the kubelet's record of it
            with tarfile.open(archive) as tar:
                refs = [ref for entry in json.load(tar.extractfile("manifest.json")) for ref in entry["RepoTags"]]
            if stale := replaced_image_records(self.ctr("images", "ls").stdout, refs):
                self.ctr("images", "rm", "--sync", *stale, check=False)  # else only disk is lost
            self.ctr("images", "import", str(archive))
            (marks / archive.stem).write_text(stamp)
            print(f"real node: imported {archive.name} in {time.time() - started:.0f}s")

    def _write_configs(self) -> None:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (self.root / "containerd.toml").write_text(f"""version = 2
root = "{self.cache / 'root'}"
state = "{self.root / 'state'}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.root / 'run' / 'containerd-ttrpc.sock'}"
[metrics]
  address = ""
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # root here lacks CAP_SYS_RESOURCE: runc cannot lower the pause container's oom_score_adj
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{self.root / 'state' / 'runc'}"
  [{cri}.cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{self.root / 'cni'}"
""")  # fmt: skip
        (self.root / "cni" / "10-b3.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "b3-test",
            "plugins": [{"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                         "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                                  "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.root / "cni" / "ipam")}},
                        {"type": "loopback"}],
        }))  # fmt: skip
        (self.root / "resolv.conf").write_text("nameserver 127.0.0.1\n")  # pods use the cluster DNS only
        (self.root / "Corefile").write_text(f""".:53 {{
    bind {NODE_IP}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {self.plane.kubeconfig} b3-test
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
""")
        (self.root / "kubelet.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            # the apiserver calls the kubelet (logs, exec) without a client certificate
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "address": NODE_IP, "port": free_port(), "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{CGROUP_ROOT}", "failCgroupV1": False, "failSwapOn": False,
            "clusterDNS": [NODE_IP], "clusterDomain": "cluster.local", "resolvConf": str(self.root / "resolv.conf"),
            "podLogsDir": str(self.root / "pod-logs"),
            # a test machine's disk is shared with the image cache: no evictions or image GC by disk
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False, "maxPods": 110,
            "shutdownGracePeriod": "0s",
        }))  # fmt: skip

    # --- stop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Every pod's containers gone through the kubelet, then the node's processes, then what
        they left on the machine (restore())."""
        self.plane.stop_making_pods()  # else a running B3Job's Jobs replace what is deleted here
        try:
            self.plane.kubectl("delete", "pods", "--all", "--all-namespaces", "--grace-period=0", "--force",
                               "--wait=false", check=False)  # fmt: skip
            # the sandboxes' network goes last (CNI DEL after the pause container stopped)
            _wait("the kubelet stopped its pods' containers and their network",
                  lambda: not self._running_tasks() and not bridge_ports(), 90, [])  # fmt: skip
        except (TimeoutError, RuntimeError, subprocess.TimeoutExpired):
            pass
        for name, proc in reversed(self.processes):
            if name == "containerd":
                self._remove_leftover_containers()
            stop_group(proc)
        self.processes.clear()
        self._kill_shims()

    def _running_tasks(self) -> list[str]:
        listing = self.ctr("tasks", "list", check=False).stdout.splitlines()[1:]
        return [line.split()[0] for line in listing if "RUNNING" in line.split()]

    def _remove_leftover_containers(self) -> None:
        """What the kubelet's garbage collection had not removed yet (it runs once a minute)."""
        for task in self.ctr("tasks", "list", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
            self.ctr("tasks", "delete", "-f", task, check=False)
        for container in self.ctr("containers", "list", "-q", check=False).stdout.split():
            self.ctr("containers", "delete", container, check=False)

    def _kill_shims(self) -> None:
        """The containerd shims this node's containerd started (they outlive it by design)."""
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"containerd-shim-runc-v2") and str(self.socket).encode() in cmdline:
                os.kill(int(proc.name), signal.SIGKILL)


def replaced_image_records(listing: str, refs: list[str]) -> list[str]:
    """The containerd image records (`ctr images ls` output) to remove before importing an
    archive tagged `refs`: those tags, and the records the kubelet keeps by image ID
    (`sha256:...`, same target digest) of what they tag now or of images no tag names any more
    (left by earlier imports: they pin 13 GB per worker version)."""
    rows = [row.split() for row in listing.splitlines()[1:] if row.strip()]  # REF TYPE DIGEST ...
    replaced = {row[2] for row in rows if row[0] in refs}
    tagged = {row[2] for row in rows if not row[0].startswith("sha256:")} - replaced
    return [row[0] for row in rows
            if row[2] in replaced or (row[0].startswith("sha256:") and row[2] not in tagged)]  # fmt: skip


def _wait(what: str, check, timeout: float, processes) -> None:
    deadline = time.time() + timeout
    while not check():
        for name, proc in processes:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}")
        if time.time() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f}s")
        time.sleep(0.5)
