"""Errors that a user can cause and fix. The CLI prints them as one line and exits 2."""

from __future__ import annotations

from collections.abc import Iterable


class MedtlError(Exception):
    """A user's mistake (bad path, bad option, unreadable data): shown without a traceback."""


class DataReadError(MedtlError):
    """An image or manifest could not be read. ``path`` names the file, ``reason`` the cause."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class WeightsError(MedtlError):
    """Pretrained weights could not be found or loaded."""


def check_choice(option: str, value: str, choices: Iterable[str]) -> str:
    """Validate a string option against its allowed values, as MONAI does, with a clear message."""
    allowed = list(choices)
    if value not in allowed:
        raise MedtlError(f"unknown {option} '{value}'; choose one of: {', '.join(allowed)}")
    return value
