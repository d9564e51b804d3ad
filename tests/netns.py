"""Helpers for tests that run airlock's domains as separate hosts on one machine.

- `netns_unavailable()`: why network namespaces cannot be made here (or None).
- `Hosts`: network namespaces joined by veth pairs -- the test's own hosts,
  with addresses that exist only inside them -- torn down with everything
  still running in them.
- `ensure_user()`: a system user for one domain.
- `RuntimeView`: lets those users run *this* interpreter and *this* airlock.
  A venv's interpreter often lives under a directory other users cannot
  traverse (pyenv in /root, mode 0700; the interpreter's RUNPATH points
  there too).  Each unprivileged process therefore starts in a private mount
  namespace where every such blocking directory is covered by a small tmpfs
  (mode 0755) into which exactly the needed trees are bind-mounted at their
  own paths.  Nothing outside that process's mount namespace changes, so
  there is nothing to undo, and the rest of /root stays invisible.
- `Proc`: a process started with one of the above, stopped by its PID.

Every process is stopped by PID: `ip netns exec`, `unshare` (without
--fork), `sh -c 'exec ...'` and `setpriv` all exec, so the PID Popen returns
is the airlock process itself.
"""
from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

IP_TIMEOUT_S = 10.0          # one `ip` command
STOP_TIMEOUT_S = 15.0        # SIGTERM -> exit, then SIGKILL
STAGE_NAME = ".runtime-stage"


def _run(*argv: str, check: bool = True, timeout: float = IP_TIMEOUT_S) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def netns_unavailable() -> str | None:
    """A reason why this process cannot create network namespaces, or None."""
    if os.geteuid() != 0:
        return "creating network namespaces and users needs root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"airlock-probe-{os.getpid()}"
    r = _run("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` is not permitted here: {r.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


# ---------------------------------------------------------------------- hosts
class Hosts:
    """Named network namespaces (hosts) and veth links between them.

    `add_host("vault")` creates namespace `<prefix>-vault`; `link("gw",
    "10.231.0.1/30", "vault", "10.231.0.2/30")` joins two hosts with a veth
    pair.  Namespaces get only the routes of their own links: no default
    route, no forwarding (a new namespace starts with ip_forward=0).
    """

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix or f"al{os.getpid()}"
        self.names: dict[str, str] = {}
        self._links = 0

    def add_host(self, host: str) -> str:
        ns = f"{self.prefix}-{host}"
        _run("ip", "netns", "add", ns)
        self.names[host] = ns
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def link(self, a: str, addr_a: str, b: str, addr_b: str) -> None:
        self._links += 1
        # veth names: at most 15 bytes, unique per run (the pid) and per link
        ia, ib = f"v{os.getpid()}{self._links}a", f"v{os.getpid()}{self._links}b"
        na, nb = self.names[a], self.names[b]
        _run("ip", "link", "add", ia, "netns", na, "type", "veth", "peer", "name", ib, "netns", nb)
        for ns, dev, addr in ((na, ia, addr_a), (nb, ib, addr_b)):
            _run("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.names[host]]

    def pids(self, host: str) -> list[int]:
        r = _run("ip", "netns", "pids", self.names[host], check=False)
        return [int(p) for p in r.stdout.split() if p.isdigit()]

    def destroy(self) -> list[str]:
        """Kill what still runs in the namespaces (by PID), delete them (and their veths).

        Returns a description of anything that had to be killed."""
        killed = []
        for host, ns in self.names.items():
            for pid in self.pids(host):
                try:
                    killed.append(f"{host}: pid {pid} {Path(f'/proc/{pid}/cmdline').read_bytes()[:120]!r}")
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, FileNotFoundError):
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while any(self.pids(h) for h in self.names) and time.monotonic() < deadline:
            time.sleep(0.05)
        for ns in self.names.values():
            _run("ip", "netns", "del", ns, check=False)
        self.names.clear()
        return killed


# ---------------------------------------------------------------------- users
def ensure_user(name: str) -> pwd.struct_passwd:
    """The system user `name`, created (no home, no login shell) if missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    nologin = shutil.which("nologin") or "/usr/sbin/nologin"
    r = _run("useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", nologin, name, check=False, timeout=30)
    if r.returncode not in (0, 9):       # 9: created meanwhile by a concurrent run
        raise RuntimeError(f"useradd {name} failed ({r.returncode}): {r.stderr.strip()}")
    return pwd.getpwnam(name)


def as_user_can(user: str, test_flag: str, path: str | os.PathLike) -> bool:
    """Whether `user` passes `test -<flag> path` (-r, -w, -x), asked as that user."""
    r = subprocess.run(["runuser", "-u", user, "--", "test", test_flag, str(path)],
                       capture_output=True, timeout=IP_TIMEOUT_S)
    return r.returncode == 0


# ---------------------------------------------------------------------- runtime view
def _world_traversable(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & stat.S_IXOTH)
    except OSError:
        return False


def _topmost_blocked_ancestor(path: str) -> str | None:
    parts = Path(path).parts
    for i in range(1, len(parts)):          # strict ancestors, "/" first
        ancestor = str(Path(*parts[:i]))
        if not _world_traversable(ancestor):
            return ancestor
    return None


class RuntimeView:
    """Make the running interpreter, its venv and airlock's source usable by other users.

    `stage_dir` must be a world-traversable directory outside every blocking
    directory (e.g. the test's scratch directory); empty mount points are
    created in it.
    """

    def __init__(self, stage_dir: Path, extra_paths: list[str] = ()):
        import airlock
        self.src = str(Path(airlock.__file__).resolve().parent.parent)   # the dir airlock is imported from
        # the interpreter (and its libpython), the venv, airlock's source -- nothing else
        wanted = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                os.path.dirname(os.path.realpath(sys.executable)), self.src,
                                                *extra_paths)}
        for tree in wanted:
            mode = os.stat(tree).st_mode
            if (mode & (stat.S_IROTH | stat.S_IXOTH)) != (stat.S_IROTH | stat.S_IXOTH):
                raise RuntimeError(f"{tree} (mode {mode & 0o777:o}) is not readable by other users; "
                                   f"the domains' users need it to run airlock")
        # keep only the outermost of nested trees
        trees = sorted(wanted)
        trees = [t for t in trees if not any(t != o and t.startswith(o.rstrip("/") + "/") for o in trees)]
        self.groups: dict[str, list[str]] = {}
        for t in trees:
            blocked = _topmost_blocked_ancestor(t)
            if blocked is not None:
                self.groups.setdefault(blocked, []).append(t)
        self.stage = Path(stage_dir) / STAGE_NAME
        for blocked in self.groups:
            if str(self.stage).startswith(blocked.rstrip("/") + "/"):
                raise RuntimeError(f"stage dir {self.stage} lies under {blocked}, which other users cannot traverse")
        self.stage.mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.stage, 0o755)
        self._script = self._mount_script()

    def _mount_script(self) -> str:
        lines = ["set -e"]
        n = 0
        for blocked, trees in self.groups.items():
            staged = []
            for t in trees:
                point = self.stage / str(n)
                n += 1
                point.mkdir(exist_ok=True)
                lines.append(f"mount --bind {shlex.quote(t)} {shlex.quote(str(point))}")
                staged.append((t, point))
            lines.append(f"mount -t tmpfs -o mode=0755,size=1m airlock-view {shlex.quote(blocked)}")
            for t, point in staged:
                lines.append(f"mkdir -p {shlex.quote(t)}")
                lines.append(f"mount --bind {shlex.quote(str(point))} {shlex.quote(t)}")
        return "\n".join(lines)

    def command(self, user: str, argv: list[str]) -> list[str]:
        """argv run as `user` in a private mount namespace with this view (prefix with `ip netns exec NS`)."""
        pw = pwd.getpwnam(user)
        script = (self._script + "\n" +
                  f'exec setpriv --reuid={pw.pw_uid} --regid={pw.pw_gid} --init-groups -- "$@"')
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *argv]

    def env(self, home: str, **extra: str) -> dict[str, str]:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": home, "LANG": "C.UTF-8", "PYTHONPATH": self.src,
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
        for key in ("AIRLOCK_NO_EXTENSIONS",):
            if key in os.environ:
                env[key] = os.environ[key]
        env.update(extra)
        return env


# ---------------------------------------------------------------------- processes
class Proc:
    """A long-running process with its output in a log file; stop() is by PID."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: str, log_path: Path):
        self.name, self.argv, self.env, self.cwd, self.log_path = name, argv, env, cwd, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Proc":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float, start_at: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text()[start_at:]:
                return
            if not self.running():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode if self.proc else '-'}) "
                                   f"before logging {text!r}:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not log {text!r} within {timeout:g}s:\n{self.log_text()[-3000:]}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        rc = self.proc.returncode
        self.proc = None
        return rc
