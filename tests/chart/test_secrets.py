"""Chart secrets reach the guest under the key as written: the Secret is
one TOML file that berth reads with --secrets-file (an environment
variable's name cannot carry `apiKey`'s case), acted out with the real
host on the rendered config."""
import json
import os
import shutil
import signal
import subprocess
import urllib.request

import yaml

from test_chart import BERTH_BIN, CHART, TARGET, find, render

WASM = os.path.join(TARGET, "wasm32-wasip2", "release")


def test_secrets_keep_their_case_and_their_text_in_the_guest(tmp_path):
    values = tmp_path / "values.yaml"
    # Quoted in YAML, as values must be: 0042 unquoted is the number 42.
    values.write_text(
        "modules:\n  cfg:\n    file: misbehave.wasm\n    route: /cfg\n"
        "secrets:\n  cfg:\n    apiKey: \"s3cr3t \\\"quoted\\\" \\\\ value\"\n    PIN: \"0042\"\n"
    )
    docs = render("-f", str(values))
    secret = find(docs, "Secret", "-secrets")
    assert list(secret["stringData"]) == ["secrets.toml"]
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "module-secrets")
    volume = next(v for v in pod["volumes"] if v["name"] == "module-secrets")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert env["BERTH_SECRETS_FILE"] == os.path.join(mount["mountPath"], "secrets.toml")
    assert not any(k.startswith("BERTH_MODULES__") for k in env)

    # Where the kubelet would mount them: the Secret's file, the modules.
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(secret["stringData"]["secrets.toml"])
    modules = tmp_path / "modules"
    shutil.copytree(os.path.join(CHART, "modules"), modules)
    shutil.copy(os.path.join(WASM, "misbehave.wasm"), modules)
    config = tmp_path / "berth.toml"
    config.write_text(find(docs, "ConfigMap", "-config")["data"]["berth.toml"])
    env = {
        **os.environ,
        "BERTH_RUNTIME__MODULES_DIR": str(modules),
        "BERTH_RUNTIME__CACHE_DIR": "",
        "BERTH_SECRETS_FILE": str(secrets),
        "LOG_FORMAT": "json",
        "BERTH_SHUTDOWN__DRAIN_DELAY": "0s",
    }
    env.pop("RUST_LOG", None)
    proc = subprocess.Popen(
        [BERTH_BIN, "--config", str(config), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        addrs, log = {}, []
        for line in proc.stdout:
            log.append(line)
            event = json.loads(line)
            if event.get("message") == "listening":
                addrs[event["listener"]] = event["addr"]
            if event.get("message") == "ready":
                break
        else:
            raise AssertionError(f"berth exited with {proc.wait()}: {''.join(log)}")
        seen = json.load(urllib.request.urlopen(f"http://{addrs['traffic']}/cfg/config", timeout=10))
        assert seen["apiKey"] == 's3cr3t "quoted" \\ value'
        assert seen["PIN"] == "0042"
        assert "s3cr3t" not in "".join(log)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
