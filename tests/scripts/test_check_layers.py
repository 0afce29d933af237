"""scripts/check_layers.py finds imports that go up a layer or round a
circle, and passes the host as it is."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import check_layers  # noqa: E402


def tree(tmp_path, files):
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    check_layers.SRC = str(tmp_path)
    try:
        return check_layers.check(check_layers.modules())
    finally:
        check_layers.SRC = os.path.join(ROOT, "host", "src")


def test_the_host_has_no_upward_import_and_no_circle():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "check_layers.py")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_an_import_of_a_higher_layer_is_reported(tmp_path):
    problems = tree(tmp_path, {
        "config.rs": "use crate::outbound::Clients;\n",
        "outbound.rs": "use crate::config::OutboundConfig;\n",
    })
    assert any(p.startswith("config imports outbound") for p in problems), problems
    assert "import circle: config <-> outbound" in problems


def test_siblings_importing_each_other_are_a_circle_even_through_braces(tmp_path):
    problems = tree(tmp_path, {
        "runtime.rs": "mod check;\nmod module;\npub use check::Report;\n",
        "runtime/check.rs": "use super::module::compile;\n",
        "runtime/module.rs": "use super::{Host, check::Unsatisfied};\n",
    })
    assert problems == ["import circle: runtime::check <-> runtime::module"]


def test_test_code_and_parents_naming_children_are_not_imports(tmp_path):
    problems = tree(tmp_path, {
        "runtime.rs": "mod module;\npub use self::module::Module;\n",
        "runtime/module.rs": "use super::Runtime;\n\n#[cfg(test)]\nmod tests {\n    use crate::app::X;\n}\n",
        "app.rs": "use crate::runtime::Runtime;\n",
    })
    assert problems == []


def test_a_module_without_a_layer_is_reported(tmp_path):
    problems = tree(tmp_path, {"rollout.rs": "use crate::router::Router;\n"})
    assert problems == ["rollout: `rollout` has no layer in scripts/check_layers.py"]
