"""Federations across real sites: Flower's deployment engine, driven by medtl.

Three kinds of process, as Flower documents them:

- the **SuperLink** (``flower-superlink``), at the coordinator: it relays messages and runs the
  server app; nothing of medtl's is needed to start it;
- one **SuperNode** per hospital (``medtl federate-site DATA --superlink HOST:PORT``): it checks
  that the site's DATA loads, then runs ``flower-supernode`` with ``data`` in its node config.
  Each round Flower starts medtl's client app in a fresh process there, which reads that DATA;
- the **run** (``medtl federate --superlink HOST:PORT``), at the coordinator beside the
  SuperLink: it submits medtl's apps with ``flwr run``, follows the rounds and writes the run
  directory from what the server app saved (the global model and the rounds' counts).

The app is submitted as a Flower App Bundle holding only a ``pyproject.toml``: its components
point at ``medtl.federated.flower_apps``, installed at every site, so no code travels. The SuperLink
must not install dependencies per run (``--disable-runtime-dependency-installation``): it would
try to download them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from medtl.errors import MedtlError
from medtl.federated.apps import PLAN_FILE, Plan, follow_rounds
from medtl.files import atomic_write

log = logging.getLogger("medtl")

CONNECTION = "medtl"
POLL_S = 1.0

APP_PYPROJECT = """\
[project]
name = "medtl-federation"
version = "1.0.0"
description = "medtl's federated apps (medtl.federated.flower_apps), installed at every site"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "medtl"

[tool.flwr.app.components]
serverapp = "medtl.federated.flower_apps:server_app"
clientapp = "medtl.federated.flower_apps:client_app"

[tool.flwr.app.config]
workdir = ""
"""


def _flower_env(home: Path | None = None) -> dict[str, str]:
    """The environment of Flower's commands: this Python's scripts first on PATH (the SuperLink
    and SuperNode start ``flower-superexec`` by name) and, when given, its own FLWR_HOME."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if home is not None:
        env["FLWR_HOME"] = str(home)
    return env


def _executable(name: str) -> str:
    found = shutil.which(name, path=_flower_env()["PATH"])
    if found is None:
        raise MedtlError(f"{name} not found: pip install 'medtl[federated]' (Flower)")
    return found


def _toml_string(text: str, what: str) -> str:
    if "'" in text or "\n" in text:
        raise MedtlError(f"{what} {text!r}: a quote or line break cannot pass through Flower's "
                         "config; rename or move it")
    return f"'{text}'"


def _connection_home(where: Path, superlink: str, *, insecure: bool,
                     root_certificates: str | None) -> Path:
    """A private FLWR_HOME whose config.toml names the SuperLink (flwr's CLI reads it there)."""
    home = where / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{superlink}"']
    if insecure:
        lines.append("insecure = true")
    elif root_certificates:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    atomic_write(home / "config.toml", ("\n".join(lines) + "\n").encode())
    return home


def submit(plan: Plan, superlink: str, workdir: Path, *, insecure: bool,
           root_certificates: str | None, quiet: bool) -> None:
    """Run the federation on a running SuperLink and wait for it: the server app (started by
    the SuperLink) leaves the global model and the rounds' counts in ``workdir``, which must
    therefore be on the SuperLink's machine."""
    app = workdir / "app"
    app.mkdir(parents=True, exist_ok=True)
    atomic_write(app / "pyproject.toml", APP_PYPROJECT.encode())
    atomic_write(workdir / PLAN_FILE, plan.to_json().encode())
    home = _connection_home(workdir, superlink, insecure=insecure,
                            root_certificates=root_certificates)
    env = _flower_env(home)
    flwr = _executable("flwr")
    cmd = [flwr, "run", str(app), CONNECTION, "--format", "json", "--run-config",
           f"workdir={_toml_string(str(workdir.resolve()), 'the run directory')}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    reply = _json(done.stdout)
    run_id = reply.get("run-id") if reply else None
    if done.returncode != 0 or run_id is None:
        # flwr's message is several lines (config notes, then the reason): the last one says it
        why = _last((reply or {}).get("error-message") or done.stderr or done.stdout)
        raise MedtlError(f"the SuperLink at {superlink} did not take the federation: {why}")
    log.info("federation submitted to %s as Flower run %s", superlink, run_id)
    status = _wait(flwr, env, run_id, workdir, plan.rounds, quiet)
    if status != "finished:completed":
        error = workdir / "error.txt"
        why = error.read_text() if error.exists() else _details(flwr, env, run_id)
        raise MedtlError(f"the federation ended {status}: {why}")


def _wait(flwr: str, env: dict[str, str], run_id: Any, workdir: Path, rounds: int,
          quiet: bool) -> str:
    with follow_rounds(workdir, rounds, quiet=quiet):
        while True:
            status = _status(flwr, env, run_id)
            if status.startswith("finished"):
                return status
            time.sleep(POLL_S)


def _status(flwr: str, env: dict[str, str], run_id: Any) -> str:
    out = subprocess.run([flwr, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
                         env=env, capture_output=True, text=True, timeout=120, check=False)
    runs = (_json(out.stdout) or {}).get("runs") or []
    return str(runs[0].get("status", "unknown")) if runs else "unknown"


def _details(flwr: str, env: dict[str, str], run_id: Any) -> str:
    out = subprocess.run([flwr, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
                         env=env, capture_output=True, text=True, timeout=120, check=False)
    runs = (_json(out.stdout) or {}).get("runs") or []
    return str(runs[0].get("status-details") or "no reason given") if runs else "unknown"


def _json(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _last(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no reason given"


def supernode_command(data: str | Path, superlink: str, *, insecure: bool,
                      root_certificates: str | None, port: int | None,
                      patient_regex: str | None, val_fraction: float = 0.2,
                      weights: str | None = None) -> list[str]:
    """``flower-supernode`` for a site whose data is DATA (checked by the caller). How the
    site reads its data (and a weights file of its own) goes in the node config: the site's
    settings, which the server's plan does not override."""
    node = [f"data={_toml_string(str(Path(data).resolve()), 'the site data path')}",
            f"val-fraction={float(val_fraction)}"]
    if patient_regex:
        node.append(f"patient-regex={_toml_string(patient_regex, '--patient-regex')}")
    if weights:
        node.append(f"weights={_toml_string(str(Path(weights).resolve()), '--weights')}")
    cmd = [_executable("flower-supernode"), "--superlink", superlink,
           "--node-config", " ".join(node)]
    if insecure:
        cmd.append("--insecure")
    elif root_certificates:
        cmd += ["--root-certificates", str(Path(root_certificates).resolve())]
    if port is not None:
        cmd += ["--port", str(port)]
    return cmd


def run_site(data: str | Path, superlink: str, *, insecure: bool = False,
             root_certificates: str | None = None, port: int | None = None,
             patient_regex: str | None = None, val_fraction: float = 0.2,
             weights: str | None = None) -> None:
    """``medtl federate-site``: check DATA, then become the site's SuperNode (this process is
    replaced by ``flower-supernode``, so a signal to it stops the SuperNode itself)."""
    from medtl.data import load_dataset

    if not insecure and not root_certificates:
        raise MedtlError("give --root-certificates CA.pem (TLS to the SuperLink) or --insecure "
                         "(a test on one machine or a private network only)")
    ds = load_dataset(data, patient_regex=patient_regex, val_fraction=val_fraction)
    for split in ("train", "val"):
        ds.split(split)
    from medtl.console import console

    console.print(f"site data {data}: classes {ds.classes}; " + "; ".join(
        f"{s} {sum(c.values())}" for s, c in ds.counts().items()))
    if weights is not None and not Path(weights).is_file():
        raise MedtlError(f"--weights {weights}: no such file")
    cmd = supernode_command(data, superlink, insecure=insecure,
                            root_certificates=root_certificates, port=port,
                            patient_regex=patient_regex, val_fraction=val_fraction,
                            weights=weights)
    console.print(f"serving this site to the federation at {superlink} (Ctrl-C to stop); "
                  "only the model's shared parameters and counts leave this machine")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, _flower_env())
