"""What a results folder records about how it was made, and whether two results belong together.

Why here: the model-in-the-loop commands (``answer``, ``intervene``) and the commands that read
their outputs beside stores (``paired``, ``figure3``, ``report-prefix``) live on different
floors (pipeline and probes), and all must write the same ``run.json`` provenance and compare a
store's model with an answers folder's model the same way. Plain JSON, no third-party imports.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping

from kvpipe import __version__

RUN_FILE = "run.json"


def command_line(command: str, params: Mapping[str, Any]) -> str:
    """The ``kvpipe COMMAND ...`` line: this process's own arguments when it is that command,
    else one rebuilt from the parsed parameters (every option, defaults included)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("kvpipe", "__main__.py") and command in argv[1:2]:
        return "kvpipe " + shlex.join(argv[1:])
    words = ["kvpipe", command]
    for key, value in params.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False or value == []:
            continue
        if value is True:
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            for v in value:
                words += [flag, str(v)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def provenance(command: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """{kvpipe_version, command, params}: what a run.json records about the call that made it."""
    return {"kvpipe_version": __version__, "command": command_line(command, params),
            "params": {k: _jsonable(v) for k, v in params.items()}}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if callable(getattr(value, "to_dict", None)):  # the store metadata's typed sections
        return _jsonable(value.to_dict())
    return str(value)


def write_run_json(folder: str | Path, record: Mapping[str, Any]) -> Path:
    """``folder/run.json``, written to a temporary name and renamed."""
    path = Path(folder) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_jsonable(dict(record)), indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read_run_json(result_file: str | Path) -> dict[str, Any] | None:
    """The run.json beside a results file (or in a results folder); None when there is none or
    it is unreadable (files from elsewhere carry no provenance)."""
    path = Path(result_file)
    path = path / RUN_FILE if path.is_dir() else path.parent / RUN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def model_identity(record: Mapping[str, Any]) -> dict[str, Any]:
    """The fields that make two models the same, from a store's ``meta.model`` (name, checkpoint,
    ...) or a run.json (model, checkpoint, ...): a checkpoint (and its revision), or, for random
    weights, the registry name and the seed."""
    name = record.get("name", record.get("model"))
    init = record.get("init") or "pretrained"
    if init == "random" or not record.get("checkpoint"):
        return {"name": name, "init": init, "seed": record.get("seed")}
    out = {"checkpoint": record.get("checkpoint"), "init": init}
    if record.get("revision"):
        out["revision"] = record.get("revision")
    return out


def model_mismatch(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """None when ``a`` and ``b`` name the same model; else a short description of both."""
    ia, ib = model_identity(a), model_identity(b)
    shared = set(ia) & set(ib)
    if set(ia) != set(ib) or any(ia[k] != ib[k] for k in shared):
        return f"{describe_model(ia)} vs {describe_model(ib)}"
    return None


def describe_model(identity: Mapping[str, Any]) -> str:
    if "checkpoint" in identity:
        rev = f"@{identity['revision']}" if identity.get("revision") else ""
        return f"{identity['checkpoint']}{rev}"
    return f"{identity.get('name')} ({identity.get('init')}, seed {identity.get('seed')})"
