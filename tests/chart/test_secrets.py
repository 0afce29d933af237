"""Chart secrets reach the guest under the key as written: the Secret is
one TOML file that berth reads with --secrets-file (an environment
variable's name cannot carry `apiKey`'s case), acted out with the real
host on the rendered config."""
import os
import shutil

from test_chart import CHART, TARGET, find, render, serve_rendered

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
    log = serve_rendered(
        tmp_path,
        ["-f", str(values)],
        "/cfg/config",
        {"apiKey": 's3cr3t "quoted" \\ value', "PIN": "0042"},
        env={"BERTH_RUNTIME__MODULES_DIR": str(modules), "BERTH_SECRETS_FILE": str(secrets)},
    )
    assert "s3cr3t" not in "".join(log)
