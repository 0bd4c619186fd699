"""Waiting on a child process in tests that kill or race it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str,
             timeout: float = 240.0) -> None:
    """Poll until ``condition()`` holds; fail if ``proc`` ends first (it must still run)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the process ended before {what}: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {timeout:.0f} s")
        time.sleep(0.05)
