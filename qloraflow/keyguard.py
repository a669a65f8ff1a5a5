"""An ASGI middleware for vLLM's server: the API key on every path but ``/health``.

vLLM's own ``--api-key`` (or ``VLLM_API_KEY``) guards only paths under ``/v1``, ``/v2``,
``/inference`` and ``/cohere`` (``vllm/entrypoints/serve/middleware/authenticate.py``, 0.32.0).
``POST /invocations`` (the SageMaker route, registered on every server) dispatches to the same
chat and completion handlers without a key, and ``/tokenize``, ``/detokenize``, ``/metrics``,
``/load`` and ``/scale_elastic_ep`` are open too. This middleware closes them: a request without
``Authorization: Bearer $VLLM_API_KEY`` gets 401 on every path except ``/health``, which the
Kubernetes probes and ``VllmServer`` poll without a key. CORS preflight (``OPTIONS``) passes, as
in vLLM's own check.

The file depends on the standard library only, because it runs inside vLLM's Python (the serving
environment or the vLLM image), where qloraflow is not installed: it is copied there under the
module name :data:`MODULE` and loaded with ``--middleware qloraflow_keyguard.KeyGuard``::

    folder = write_module("outputs/serve/middleware")     # PYTHONPATH=<folder> for vLLM's process
    cmd += ["--middleware", MIDDLEWARE]                   # VLLM_API_KEY in its environment

In a pod, ``qloraflow.deploy`` ships the same source as a ConfigMap mounted on vLLM's PYTHONPATH.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

MODULE = "qloraflow_keyguard"
MIDDLEWARE = f"{MODULE}.KeyGuard"
ENV_KEY = "VLLM_API_KEY"
OPEN_PATHS = frozenset({"/health"})  # the probes: they cannot send a key


class KeyGuard:
    """Refuse (401) every HTTP or websocket request without the bearer key, except :data:`OPEN_PATHS`.

    vLLM adds a middleware class with ``app.add_middleware(cls)``, so the key comes from the
    environment (``VLLM_API_KEY``), never from argv, where ``ps`` would show it.

    Raises:
        RuntimeError: at server start, when ``VLLM_API_KEY`` is unset or empty: an unkeyed
            server would be open, so it does not start.
    """

    def __init__(self, app):  # noqa: ANN001 - any ASGI app
        key = os.environ.get(ENV_KEY, "")
        if not key:
            raise RuntimeError(f"{MIDDLEWARE} needs {ENV_KEY} set to the API key clients send; "
                               "set it (from a Kubernetes Secret in a pod) or drop --middleware")
        self.app = app
        self._digest = hashlib.sha256(key.encode()).digest()

    def _authorized(self, scope: dict) -> bool:
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                # Digests of equal length, compared in constant time: the key's length leaks nothing.
                return scheme.lower() == "bearer" and hmac.compare_digest(
                    hashlib.sha256(token.encode()).digest(), self._digest)
        return False

    async def __call__(self, scope, receive, send):  # noqa: ANN001 - the ASGI signature
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path in OPEN_PATHS or self._authorized(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})  # policy violation
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": b'{"error":"Unauthorized"}'})


def module_source() -> str:
    """This file's text: what is written under :data:`MODULE` for vLLM's Python to import."""
    return Path(__file__).read_text()


def write_module(folder: str | os.PathLike) -> Path:
    """Write ``<folder>/qloraflow_keyguard.py``; put ``folder`` on vLLM's PYTHONPATH.

    Returns:
        ``folder``, created if needed.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{MODULE}.py").write_text(module_source())
    return out
