"""``kvcache serve``: the engine behind an OpenAI-compatible HTTP API, on uvicorn.

The listening socket is bound here, before the model loads, so a port in use is a one-line error and
``--port 0`` picks a free port (printed on the first line, for scripts).
"""

from __future__ import annotations

import argparse
import socket
import threading

from ..usage import DTYPE_HELP, KV_HELP, MODEL_HELP, RANDOM_SHAPES, UsageError, check_dtype, load_user_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--dtype", default="float32", help=DTYPE_HELP)
    parser.add_argument("--random", choices=RANDOM_SHAPES, default=None,
                        help="serve a random-weight model of this shape instead")
    parser.add_argument("--served-model-name", default=None, help="the name clients send as 'model' (default: "
                        "--model, or 'kvcache-default' for the shipped model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    parser.add_argument("--kv-memory", default="1GiB", help="KV pool size, e.g. 512MiB, 2GiB (default 1GiB)")
    parser.add_argument("--kv-cache", default=None, metavar="SPEC", help=KV_HELP + "; the engine's paged pool")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=256, help="sequences in one batch (default 256)")
    parser.add_argument("--max-batch-tokens", type=int, default=2048, help="tokens in one step (default 2048)")
    parser.add_argument("--no-prefix-caching", action="store_true", help="never reuse the KV of shared prefixes")
    parser.add_argument("--metrics-prefix", default="kvcache", help="Prometheus metric prefix; 'vllm' makes "
                        "dashboards written for vLLM read this server (default kvcache)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a UsageError naming the address."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def build_llm(args: argparse.Namespace):
    from ..engine.llm import LLM
    from ..model.shapes import random_model

    model = random_model(args.random) if args.random else load_user_model(args.model, args.dtype)
    try:
        return LLM(model, kv_memory=args.kv_memory, block_size=args.block_size, max_batch_tokens=args.max_batch_tokens,
                   max_num_seqs=args.max_num_seqs, enable_prefix_caching=not args.no_prefix_caching,
                   kv_cache=args.kv_cache)
    except (TypeError, ValueError, MemoryError) as exc:
        raise UsageError(str(exc)) from exc


def model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    return args.model or (f"random-{args.random}" if args.random else "kvcache-default")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import build_app

    if not args.metrics_prefix.replace("_", "").isalnum():
        raise UsageError(f"--metrics-prefix must be letters, digits and underscores, got {args.metrics_prefix!r}")
    check_dtype(args.dtype)
    sock = bind(args.host, args.port)
    try:
        llm = build_llm(args)
        name = model_name(args)
        app = build_app(llm, name, args.metrics_prefix)
        host, port = sock.getsockname()[:2]
        print(f"kvcache serve: {name} on http://{host}:{port} (the page at /, OpenAI API at /v1)", flush=True)
        config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Serve ``app`` from a background thread (tests, benchmarks): (server, thread, base url)."""
    import uvicorn

    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server thread stopped before it started")
        threading.Event().wait(0.02)
    return server, thread, f"http://{host}:{sock.getsockname()[1]}"

