"""How long a new pod's berth takes to become ready, with the cold compile
cache every new pod of the chart has (an emptyDir) and with a warm one
(what a restarted container finds in the same pod), for the chart's
example modules and for the 12 MB JavaScript example. The figures go to
target/test-artifacts/startup.json for docs/deploy.md ("Autoscaling"); the
test asserts only what makes them mean something: the cold start compiled
every module, the warm one compiled none and loaded each from the cache,
and the cache is where the chart's emptyDir is."""
import json
import os
import shutil
import statistics
import subprocess
import time
import tomllib
import urllib.request

import pytest

from test_chart import BERTH_BIN, CHART, TARGET, find, free_port, render

WASM = os.path.join(TARGET, "wasm32-wasip2", "release")
ARTIFACTS = os.path.join(TARGET, "test-artifacts")
WARM_RUNS = 3


def start(config, modules, cache, log_path, **extra_env):
    """Seconds from spawning berth to its first 200 from /ready, and the
    log events up to it."""
    port, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
    env.update(BERTH_RUNTIME__MODULES_DIR=str(modules), BERTH_RUNTIME__CACHE_DIR=str(cache),
               LOG_FORMAT="json", LOG_LEVEL="info", BERTH_SHUTDOWN__DRAIN_DELAY="0s", **extra_env)
    with open(log_path, "w") as log:
        began = time.monotonic()
        proc = subprocess.Popen([BERTH_BIN, "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}",
                                 "--admin-listen", f"127.0.0.1:{admin}"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = began + 120
            while True:
                assert proc.poll() is None, open(log_path).read()
                assert time.monotonic() < deadline, "berth never became ready"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                time.sleep(0.005)
            elapsed = time.monotonic() - began
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    events = [json.loads(line) for line in open(log_path) if line.startswith("{")]
    return elapsed, events


def loaded(events, message):
    return sorted({e["module"] for e in events if e.get("message") == message})


@pytest.mark.parametrize("name, values, files", [
    ("chart-examples", [], []),
    ("js-hello", ["--set", "modules.hello=null", "--set", "modules.api=null",
                  "--set", "modules.js.file=js-hello.wasm", "--set", "modules.js.route=/js"], ["js-hello.wasm"]),
])
def test_a_new_pod_starts_cold_a_restarted_one_warm(name, values, files, tmp_path):
    docs = render(*values)
    config_text = find(docs, "ConfigMap", "-config")["data"]["berth.toml"]
    # The chart keeps the cache on the pod's emptyDir: new pods start cold.
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    cache_volume = next(v for v in pod["volumes"] if v["name"] == "cache")
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "cache")
    assert "emptyDir" in cache_volume
    cache_dir = tomllib.loads(config_text)["runtime"]["cache_dir"]
    assert cache_dir.startswith(mount["mountPath"] + "/"), (cache_dir, mount)
    config = tmp_path / "berth.toml"
    config.write_text(config_text)
    modules = tmp_path / "modules"
    shutil.copytree(os.path.join(CHART, "modules"), modules)
    for f in files:
        source = os.path.join(WASM, f)
        if not os.path.isfile(source):
            pytest.skip(f"{source} is missing: run `make guests`")
        shutil.copy(source, modules)
    names = sorted(tomllib.loads(config_text)["modules"])
    cache = tmp_path / "cache" / "compiled"

    cold, events = start(config, modules, cache, tmp_path / "cold.log")
    assert loaded(events, "compiling") == names
    warm = []
    for i in range(WARM_RUNS):
        seconds, events = start(config, modules, cache, tmp_path / f"warm{i}.log")
        assert loaded(events, "loaded from the compile cache") == names and not loaded(events, "compiling")
        warm.append(seconds)

    files = {m["file"] for m in tomllib.loads(config_text)["modules"].values()}
    sizes = {f: os.path.getsize(os.path.join(modules, f)) for f in sorted(files)}
    record(name, {"modules": names, "bytes": sizes, "cold_seconds": round(cold, 3),
                  "warm_seconds": round(statistics.median(warm), 3), "warm_runs": [round(w, 3) for w in warm]})


def record(name, figures_of_name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, "startup.json")
    figures = json.load(open(path)) if os.path.exists(path) else {}
    figures[name] = figures_of_name
    with open(path, "w") as f:
        json.dump(figures, f, indent=2)


def test_a_new_pod_of_an_image_with_a_prebuilt_folder_compiles_nothing(tmp_path):
    """The chart's `compiled` values, and the image build docs/deploy.md
    describes: `berth compile` with the pods' own config writes the folder
    (root's, read-only); a new pod with an empty cache then loads every
    module from it."""
    docs = render("--set", "compiled.prebuiltDir=/opt/berth/prebuilt", "--set", "compiled.target=portable")
    config_text = find(docs, "ConfigMap", "-config")["data"]["berth.toml"]
    runtime = tomllib.loads(config_text)["runtime"]
    assert (runtime["prebuilt_dir"], runtime["compile_target"]) == ("/opt/berth/prebuilt", "portable")
    assert "prebuilt_dir" not in tomllib.loads(find(render(), "ConfigMap", "-config")["data"]["berth.toml"])["runtime"]
    config = tmp_path / "berth.toml"
    config.write_text(config_text)
    modules = tmp_path / "modules"
    shutil.copytree(os.path.join(CHART, "modules"), modules)
    prebuilt = tmp_path / "image" / "prebuilt"
    env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
    env["BERTH_RUNTIME__MODULES_DIR"] = str(modules)
    made = subprocess.run([BERTH_BIN, "compile", "--config", str(config), "--out", str(prebuilt)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr
    os.chmod(prebuilt, 0o555)
    names = sorted(tomllib.loads(config_text)["modules"])
    seconds, events = start(config, modules, tmp_path / "cache" / "compiled", tmp_path / "prebuilt.log",
                            BERTH_RUNTIME__PREBUILT_DIR=str(prebuilt))
    assert loaded(events, "loaded from the prebuilt folder") == names
    assert not loaded(events, "compiling"), events
    record("chart-examples-prebuilt", {"modules": names, "prebuilt_seconds": round(seconds, 3)})
