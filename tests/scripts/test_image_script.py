"""`make image` drives the engine it finds, as documented: checked with
stand-in engines on PATH that record how they were called (no engine runs
here), and refused with a clear message when there is none."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "image.sh")


def stand_in(bin_dir, name, log):
    path = bin_dir / name
    path.write_text(
        "#!/bin/sh\n"
        f'echo "{name} $*" >> {log}\n'
        'case "$*" in *--digestfile*) f=$(echo "$*" | sed "s/.*--digestfile \\([^ ]*\\).*/\\1/"); '
        'echo sha256:abc > "$f";; esac\n'
        'case "$1 $2" in "image inspect") echo "reg.example/b@sha256:def";; esac\n'
    )
    path.chmod(0o755)


def run(bin_dir, env):
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env={**base, **env}, cwd=ROOT)


def test_no_engine_is_an_error_that_says_what_to_do(tmp_path):
    out = run(tmp_path, {})
    assert out.returncode == 2
    assert "docker, podman or buildah" in out.stderr and "image-check" in out.stderr


def test_the_first_engine_builds_the_dockerfile_and_a_push_prints_the_digest_to_pin(tmp_path):
    log = tmp_path / "calls"
    for engine in ("podman", "buildah"):
        stand_in(tmp_path, engine, log)
    out = run(tmp_path, {"IMAGE": "reg.example/team/berth:0.1.0", "PUSH": "1"})
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "podman build -f Dockerfile -t reg.example/team/berth:0.1.0 ."
    assert calls[1].startswith("podman push --digestfile ")
    assert "--set image.digest=sha256:abc" in out.stdout
    assert "--set image.repository=reg.example/team/berth" in out.stdout
    # buildah builds with `bud`; docker reads the digest back.
    log.unlink()
    out = run(tmp_path, {"ENGINE": "buildah"})
    assert log.read_text().splitlines() == ["buildah bud -f Dockerfile -t berth:dev ."]
    stand_in(tmp_path, "docker", log)
    log.unlink()
    out = run(tmp_path, {"IMAGE": "reg.example/b:1", "PUSH": "1"})
    assert "--set image.digest=sha256:def" in out.stdout, out.stdout + out.stderr
    assert "docker push reg.example/b:1" in log.read_text().splitlines()
