"""A container engine's part, emulated without one.

There is no Docker engine on the build machines, so the image is proven by
doing what an engine does, step by step:

- the build context is the files `.dockerignore` lets through (matched by
  docker-py's port of moby's pattern matcher, not by a glob of our own);
- each stage starts empty; `COPY` takes only what it names from the
  context (or from an earlier stage with `--from`), and a missing source
  fails the build, as it does under `docker build`;
- the builder's `RUN` runs in that stage's folder with the stage's `ENV`,
  with the host's Rust toolchain standing in for the `rust:` base image
  (the versions must match);
- the runtime stage is a distroless-like root: the copied files, the shared
  libraries they link, CA certificates and the `nonroot` user;
- a container runs in its own mount namespace: its root is bind-mounted
  read-only when asked, volumes are bind-mounted over it, and the
  entrypoint runs chrooted as the image's (or the pod's) user.

Two liberties, both stated where they are taken: the builder's `target/`
is the shared cargo target folder (a cache mount, as BuildKit's
`--mount=type=cache` would give), and absolute paths a later stage copies
from (`/out`) live under the builder stage's own folder.
"""
import json
import os
import re
import shlex
import shutil
import subprocess

from docker.utils.build import exclude_paths
from dockerfile_parse import DockerfileParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))


class BuildError(Exception):
    """The image would not build; the message says which step and why."""


def dockerignore_patterns(root):
    """The patterns of `root/.dockerignore`, read as docker-py's build does."""
    path = os.path.join(root, ".dockerignore")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [l.strip() for l in f.read().splitlines() if l.strip() and not l.strip().startswith("#")]


def build_context(root, dest):
    """Copies the files `.dockerignore` lets through into `dest`; returns
    their paths, relative to `root`."""
    included = exclude_paths(root, dockerignore_patterns(root), dockerfile="Dockerfile")
    files = set()
    for rel in sorted(included):
        src = os.path.join(root, rel)
        out = os.path.join(dest, rel)
        if os.path.islink(src):
            os.makedirs(os.path.dirname(out), exist_ok=True)
            os.symlink(os.readlink(src), out)
            files.add(rel)
        elif os.path.isdir(src):
            os.makedirs(out, exist_ok=True)
        elif os.path.isfile(src):
            os.makedirs(os.path.dirname(out), exist_ok=True)
            shutil.copy2(src, out)
            files.add(rel)
    return files


def stages(dockerfile):
    """The Dockerfile's stages: base image, name and instructions."""
    parser = DockerfileParser(dockerfile)
    out = []
    for ins in parser.structure:
        op, value = ins["instruction"], ins["value"]
        if op == "COMMENT":
            continue
        if op == "FROM":
            words = value.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            out.append({"from": words[0], "name": name, "steps": []})
        else:
            out[-1]["steps"].append((op, value))
    return out


def _copy(src, dst):
    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)


def _exec_form(value):
    value = value.strip()
    return json.loads(value) if value.startswith("[") else ["/bin/sh", "-c", value]


class Image:
    """The result of a build: a root folder plus the runtime stage's
    settings."""

    def __init__(self, base, rootfs, env, entrypoint, cmd, user, workdir):
        self.base, self.rootfs, self.env, self.entrypoint, self.cmd = base, rootfs, env, entrypoint, cmd
        self.user, self.workdir = user, workdir


def rust_image_version(base):
    """`1.97` of `rust:1.97-slim-bookworm`."""
    m = re.match(r"rust:(\d+\.\d+)", base)
    return m.group(1) if m else None


def check_toolchain(base):
    want = rust_image_version(base)
    if not want:
        raise BuildError(f"FROM {base}: only rust:<version> builder images can be emulated")
    have = subprocess.run(["rustc", "--version"], capture_output=True, text=True, check=True).stdout
    if not have.startswith(f"rustc {want}."):
        raise BuildError(f"FROM {base}: the emulating toolchain is {have.strip()}, not {want}")


def build(root, workdir, prebuilt=None, log=print):
    """Builds the Dockerfile of `root` in `workdir`. With `prebuilt`
    (builder path -> local file) the builder's RUN is skipped and those
    files stand in for its outputs: for tests that need the runtime
    stage's layout with a binary built another way."""
    context = os.path.join(workdir, "context")
    os.makedirs(context)
    files = build_context(root, context)
    log(f"container: build context of {len(files)} files")
    built = {}
    image = None
    all_stages = stages(os.path.join(root, "Dockerfile"))
    # Absolute paths later stages copy from an earlier one.
    exported = {}
    for st in all_stages:
        for op, value in st["steps"]:
            if op == "COPY" and value.startswith("--from="):
                words = shlex.split(value)
                exported.setdefault(words[0].split("=", 1)[1], []).extend(words[1:-1])
    for index, st in enumerate(all_stages):
        fs = os.path.join(workdir, f"stage{index}")
        os.makedirs(fs)
        env, cwd, user = {}, "/", "0"
        entrypoint, cmd = None, None
        is_builder = st["from"].startswith("rust:")
        if is_builder:
            check_toolchain(st["from"])
        for op, value in st["steps"]:
            if op == "WORKDIR":
                cwd = os.path.join(cwd, value)
                os.makedirs(fs + cwd, exist_ok=True)
            elif op == "ENV":
                for pair in shlex.split(value):
                    k, _, v = pair.partition("=")
                    env[k] = v
            elif op == "COPY":
                words = shlex.split(value)
                source_fs = context
                if words[0].startswith("--from="):
                    source_fs = built[words[0].split("=", 1)[1]]
                    words = words[1:]
                *srcs, dest = words
                dest_abs = dest if dest.startswith("/") else os.path.join(cwd, dest)
                for src in srcs:
                    path = os.path.join(source_fs, src.lstrip("/"))
                    if not os.path.lexists(path):
                        raise BuildError(f"COPY {src}: not in the build context (.dockerignore drops it?)")
                    target = dest_abs
                    if dest.endswith("/") or len(srcs) > 1:
                        target = os.path.join(dest_abs, os.path.basename(src.rstrip("/")))
                    _copy(path, fs + target)
            elif op == "RUN":
                if not is_builder:
                    raise BuildError(f"RUN in stage {index} ({st['from']}): only the builder may run commands")
                if prebuilt is not None:
                    for path, local in prebuilt.items():
                        _copy(local, fs + path)
                    continue
                _run_builder_step(value, fs, cwd, env, exported.get(st["name"] or str(index), []), log)
            elif op == "USER":
                user = value.strip()
            elif op == "ENTRYPOINT":
                entrypoint = _exec_form(value)
            elif op == "CMD":
                cmd = _exec_form(value)
            elif op in ("EXPOSE", "LABEL", "ARG"):
                pass
            else:
                raise BuildError(f"{op}: not emulated")
        built[st["name"] or str(index)] = fs
        built[str(index)] = fs
        if not is_builder:
            _distroless(fs, st["from"])
            image = Image(st["from"], fs, env, entrypoint, cmd, user, cwd)
    return image


def _run_builder_step(command, fs, cwd, env, exported, log):
    work = fs + cwd
    # The shared target folder stands in for a BuildKit cache mount.
    if not os.path.lexists(os.path.join(work, "target")):
        os.symlink(TARGET, os.path.join(work, "target"))
    for path in exported:
        command = re.sub(rf"(?<![\w/.]){re.escape(os.path.dirname(path))}(?=/)", fs + os.path.dirname(path), command)
    run_env = {k: os.environ[k] for k in ("PATH", "HOME", "CARGO_HOME", "RUSTUP_HOME", "RUSTUP_TOOLCHAIN") if k in os.environ}
    run_env.update(env)
    log(f"container: RUN {command}")
    proc = subprocess.run(["/bin/sh", "-c", command], cwd=work, env=run_env)
    if proc.returncode != 0:
        raise BuildError(f"RUN {command}: exit code {proc.returncode}")


DISTROLESS = re.compile(r"gcr\.io/distroless/cc-debian12:nonroot@sha256:[0-9a-f]{64}")


def _distroless(fs, base):
    """What gcr.io/distroless/cc-debian12:nonroot brings: glibc and
    libgcc (here: whatever the copied binaries link), CA certificates, and
    the users root and nonroot (65532). Only that image, pinned by digest:
    a tag alone could bring other bytes at every build."""
    if not DISTROLESS.fullmatch(base):
        raise BuildError(f"FROM {base}: only {DISTROLESS.pattern} is emulated (distroless/cc, "
                         "pinned by digest)")
    os.makedirs(os.path.join(fs, "etc/ssl/certs"), exist_ok=True)
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", os.path.join(fs, "etc/ssl/certs/ca-certificates.crt"))
    with open(os.path.join(fs, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")
    with open(os.path.join(fs, "etc/group"), "w") as f:
        f.write("root:x:0:\nnonroot:x:65532:\n")
    for d in ("tmp", "home/nonroot", "proc", "dev", "sys"):
        os.makedirs(os.path.join(fs, d), exist_ok=True)
    os.chmod(os.path.join(fs, "tmp"), 0o1777)
    os.chown(os.path.join(fs, "home/nonroot"), 65532, 65532)
    for dirpath, _, names in os.walk(fs):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and os.access(path, os.X_OK) and not os.path.islink(path):
                _copy_libraries(path, fs)


def _copy_libraries(binary, fs):
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            lib = m.group(1)
            dest = fs + lib
            if not os.path.exists(dest):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copy2(os.path.realpath(lib), dest)


def run(image, argv, env, mounts, user, read_only_root, netns=None, stdout=None):
    """Starts `argv` in a container of `image`: its own mount namespace,
    the root read-only when asked, `mounts` (host path, container path,
    read-only) bind-mounted over it, as `user` (`uid[:gid]`). The returned
    process is the container's entrypoint itself, so signals reach it."""
    fs = image.rootfs
    for source, target, _ in mounts:
        if os.path.isfile(source):
            # A file mounted over a file (the kubelet's /etc/hosts).
            os.makedirs(os.path.dirname(fs + target), exist_ok=True)
            if not os.path.exists(fs + target):
                open(fs + target, "w").close()
        else:
            os.makedirs(fs + target, exist_ok=True)
    script = ["set -e", "mount --make-rprivate /", f"mount --bind {shlex.quote(fs)} {shlex.quote(fs)}"]
    for source, target, ro in mounts:
        t = shlex.quote(fs + target)
        script.append(f"mount --bind {shlex.quote(source)} {t}")
        if ro:
            script.append(f"mount -o remount,bind,ro {t}")
    script.append(f"mount -t proc proc {shlex.quote(fs + '/proc')}")
    script.append(f"mount --rbind /sys {shlex.quote(fs + '/sys')}")
    for dev in ("null", "zero", "random", "urandom"):
        target = os.path.join(fs, "dev", dev)
        if not os.path.exists(target):
            open(target, "w").close()
        script.append(f"mount --bind /dev/{dev} {shlex.quote(target)}")
    if read_only_root:
        script.append(f"mount -o remount,bind,ro {shlex.quote(fs)}")
    uid, _, gid = str(user).partition(":")
    gid = gid or uid
    envs = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    script.append(
        f"exec env -i {envs} {shutil.which('chroot')} --userspec={uid}:{gid} --groups={gid} {shlex.quote(fs)} "
        + " ".join(shlex.quote(a) for a in argv)
    )
    cmd = ["unshare", "--mount", "--", "/bin/sh", "-c", "\n".join(script)]
    if netns:
        cmd = ["ip", "netns", "exec", netns] + cmd
    return subprocess.Popen(cmd, stdout=stdout, text=True)
