"""``kvpipe ARGS`` through the CLI's entry point (``main``: one-line errors, exit codes) in the test's
own process, where benchmarks registered by a test are visible; a fresh interpreter per command
would cost more than the command."""

from __future__ import annotations

import sys
from typing import NamedTuple


class Ran(NamedTuple):
    code: int
    stdout: str
    stderr: str


def run_in_process(capsys, monkeypatch, *args: str, check: bool = True) -> Ran:
    """Run the command with ``sys.argv`` as a user's shell would set it; output captured by ``capsys``."""
    from kvpipe.cli.app import main

    monkeypatch.setenv("COLUMNS", "250")
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["kvpipe", *args])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out = capsys.readouterr()
    ran = Ran(code, out.out, out.err)
    if check and code != 0:
        raise AssertionError(f"kvpipe {' '.join(args)} failed ({code}):\n{ran.stdout}\n{ran.stderr}")
    return ran
