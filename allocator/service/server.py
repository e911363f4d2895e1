"""``bitalloc serve``: check the setup, bind the socket, run uvicorn.

The socket is bound here (port 0 picks a free one) and the address printed on one line,
``bitalloc serve: listening on http://HOST:PORT``, and written to ``STATE/server.json``, so
scripts and tests can start a server on an ephemeral port and find it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

from bitalloc import BitallocError

from .auth import AuthError, is_loopback, load_token_file

__all__ = ["serve", "ServeError"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8750


class ServeError(BitallocError, ValueError):
    """The server cannot start as asked."""


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so; without it every
    # response (headers and body written apart) waits ~40 ms for a delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, state_dir: str | os.PathLike = "bitalloc-state",
          workers: int | None = None, ray_address: str | None = None, token_file: str | None = None,
          db_url: str | None = None, max_body_mb: float = 8, max_upload_mb: float = 1024,
          export_targets: list[str] | None = None, log_level: str = "warning") -> int:
    """Run the service until interrupted (SIGINT / SIGTERM: running jobs stop and resume on the next start)."""
    import uvicorn

    from .app import ServiceConfig, create_app
    from .exports import parse_target_option

    if workers is not None and ray_address:
        raise ServeError("give --workers or --ray-address, not both")
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ServeError(f"--port must be 0-65535, got {port!r}")
    hashes = load_token_file(token_file) if token_file else []
    if not hashes and not is_loopback(host):
        raise AuthError(f"refusing to listen on {host} (not a loopback address) without authentication: "
                        f"give --token-file FILE (one token per line, or sha256:<hex> lines)")
    if ray_address:
        from bitalloc.sensitivity.runner import check_ray_address

        check_ray_address(ray_address)
    targets = tuple(parse_target_option(t) for t in export_targets or ())
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    cfg = ServiceConfig(state_dir=str(state), db_url=db_url, workers=workers or 1, ray_address=ray_address,
                        token_hashes=tuple(hashes), max_body_bytes=int(max_body_mb * (1 << 20)),
                        max_upload_bytes=int(max_upload_mb * (1 << 20)), export_targets=targets)
    app = create_app(cfg)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    url = f"http://{shown}:{bound}"
    from bitalloc.sensitivity.artifact import write_json

    write_json(state / "server.json", {"url": url, "pid": os.getpid(), "host": host, "port": bound}, indent=1)
    print(f"bitalloc serve: listening on {url} (state {state.resolve()}, "
          f"{'token auth' if hashes else 'no auth: loopback only'}, {cfg.workers} job worker(s)"
          f"{', Ray ' + ray_address if ray_address else ''}; docs at {url}/docs)", flush=True)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
