"""One local Prefect API server shared by consecutive stage processes (issue 17 item 4).

Without ``PREFECT_API_URL`` every ``python -m flows.<stage>`` would start Prefect's own temporary
server (``prefect.server.api.server.SubprocessASGIServer``: a uvicorn subprocess, ~13 s on 2 cores)
and stop it when the process exits, so a ``dvc repro`` of 12 stages paid that start-up 12 times. Here
the first stage starts one server — the same app, settings and database (``$PREFECT_HOME``) as the
temporary one, with the UI off — in its own session, and every later stage finds and reuses it:

- ``$PREFECT_HOME/t2iedit-server/state.json`` names the running server (pid, port, API URL);
- a stage holds a *lease* (``leases/<pid>``) for its whole run; ``lock`` (``fcntl.flock``) orders
  starting, leasing and stopping, so a stage never reuses a server that is deciding to stop;
- the server stops itself once no live process holds a lease and none has been taken or released for
  ``idle_s`` seconds (``T2IEDIT_PREFECT_SERVER_IDLE``, default 120: longer than DVC's pause between
  two stages). A killed stage's lease dies with its pid; a killed server leaves a state file whose
  pid or health check fails, and the next stage starts a new one.

``T2IEDIT_PREFECT_SERVER=ephemeral`` restores Prefect's per-process temporary server. A server of your
own (``PREFECT_API_URL``, docs/PREFECT.md) always wins: this module is then never used.

    python -m flows.shared_server status     # the running shared server, if any
    python -m flows.shared_server stop       # stop it now
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

MODE_ENV, IDLE_ENV = "T2IEDIT_PREFECT_SERVER", "T2IEDIT_PREFECT_SERVER_IDLE"
DEFAULT_IDLE_S = 120.0
STARTUP_TIMEOUT_S = 120.0
#: What Prefect's own temporary server sets for its uvicorn process (server.py ``_run_uvicorn_command``).
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def prefect_home() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser()


def state_dir(home: Path | None = None) -> Path:
    return (home or prefect_home()) / "t2iedit-server"


def idle_seconds() -> float:
    raw = os.environ.get(IDLE_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_IDLE_S
    except ValueError:
        raise ValueError(f"{IDLE_ENV}={raw!r}: expected seconds (a number)") from None


def enabled() -> bool:
    mode = os.environ.get(MODE_ENV, "shared").strip().lower() or "shared"
    if mode not in ("shared", "ephemeral"):
        raise ValueError(f"{MODE_ENV}={mode!r}: expected shared or ephemeral")
    return mode == "shared"


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _read_state(d: Path) -> dict | None:
    try:
        st = json.loads((d / "state.json").read_text(encoding="utf-8"))
        return st if isinstance(st, dict) and {"pid", "url"} <= set(st) else None
    except (OSError, ValueError):
        return None


def _touch(d: Path) -> None:
    (d / "activity").write_text(f"{time.time()}\n", encoding="utf-8")


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(d: Path, idle_s: float) -> dict:
    """Start a server process (own session: DVC's or a terminal's Ctrl-C does not reach it) and wait
    until it answers; raises RuntimeError if it does not."""
    port = _free_port()
    log = open(d / "server.log", "ab")
    env = {**os.environ, **SERVER_ENV}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "flows.shared_server", "serve", "--port", str(port),
                             "--idle", str(idle_s), "--state-dir", str(d)],
                            cwd=Path(__file__).resolve().parents[1], env=env, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log, start_new_session=True)
    log.close()
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the shared Prefect server exited with code {proc.returncode} (see {d / 'server.log'})")
        if healthy(url, timeout=1.0):
            st = {"pid": proc.pid, "port": port, "url": url, "started": time.time()}
            tmp = d / "state.json.tmp"
            tmp.write_text(json.dumps(st), encoding="utf-8")
            os.replace(tmp, d / "state.json")
            return st
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"the shared Prefect server did not answer within {STARTUP_TIMEOUT_S:.0f} s (see {d / 'server.log'})")


def acquire(home: Path | None = None) -> str:
    """Lease the shared server for this process, starting it if none runs; returns its API URL."""
    d = state_dir(home)
    with _locked(d):
        (d / "leases").mkdir(exist_ok=True)
        (d / "leases" / str(os.getpid())).write_text("", encoding="utf-8")
        _touch(d)
        st = _read_state(d)
        if st is None or not _alive(int(st["pid"])) or not healthy(st["url"], timeout=10.0):
            st = _start(d, idle_seconds())
        return st["url"]


def release(home: Path | None = None) -> None:
    d = state_dir(home)
    with _locked(d):
        with contextlib.suppress(FileNotFoundError):
            (d / "leases" / str(os.getpid())).unlink()
        _touch(d)


@contextlib.contextmanager
def shared_api() -> Iterator[str | None]:
    """Inside: Prefect talks to the shared server (its URL is yielded), unless an API URL is already
    configured (yields None; nothing changes) or ``T2IEDIT_PREFECT_SERVER=ephemeral``. If the shared
    server cannot start, logs why and falls back to Prefect's temporary server."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url or not enabled():
        yield None
        return
    try:
        url = acquire()
    except (OSError, RuntimeError) as exc:
        print(f"t2iedit: {exc}; this stage starts Prefect's temporary server instead", file=sys.stderr)
        yield None
        return
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url  # worker processes (runner.kind: dask) inherit it
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        release()


def _live_leases(d: Path) -> list[int]:
    live = []
    for lease in (d / "leases").glob("*") if (d / "leases").is_dir() else []:
        try:
            pid = int(lease.name)
        except ValueError:
            continue
        if _alive(pid):
            live.append(pid)
        else:
            lease.unlink(missing_ok=True)  # its stage was killed
    return live


def _last_activity(d: Path) -> float:
    try:
        return float((d / "activity").read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return 0.0


def serve(port: int, idle_s: float, d: Path) -> None:
    """The server process: Prefect's API app under uvicorn until idle (see the module doc)."""
    import uvicorn

    config = uvicorn.Config("prefect.server.api.server:create_app", factory=True, host="127.0.0.1",
                            port=port, log_level="error", lifespan="on")
    server = uvicorn.Server(config)
    started = time.time()

    def reaper() -> None:
        while not server.should_exit:
            time.sleep(1.0)
            with _locked(d):
                st = _read_state(d)
                if _live_leases(d) or time.time() - max(_last_activity(d), started) < idle_s:
                    continue
                if st is not None and int(st["pid"]) == os.getpid():
                    (d / "state.json").unlink(missing_ok=True)  # under the lock: no stage can lease it now
                server.should_exit = True

    threading.Thread(target=reaper, daemon=True).start()
    server.run()


def stop(home: Path | None = None) -> bool:
    """Stop the running shared server now; False if none ran."""
    d = state_dir(home)
    with _locked(d):
        st = _read_state(d)
        (d / "state.json").unlink(missing_ok=True)
    if st is None or not _alive(int(st["pid"])):
        return False
    os.kill(int(st["pid"]), 15)
    return True


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m flows.shared_server", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run a server (started by the stages; not for direct use)")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--idle", type=float, default=DEFAULT_IDLE_S)
    s.add_argument("--state-dir", type=Path, required=True)
    sub.add_parser("status", help="print the running shared server's state")
    sub.add_parser("stop", help="stop the running shared server")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        serve(args.port, args.idle, args.state_dir)
        return 0
    if args.cmd == "stop":
        print("stopped" if stop() else "no shared server was running")
        return 0
    st = _read_state(state_dir())
    if st is None or not _alive(int(st["pid"])) or not healthy(st["url"]):
        print("no shared server is running")
        return 1
    print(json.dumps(st))
    return 0


if __name__ == "__main__":
    sys.exit(main())
