"""``medtl serve``: check the bind and token, load the model, run uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from pathlib import Path

from medtl.errors import MedtlError

TOKEN_ENV = "MEDTL_SERVE_TOKEN"
MIN_TOKEN = 16  # characters: a token short enough to guess is no protection


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: str | None) -> str | None:
    """The token the server requires (``token``, else $MEDTL_SERVE_TOKEN); a non-loopback
    ``host`` without one, or a short one, is refused."""
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    if token is not None:
        token = token.strip()
        if len(token) < MIN_TOKEN or not token.isprintable() or not token.isascii():
            raise MedtlError(f"the token must be at least {MIN_TOKEN} printable ASCII "
                             "characters (e.g. python -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))')")
    if token is None and not is_loopback(host):
        raise MedtlError(f"--host {host}: binding an address other than loopback needs a "
                         f"token (--token, or ${TOKEN_ENV}); every /v1/ request must then "
                         "send it as 'Authorization: Bearer TOKEN'")
    return token


def serve(source: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          token: str | None = None, batch_size: int = 32, batch_wait_ms: float = 5.0,
          max_upload_mb: float = 64.0, max_pixels: int = 50_000_000,
          cors_origins: list[str] | None = None) -> None:
    """Serve a bundle or run on ``host:port`` until interrupted. The model is loaded (a run
    exported, a bundle checked against its manifest) before the port opens, so a bad bundle
    is one error line and exit 2."""
    import uvicorn

    from medtl.serving.app import Settings, create_app
    from medtl.serving.model import load_served

    token = resolve_token(host, token)
    if not 1 <= port <= 65535:
        raise MedtlError(f"--port {port}: not a port number (1 to 65535)")
    if batch_size < 1 or batch_wait_ms < 0 or max_upload_mb <= 0 or max_pixels < 1:
        raise MedtlError("--batch-size, --max-upload-mb and --max-pixels must be positive and "
                         "--batch-wait-ms not negative")
    _log_to_stderr()
    settings = Settings(token=token, batch_size=batch_size, batch_wait_ms=batch_wait_ms,
                        max_upload_mb=max_upload_mb, max_pixels=max_pixels,
                        cors_origins=list(cors_origins or []))
    served = load_served(source)
    app = create_app(served, settings)
    logging.getLogger("medtl.serve").info(
        "serving %s (%s) on http://%s:%d%s", served.id, served.model.sha256[:12], host, port,
        "" if token else " without a token")
    try:
        uvicorn.run(app, host=host, port=port, access_log=False, server_header=False,
                    log_level="info")
    finally:
        served.close()


def _log_to_stderr() -> None:
    log = logging.getLogger("medtl.serve")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s medtl.serve %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
