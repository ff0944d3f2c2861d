"""Engine replicas on Ray Serve behind a prefix-aware router (``pip install -e ".[distributed]"``).

``kvcache serve --replicas N`` from the command line; from Python, ``deploy(...)`` returns the base URL of the
same OpenAI-compatible API the single server has, and ``shutdown()`` takes it down.  Nothing here is imported
by the single-process server, so Ray stays optional.
"""

from __future__ import annotations

from typing import Any


def deploy(model: str | None = None, replicas: int = 2, router: str = "prefix", port: int = 8000,
           app_name: str = "kvcache", **options: Any) -> str:
    """Deploy ``replicas`` engines of ``model`` and return the base URL.  ``options`` are ``kvcache serve``'s,
    with dashes as underscores (``kv_memory="1GiB"``, ``kv_store="redis://..."``, ``random=...``, ``ray_address``)."""
    from ..server.serve import model_name, serve_options
    from .launch import start

    args = serve_options(model=model, replicas=replicas, router=router, port=port, **options)
    return start(args, model_name(args), app_name)


def shutdown(app_name: str = "kvcache", local: bool = True) -> None:
    """Delete the application (and, with ``local``, stop Serve and the Ray cluster this process started)."""
    from .launch import stop

    stop(app_name, local)
