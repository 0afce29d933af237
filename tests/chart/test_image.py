"""The image build's emulation (scripts/container.py) follows Docker's
rules: `.dockerignore` as docker-py's port of moby's matcher reads it, and
`COPY` failing on what the context lacks. `make image-check` runs the real
build and the image as the chart's pod."""
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import container  # noqa: E402


def tree(root, files):
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def test_the_repository_context_holds_the_workspace_and_nothing_else(tmp_path):
    files = container.build_context(ROOT, str(tmp_path / "ctx"))
    # `berth new` embeds the templates (host/build.rs), their READMEs too.
    for needed in ["Cargo.toml", "Cargo.lock", "host/src/main.rs", "guest-sdk/Cargo.toml",
                   "bench/native-hello/Cargo.toml", "tests/e2e/main.rs", "Dockerfile",
                   "host/build.rs", "templates/rust/README.md", "guest-sdk/js/package.json",
                   "guest-sdk/python/berth/__init__.py"]:
        assert needed in files, needed
    for prefix in ["target/", ".git/", "charts/", "examples/", "tests/guests/", ".tools/", "bench/bench.py"]:
        assert not any(f.startswith(prefix) for f in files), prefix
    assert not any("node_modules/" in f or "__pycache__/" in f for f in files)
    assert not any(f.endswith(".wasm") for f in files)
    assert not any(f.endswith(".md") and not f.startswith("templates/") for f in files)


def test_dockerignore_follows_dockers_documented_rules(tmp_path):
    # docs.docker.com/build/concepts/context/#dockerignore-files: later
    # lines win, `!` re-includes, `**` matches any number of folders.
    tree(tmp_path, {
        ".dockerignore": "# comment\n*.md\n!README.md\n**/*.tmp\nbuild\n!build/keep\n",
        "README.md": "", "NOTES.md": "", "a/b/c.tmp": "", "a/b/c.rs": "",
        "build/out": "", "build/keep/x": "", "Dockerfile": "FROM scratch\n",
    })
    files = container.build_context(str(tmp_path), str(tmp_path / "ctx"))
    assert files == {"README.md", "a/b/c.rs", "build/keep/x", "Dockerfile", ".dockerignore"}


def test_copy_of_what_the_context_lacks_fails_the_build_naming_it(tmp_path):
    tree(tmp_path, {
        ".dockerignore": "secret\n",
        "Dockerfile": f"FROM {PINNED_BASE}\nCOPY secret /secret\n",
        "secret": "x",
    })
    with pytest.raises(container.BuildError, match="COPY secret"):
        container.build(str(tmp_path), str(tmp_path / "work"), log=lambda m: None)


PINNED_BASE = "gcr.io/distroless/cc-debian12:nonroot@sha256:" + "0" * 64


def runtime_base():
    """The last stage's base image, read from the Dockerfile itself."""
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        froms = [line.split()[1] for line in f if line.upper().startswith("FROM ")]
    return froms[-1]


def test_the_runtime_image_is_distroless_cc_nonroot_pinned_by_digest():
    assert re.fullmatch(r"gcr\.io/distroless/cc-debian12:nonroot@sha256:[0-9a-f]{64}", runtime_base())


@pytest.mark.parametrize("base", [
    "gcr.io/distroless/cc-debian12:nonroot",
    "gcr.io/distroless/cc-debian12:latest@sha256:" + "0" * 64,
    "gcr.io/distroless/static-debian12:nonroot@sha256:" + "0" * 64,
    "debian:bookworm-slim",
])
def test_the_emulator_refuses_any_other_or_unpinned_runtime_base(tmp_path, base):
    tree(tmp_path, {"Dockerfile": f"FROM {base}\nUSER 65532:65532\n"})
    with pytest.raises(container.BuildError, match="pinned by digest"):
        container.build(str(tmp_path), str(tmp_path / "work"), log=lambda m: None)


def test_the_runtime_stage_is_distroless_like_and_runs_as_nonroot(tmp_path):
    binary = os.environ.get("BERTH_BIN") or os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "berth")
    image = container.build(ROOT, str(tmp_path / "work"), prebuilt={"/out/berth": binary}, log=lambda m: None)
    # The image emulated is the one the Dockerfile pins, digest and all.
    assert image.base == runtime_base()
    assert image.user == "65532:65532"
    assert image.entrypoint == ["/usr/local/bin/berth"]
    assert os.path.isfile(os.path.join(image.rootfs, "usr/local/bin/berth"))
    assert "nonroot:x:65532" in open(os.path.join(image.rootfs, "etc/passwd")).read()
    # No shell: this proves the emulator's root folder only (the real
    # image's contents are the pinned digest's, checked above).
    assert not os.path.exists(os.path.join(image.rootfs, "bin/sh"))
    proc = container.run(image, ["/usr/local/bin/berth", "version"], {}, [], image.user, True,
                         stdout=__import__("subprocess").PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.startswith("berth ")
