#!/usr/bin/env python3
"""Checks that the host's modules form one-way layers.

Each top-level module of host/src has a rank (LAYERS below); a module may
import only from modules of a lower rank. Inside a module, no two files may
import each other, directly or round a longer circle. Test code (`mod
tests`, tests.rs) is left out: tests may reach anywhere.

A short script rather than cargo-modules or cargo-cycles: those build
rust-analyzer (many minutes on two cores) to answer a question the `use`
paths answer. Paths are read with a regex, which is enough because the
crate spells every import as `crate::`, `super::` or `self::`.

Exit code 1 and one line per problem if the layers are broken.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "host", "src")

# Lower ranks are lower layers. A new top-level module must be placed here.
LAYERS = {
    "redact": 0,
    "scaffold": 0,
    "signal": 0,
    "telemetry": 0,
    "config": 1,
    "metrics": 1,
    "trace": 1,
    "outbound": 2,
    "registry": 2,
    "runtime": 3,
    "canary": 4,
    "router": 5,
    "reload": 6,
    "server": 7,
    "admin": 7,
    "app": 8,
    # `berth dev`: drives a `berth serve` child through its admin port.
    "dev": 9,
    # Helpers of the in-process tests (`#[cfg(test)]`): may use anything,
    # and only test code may use them.
    "testing": 10,
}

PATH = re.compile(r"\b(crate|super|self)((?:::[a-z_][a-z0-9_]*)*)(?:::\{([^}]*)\})?")


def modules():
    """Module path (tuple) -> file, for every non-test file module."""
    found = {}
    for dirpath, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".rs") or f in ("lib.rs", "main.rs", "tests.rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), SRC)[:-3]
            found[tuple(rel.split(os.sep))] = os.path.join(dirpath, f)
    return found


def strip_tests(text):
    """Drops `#[cfg(test)] mod tests { ... }` (kept last by convention)."""
    m = re.search(r"^#\[cfg\(test\)\]\s*\nmod tests \{", text, re.M)
    return text[: m.start()] if m else text


def resolve(path, known):
    """The deepest known module a path names."""
    while path and path not in known:
        path = path[:-1]
    return path


def imports(module, text, known):
    targets = set()
    for m in PATH.finditer(strip_tests(text)):
        kind, rest, group = m.group(1), m.group(2), m.group(3)
        segs = [s for s in rest.split("::") if s]
        if kind == "crate":
            base = ()
        elif kind == "self":
            base = module
        else:
            base = module[:-1]
        heads = [segs]
        if group is not None:
            # `super::{a, link::B}`: each member names its own path.
            heads = [segs + [p.strip() for p in member.split("::")] for member in group.split(",") if member.strip()]
        for h in heads:
            target = resolve(tuple(base) + tuple(h), known)
            if target and target != module:
                targets.add(target)
    return targets


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def check(src_modules):
    problems = []
    graph = {}
    for module, file in sorted(src_modules.items()):
        top = module[0]
        if top not in LAYERS:
            problems.append(f"{'/'.join(module)}: `{top}` has no layer in scripts/check_layers.py")
            continue
        with open(file) as fh:
            text = fh.read()
        for target in sorted(imports(module, text, src_modules)):
            # A parent declares and re-exports its children: containment,
            # not an import.
            if target[: len(module)] == module:
                continue
            graph.setdefault(module, set()).add(target)
            if target[0] != top and target[0] in LAYERS and LAYERS[target[0]] >= LAYERS[top]:
                problems.append(
                    f"{'/'.join(module)} imports {'::'.join(target)}: `{top}` (layer {LAYERS[top]}) "
                    f"may only import lower layers, and `{target[0]}` is layer {LAYERS[target[0]]}"
                )
    for comp in cycles(graph):
        problems.append("import circle: " + " <-> ".join("::".join(m) for m in comp))
    return problems


def main():
    problems = check(modules())
    for p in problems:
        print(f"check_layers: {p}")
    if problems:
        return 1
    print(f"check_layers: {len(modules())} modules in {len(set(LAYERS.values()))} layers, no import goes up or round")
    return 0


if __name__ == "__main__":
    sys.exit(main())
