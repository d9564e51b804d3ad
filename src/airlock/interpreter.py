"""How airlock starts another process of its own (a gateway worker; the vault
and gateway of `airlock up`): the same interpreter, importing the same
airlock package as this process.

`python -m airlock...` puts the current directory first on sys.path, so a
child started from a directory that holds another `airlock/` (a source
checkout of another release, say) would import that code, not ours.  The
child is started with `-P` (Python 3.11: nothing is prepended to sys.path)
and the directory holding this process's `airlock` package first on
PYTHONPATH, before any PYTHONPATH already set -- unless that directory is
site-packages, where the child looks anyway (a source tree or an editable
install's `src/` holds airlock alone; site-packages holds everything, and
on PYTHONPATH it would come before the standard library).
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


def _in_site_packages(path: str) -> bool:
    """Is `path` one of this interpreter's site-packages directories?  A
    child started with -P finds a package installed there by itself; put on
    PYTHONPATH, that directory would come before the standard library, and
    whatever else it holds could shadow a standard module."""
    import site
    try:
        sites = site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:          # a virtualenv's old site.py lacks them: be explicit then
        return False
    real = os.path.realpath(path)
    return any(os.path.realpath(s) == real for s in sites)


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's environment) with PACKAGE_ROOT first on
    PYTHONPATH -- unless it is a site-packages directory, which the child
    searches anyway (after the standard library, where it belongs)."""
    env = dict(os.environ if env is None else env)
    if _in_site_packages(PACKAGE_ROOT):
        return env
    rest = env.get("PYTHONPATH")
    env["PYTHONPATH"] = PACKAGE_ROOT + (os.pathsep + rest if rest else "")
    return env
