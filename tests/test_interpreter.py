"""How airlock starts its own child processes (airlock/interpreter.py): the
leader's package, and nothing put ahead of the standard library."""
from __future__ import annotations

import os
import site
import subprocess

from airlock import interpreter


def test_a_source_tree_holding_airlock_goes_first_on_the_childs_path_before_what_was_set(tmp_path, monkeypatch):
    monkeypatch.setattr(interpreter, "PACKAGE_ROOT", str(tmp_path))
    env = interpreter.child_env({"PYTHONPATH": "/somewhere/else"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), "/somewhere/else"]


def test_an_airlock_installed_in_site_packages_is_not_put_before_the_standard_library(monkeypatch):
    monkeypatch.setattr(interpreter, "PACKAGE_ROOT", site.getsitepackages()[0])
    assert "PYTHONPATH" not in interpreter.child_env({"PATH": os.environ["PATH"]})
    assert interpreter.child_env({"PYTHONPATH": "/x"})["PYTHONPATH"] == "/x"


def test_a_child_started_from_a_directory_with_another_airlock_imports_this_one(tmp_path):
    (tmp_path / "airlock").mkdir()
    (tmp_path / "airlock" / "__init__.py").write_text("raise ImportError('not this one')\n")
    out = subprocess.run(interpreter.module_command("airlock.interpreter")[:-2]
                         + ["-c", "import airlock, os; print(os.path.dirname(os.path.dirname(airlock.__file__)))"],
                         cwd=tmp_path, env=interpreter.child_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert os.path.realpath(out.stdout.strip()) == os.path.realpath(interpreter.PACKAGE_ROOT)
