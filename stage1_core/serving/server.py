"""Run the prediction service with uvicorn: bind, announce the address, reload on SIGHUP.

The socket is bound before uvicorn starts, so ``--port 0`` (any free port) works and the line
``stage1 serve: listening on http://HOST:PORT`` printed on stdout names the real port. SIGHUP
reloads the bundle directory through the same verified, pinned load as ``POST /reload`` (in a
background thread: the old bundle answers until the new one is loaded); SIGINT / SIGTERM stop
the service gracefully (uvicorn's own handling).
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from pathlib import Path

import uvicorn

from stage1_core.serving.app import ServeSettings, create_app, reload_bundle
from stage1_core.serving.model import ModelHolder, ReloadRefused, load_served

__all__ = ["RELOAD_SIGNAL", "bind_socket", "serve"]

logger = logging.getLogger(__name__)

#: The signal that makes a running service reload its bundle directory.
RELOAD_SIGNAL = signal.SIGHUP


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(
    bundle_dir: str | Path,
    expected_id: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    artifacts_root: str | Path | None = None,
    backbone_dir: str | Path | None = None,
    device: str | None = None,
    settings: ServeSettings | None = None,
    log_level: str = "info",
) -> int:
    """Load the bundle (verified, pinned), then serve until SIGINT / SIGTERM; return the exit code."""
    served = load_served(bundle_dir, expected_id, artifacts_root, backbone_dir, device)
    holder = ModelHolder(served, expected_id, artifacts_root, backbone_dir)
    app = create_app(holder, settings)
    sock = bind_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host

    def on_reload_signal(signum: int, frame: object) -> None:
        def work() -> None:
            try:
                reload_bundle(app)
            except ReloadRefused:
                pass  # logged and counted by reload_bundle; the old bundle still serves

        threading.Thread(target=work, name="stage1-reload", daemon=True).start()

    previous = signal.signal(RELOAD_SIGNAL, on_reload_signal)
    print(f"stage1 serve: bundle {served.bundle_id} (phase {served.phase}, policy {served.policy}) on {served.device}",
          flush=True)
    print(f"stage1 serve: listening on http://{shown}:{bound_port}", flush=True)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=10)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        signal.signal(RELOAD_SIGNAL, previous)
        sock.close()
    print("stage1 serve: stopped", file=sys.stderr, flush=True)
    return 0
