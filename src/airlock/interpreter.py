"""How airlock starts another process of its own (a gateway worker; the vault
and gateway of `airlock up`): the same interpreter, importing the same
airlock package as this process.

`python -m airlock...` puts the current directory first on sys.path, so a
child started from a directory that holds another `airlock/` (a source
checkout of another release, say) would import that code, not ours.  The
child is started with `-P` (Python 3.11: nothing is prepended to sys.path)
and the directory holding this process's `airlock` package first on
PYTHONPATH, before any PYTHONPATH already set.
"""
from __future__ import annotations

import os
import sys

import airlock

# the directory that holds the `airlock` package this process imported
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(airlock.__file__)))


def module_command(module: str) -> list[str]:
    """argv that runs `module` (python -m) in this interpreter; pair with child_env()."""
    return [sys.executable, "-P", "-m", module]


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's environment) with PACKAGE_ROOT first on PYTHONPATH."""
    env = dict(os.environ if env is None else env)
    rest = env.get("PYTHONPATH")
    env["PYTHONPATH"] = PACKAGE_ROOT + (os.pathsep + rest if rest else "")
    return env
