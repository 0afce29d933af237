"""A pod runner for the chart's rendered manifests, faithful to the
kubelet's documented behaviour, for machines with no cluster.

Given the documents of `helm template`, it starts the Deployment's first
container the way the kubelet would:

- command and args replace the image's ENTRYPOINT and CMD;
- the environment is the service links of every Service in the namespace
  (unless `enableServiceLinks: false`; the `kubernetes` Service's are
  always there), then `envFrom`, then `env` with `valueFrom` resolved
  against the rendered ConfigMaps and Secrets and the pod's fields;
- ConfigMap and Secret volumes use the kubelet's atomic-writer layout
  (`..<timestamp>/` holding the files, `..data` pointing at it, and one
  `key -> ..data/key` link per key), emptyDirs are tmpfs of their
  `sizeLimit`, and `fsGroup` owns them;
- the container runs as `runAsUser:runAsGroup` with a read-only root when
  `readOnlyRootFilesystem` is set (see container.py), in a network
  namespace of its own with a pod IP reached over a veth pair;
- the startup probe runs first, then readiness and liveness, with their
  paths, ports, periods, timeouts and thresholds;
- deletion runs the preStop hook, then sends SIGTERM, and SIGKILL once
  `terminationGracePeriodSeconds` (which counts the hook's time) is over.

References: kubernetes.io/docs/concepts/services-networking/service
("Environment variables"), .../configuration/configmap and
pkg/volume/util/atomic_writer.go (the `..data` scheme),
.../workloads/pods/pod-lifecycle ("Container probes", "Termination of
Pods").
"""
import base64
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import container

_POD_INDEX = itertools.count(1)


def service_link_env(services):
    """The variables the kubelet injects for `services` (Docker-link style
    and `_SERVICE_HOST`/`_SERVICE_PORT`)."""
    env = {}
    for svc in services:
        # Headless Services have no address to link to: the kubelet skips them.
        if svc["spec"].get("clusterIP") == "None":
            continue
        name = svc["metadata"]["name"].upper().replace("-", "_")
        ip = svc["spec"].get("clusterIP") or "10.96.0.1"
        ports = svc["spec"].get("ports", [])
        if not ports:
            continue
        env[f"{name}_SERVICE_HOST"] = ip
        env[f"{name}_SERVICE_PORT"] = str(ports[0]["port"])
        for p in ports:
            if p.get("name"):
                env[f"{name}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
        first = ports[0]
        env[f"{name}_PORT"] = f"{first.get('protocol', 'TCP').lower()}://{ip}:{first['port']}"
        for p in ports:
            proto = p.get("protocol", "TCP")
            prefix = f"{name}_PORT_{p['port']}_{proto}"
            env[prefix] = f"{proto.lower()}://{ip}:{p['port']}"
            env[f"{prefix}_PROTO"] = proto.lower()
            env[f"{prefix}_PORT"] = str(p["port"])
            env[f"{prefix}_ADDR"] = ip
    return env


KUBERNETES_SERVICE = {
    "metadata": {"name": "kubernetes"},
    "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "protocol": "TCP"}]},
}


def _object_data(obj):
    """The key -> bytes of a ConfigMap or Secret."""
    data = {}
    if obj["kind"] == "ConfigMap":
        for k, v in (obj.get("data") or {}).items():
            data[k] = v.encode()
        for k, v in (obj.get("binaryData") or {}).items():
            data[k] = base64.b64decode(v)
    else:
        for k, v in (obj.get("data") or {}).items():
            data[k] = base64.b64decode(v)
        for k, v in (obj.get("stringData") or {}).items():
            data[k] = v.encode()
    return data


def atomic_writer_volume(path, files, gid, mode=0o644):
    """Lays `files` out as the kubelet's atomic writer does."""
    os.makedirs(path, exist_ok=True)
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.") + str(next(_POD_INDEX) * 1000 + 1)
    version = os.path.join(path, stamp)
    os.makedirs(version)
    for key, content in files.items():
        target = os.path.join(version, key)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(content)
        os.chmod(target, mode)
        if gid is not None:
            os.chown(target, 0, gid)
    os.symlink(stamp, os.path.join(path, "..data_tmp"))
    os.rename(os.path.join(path, "..data_tmp"), os.path.join(path, "..data"))
    for key in files:
        top = key.split("/")[0]
        link = os.path.join(path, top)
        if not os.path.lexists(link):
            os.symlink(os.path.join("..data", top), link)
    os.chmod(path, 0o755)
    if gid is not None:
        os.chown(version, 0, gid)


class PodFailed(Exception):
    """The pod did not behave as the kubelet requires."""


class Pod:
    """One pod of the rendered Deployment, run on this machine."""

    def __init__(self, docs, image, workdir, namespace="default", log=print):
        self.docs, self.image, self.workdir, self.log = docs, image, workdir, log
        self.namespace = namespace
        self.deployment = next(d for d in docs if d["kind"] == "Deployment")
        self.spec = self.deployment["spec"]["template"]["spec"]
        self.container = self.spec["containers"][0]
        # An address block still routed belongs to a pod of a run that was
        # killed before its clean-up: its route would take this pod's
        # traffic into the dead pod's namespace (connection refused).
        self.index = next(_POD_INDEX) % 250 + 1
        while _routed(f"10.233.{self.index}.0/30"):
            self.index = next(_POD_INDEX) % 250 + 1
        self.netns = f"berth-pod-{os.getpid()}-{self.index}"
        self.host_ip = f"10.233.{self.index}.1"
        self.pod_ip = f"10.233.{self.index}.2"
        self.name = f"{self.deployment['metadata']['name']}-{self.index:05d}"
        # Cluster DNS names this pod resolves (see `cluster_dns`).
        self.dns = {}
        self.proc = None
        self.lines = []
        self.events = []
        self._mounted = []

    # --- set-up ---

    def _find(self, kind, name):
        for d in self.docs:
            if d["kind"] == kind and d["metadata"]["name"] == name:
                return d
        raise PodFailed(f"{kind} {name} is referenced by the pod but not rendered")

    def _security(self, key, default=None):
        c = self.container.get("securityContext") or {}
        p = self.spec.get("securityContext") or {}
        return c.get(key, p.get(key, default))

    def environment(self):
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOSTNAME": self.name,
        }
        env.update(self.image.env)
        services = [d for d in self.docs if d["kind"] == "Service"]
        links = service_link_env([KUBERNETES_SERVICE])
        if self.spec.get("enableServiceLinks", True):
            links.update(service_link_env(services))
        resolved = {}
        for source in self.container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                obj = self._find("Secret", source["secretRef"]["name"])
            else:
                obj = self._find("ConfigMap", source["configMapRef"]["name"])
            for k, v in _object_data(obj).items():
                resolved[prefix + k] = v.decode()
        for var in self.container.get("env") or []:
            if "value" in var:
                resolved[var["name"]] = var["value"]
                continue
            ref = var.get("valueFrom", {})
            if "secretKeyRef" in ref:
                r = ref["secretKeyRef"]
                resolved[var["name"]] = _object_data(self._find("Secret", r["name"]))[r["key"]].decode()
            elif "configMapKeyRef" in ref:
                r = ref["configMapKeyRef"]
                resolved[var["name"]] = _object_data(self._find("ConfigMap", r["name"]))[r["key"]].decode()
            elif "fieldRef" in ref:
                fields = {
                    "metadata.name": self.name,
                    "metadata.namespace": self.namespace,
                    "status.podIP": self.pod_ip,
                    "spec.nodeName": "node-1",
                }
                resolved[var["name"]] = fields[ref["fieldRef"]["fieldPath"]]
            else:
                raise PodFailed(f"env {var['name']}: valueFrom {list(ref)} is not emulated")
        # Service links never override what the pod sets itself.
        for k, v in links.items():
            resolved.setdefault(k, v)
        env.update(resolved)
        return env

    def volumes(self):
        gid = self.spec.get("securityContext", {}).get("fsGroup")
        paths = {}
        for vol in self.spec.get("volumes") or []:
            path = os.path.join(self.workdir, "volumes", vol["name"])
            if "configMap" in vol or "secret" in vol:
                ref = vol.get("configMap") or vol.get("secret")
                kind = "ConfigMap" if "configMap" in vol else "Secret"
                name = ref.get("name") or ref.get("secretName")
                data = _object_data(self._find(kind, name))
                if ref.get("items"):
                    data = {i["path"]: data[i["key"]] for i in ref["items"]}
                mode = ref.get("defaultMode", 0o644)
                atomic_writer_volume(path, data, gid, mode)
            elif "emptyDir" in vol:
                os.makedirs(path)
                size = vol["emptyDir"].get("sizeLimit")
                opts = "mode=1777"
                if size:
                    opts += f",size={_bytes(size)}"
                subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", path], check=True)
                self._mounted.append(path)
                if gid is not None:
                    os.chown(path, 0, gid)
                    os.chmod(path, 0o2777)
            else:
                raise PodFailed(f"volume {vol['name']}: {list(vol)} is not emulated")
            paths[vol["name"]] = path
        mounts = []
        for m in self.container.get("volumeMounts") or []:
            source = paths[m["name"]]
            if m.get("subPath"):
                source = os.path.join(source, m["subPath"])
            mounts.append((source, m["mountPath"], bool(m.get("readOnly"))))
        return mounts

    def _network(self):
        ns, host, pod = self.netns, self.host_ip, self.pod_ip
        veth = self.veth = f"bp{os.getpid() % 10000}x{self.index}"
        cmds = [
            ["ip", "netns", "add", ns],
            ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns],
            ["ip", "addr", "add", f"{host}/30", "dev", veth],
            ["ip", "link", "set", veth, "up"],
            ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{pod}/30", "dev", "eth0"],
            ["ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up"],
            ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
            # Other pods are reached through the node, as on a real one
            # (forwarding on: see `forwarding`).
            ["ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", host],
        ]
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)

    def start(self):
        self._network()
        argv = self.container.get("command") or self.image.entrypoint or []
        args = self.container.get("args")
        if args is None and not self.container.get("command"):
            args = self.image.cmd or []
        argv = list(argv) + list(args or [])
        uid = self._security("runAsUser", self.image.user.split(":")[0])
        gid = self._security("runAsGroup", uid)
        if self._security("runAsNonRoot") and str(uid) == "0":
            raise PodFailed("runAsNonRoot is set but the container would run as root")
        read_only = bool((self.container.get("securityContext") or {}).get("readOnlyRootFilesystem"))
        env = self.environment()
        mounts = self.volumes()
        mounts += self._dns_files()
        self.log(f"kubelet: starting {argv} as {uid}:{gid}, read-only root {read_only}, pod IP {self.pod_ip}")
        self.started = time.time()
        self.proc = container.run(
            self.image, argv, env, mounts, f"{uid}:{gid}", read_only, netns=self.netns, stdout=subprocess.PIPE
        )
        threading.Thread(target=self._read_logs, daemon=True).start()

    def _dns_files(self):
        """The /etc/hosts the kubelet writes into every pod, with the cluster
        DNS names this pod resolves. This runner has no DNS server: in its
        stead the hosts file holds each name's addresses, and a host.conf
        with `multi on` makes glibc answer with all of them, as cluster DNS
        answers a headless Service's name."""
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                 f"{self.pod_ip}\t{self.name}"]
        for name, ips in sorted(self.dns.items()):
            lines += [f"{ip}\t{name}" for ip in ips]
        files = []
        for name, text in [("hosts", "\n".join(lines) + "\n"), ("host.conf", "multi on\n")]:
            path = os.path.join(self.workdir, f"etc-{name}")
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o644)
            files.append((path, f"/etc/{name}", True))
        return files

    def _read_logs(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    # --- probes ---

    def _port(self, port):
        if isinstance(port, int):
            return port
        for p in self.container.get("ports") or []:
            if p.get("name") == port:
                return p["containerPort"]
        raise PodFailed(f"probe port {port} is not a named port of the container")

    def probe(self, spec):
        """One probe attempt; True on success."""
        status, _ = self.probe_answer(spec)
        return status is not None and 200 <= status < 400

    def probe_answer(self, spec):
        """One probe attempt: (HTTP status, body), or (None, why) when no
        answer came (refused, timed out). A gRPC probe answers 200 for
        SERVING and 503 for any other status, with the status as the body."""
        if "grpc" in spec:
            return self.grpc_probe(spec)
        get = spec.get("httpGet")
        if not get:
            raise PodFailed(f"probe {list(spec)} is not emulated")
        url = f"http://{self.pod_ip}:{self._port(get['port'])}{get.get('path', '/')}"
        try:
            with urllib.request.urlopen(url, timeout=spec.get("timeoutSeconds", 1)) as r:
                return r.status, r.read(256).decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read(256).decode(errors="replace")
        except OSError as e:
            return None, str(e)

    def grpc_probe(self, spec):
        """The kubelet's gRPC probe: grpc.health.v1.Health/Check on the
        numbered port (a gRPC probe takes no port names), for `service`;
        success only for SERVING."""
        import grpc  # the chart tests' venv has grpcio

        port = spec["grpc"]["port"]
        if not isinstance(port, int):
            raise PodFailed(f"a gRPC probe's port must be a number, not {port!r}")
        service = spec["grpc"].get("service", "").encode()
        # HealthCheckRequest{service} and HealthCheckResponse{status}, one
        # field each: encoded by hand rather than with generated stubs.
        request = (b"\x0a" + bytes([len(service)]) + service) if service else b""
        names = {1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
        try:
            with grpc.insecure_channel(f"{self.pod_ip}:{port}") as channel:
                check = channel.unary_unary("/grpc.health.v1.Health/Check")
                answer = check(request, timeout=spec.get("timeoutSeconds", 1))
        except grpc.RpcError as e:
            return None, f"{e.code().name}: {e.details()}"
        status = answer[1] if answer[:1] == b"\x08" and len(answer) > 1 else 0
        name = names.get(status, "UNKNOWN")
        return (200 if name == "SERVING" else 503), name

    def accepts(self, port, timeout=0.5):
        """Whether the container's `port` (a number or a port name) takes a
        TCP connection now."""
        try:
            with socket.create_connection((self.pod_ip, self._port(port)), timeout=timeout):
                return True
        except OSError:
            return False

    def _alive(self):
        if self.proc.poll() is not None:
            raise PodFailed(f"the container exited with {self.proc.returncode}:\n" + "\n".join(self.lines[-30:]))

    def wait_started(self):
        """Runs the startup probe as specified; raises if it never passes."""
        spec = self.container.get("startupProbe")
        if not spec:
            return
        time.sleep(spec.get("initialDelaySeconds", 0))
        failures = 0
        while True:
            self._alive()
            status, why = self.probe_answer(spec)
            if status is not None and 200 <= status < 400:
                self.events.append(("started", time.time() - self.started))
                return
            failures += 1
            if failures >= spec.get("failureThreshold", 3):
                raise PodFailed(
                    f"startup probe failed {failures} times ({status}: {why}): the kubelet would "
                    "restart the container; its last lines:\n" + "\n".join(self.lines[-30:])
                )
            time.sleep(spec.get("periodSeconds", 10))

    def wait_ready(self, limit):
        """Runs readiness (and liveness) after start-up until ready."""
        ready = self.container.get("readinessProbe")
        deadline = time.time() + limit
        while time.time() < deadline:
            self._alive()
            if ready is None or self.probe(ready):
                self.events.append(("ready", time.time() - self.started))
                return
            time.sleep(ready.get("periodSeconds", 10))
        raise PodFailed(f"not ready after {limit}s")

    def check_liveness(self, rounds):
        """`rounds` liveness periods, counting failures against the
        threshold as the kubelet does."""
        spec = self.container.get("livenessProbe")
        if not spec:
            return
        failures = 0
        for _ in range(rounds):
            self._alive()
            failures = 0 if self.probe(spec) else failures + 1
            if failures >= spec.get("failureThreshold", 3):
                raise PodFailed("liveness probe failed: the kubelet would restart the container")
            time.sleep(min(spec.get("periodSeconds", 10), 1))

    # --- termination ---

    def delete(self):
        """preStop, SIGTERM, and SIGKILL at the end of the grace period.
        Returns (exit code, seconds taken, the readiness probes during the
        drain): each probe a dict of `ready`, `status` and `body` of the
        answer, and `traffic`, whether the first container port still took
        connections then."""
        grace = self.spec.get("terminationGracePeriodSeconds", 30)
        started = time.time()
        deadline = started + grace
        hook = (self.container.get("lifecycle") or {}).get("preStop")
        if hook:
            if "sleep" in hook:
                time.sleep(hook["sleep"]["seconds"])
            elif "httpGet" in hook:
                self.probe(hook)
            else:
                raise PodFailed(f"preStop {list(hook)} is not emulated")
        self.proc.send_signal(signal.SIGTERM)
        drained_ready = []
        ready = self.container.get("readinessProbe")
        while self.proc.poll() is None and time.time() < deadline:
            if ready:
                status, body = self.probe_answer(ready)
                ports = self.container.get("ports") or []
                drained_ready.append({
                    "ready": status is not None and 200 <= status < 400,
                    "status": status,
                    "body": body,
                    "traffic": bool(ports) and self.accepts(ports[0]["containerPort"]),
                })
            time.sleep(0.2)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            return None, time.time() - started, drained_ready
        return self.proc.returncode, time.time() - started, drained_ready

    def cleanup(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for path in self._mounted:
            subprocess.run(["umount", "-l", path], capture_output=True)
        # Whatever still runs in the pod's namespace (the container's own
        # children) would keep it, its veth and its route alive.
        pids = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout
        for pid in pids.split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        subprocess.run(["ip", "link", "del", getattr(self, "veth", "")], capture_output=True)
        shutil.rmtree(os.path.join(self.workdir, "volumes"), ignore_errors=True)


def cluster_dns(pods):
    """What cluster DNS answers for the headless Services rendered with
    `pods`: `NAME.NS.svc` (and `.cluster.local`) to the address of every pod
    whose labels the Service selects. Only Services that publish not-ready
    addresses are emulated, since this runner does not track endpoints'
    readiness. Sets each pod's `dns` and returns the names."""
    names = {}
    for pod in pods:
        for svc in (d for d in pod.docs if d["kind"] == "Service"):
            spec = svc["spec"]
            if spec.get("clusterIP") != "None" or not spec.get("publishNotReadyAddresses"):
                continue
            name = f"{svc['metadata']['name']}.{pod.namespace}.svc"
            names.setdefault(name, [])
            names.setdefault(name + ".cluster.local", [])
            for other in pods:
                labels = other.deployment["spec"]["template"]["metadata"]["labels"]
                selected = all(labels.get(k) == v for k, v in spec["selector"].items())
                if selected and other.namespace == pod.namespace and other.pod_ip not in names[name]:
                    names[name].append(other.pod_ip)
                    names[name + ".cluster.local"].append(other.pod_ip)
    for pod in pods:
        pod.dns = names
    return names


@contextlib.contextmanager
def forwarding():
    """IPv4 forwarding on this node while pods talk to each other, as it
    is on every Kubernetes node; the previous setting afterwards."""
    path = "/proc/sys/net/ipv4/ip_forward"
    with open(path) as f:
        before = f.read().strip()
    with open(path, "w") as f:
        f.write("1")
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(before)


def _routed(block):
    """Whether the host has a route for this address block."""
    out = subprocess.run(["ip", "route", "show", block], capture_output=True, text=True).stdout
    return bool(out.strip())


def _bytes(quantity):
    """A Kubernetes quantity such as `256Mi` in bytes."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, mult in units.items():
        if str(quantity).endswith(suffix):
            return int(str(quantity)[: -len(suffix)]) * mult
    return int(quantity)
