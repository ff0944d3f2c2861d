"""``kvcache serve``: the engine behind an OpenAI-compatible HTTP API, on uvicorn.

The listening socket is bound here, before the model loads, so a port in use is a one-line error and
``--port 0`` picks a free port (printed on the first line, for scripts).
"""

from __future__ import annotations

import argparse
import socket
import threading

from ..usage import (
    KV_HELP,
    MODEL_HELP,
    RANDOM_SHAPES,
    UsageError,
    add_dtype,
    check_dtype,
    load_user_model,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    add_dtype(parser)
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
    parser.add_argument("--max-waiting", type=int, default=512, help="requests that may wait for a batch slot; "
                        "beyond it new ones get 429 with Retry-After (default 512)")
    parser.add_argument("--max-batch-tokens", type=int, default=2048, help="tokens in one step (default 2048)")
    parser.add_argument("--no-prefix-caching", action="store_true", help="never reuse the KV of shared prefixes")
    parser.add_argument("--kv-disk", default=None, metavar="DIR", help="a disk KV tier in DIR: prompts' KV survives "
                        "restarts and is shared by processes on this machine")
    parser.add_argument("--kv-disk-size", default="20GiB", help="the disk tier's size cap, LRU-evicted "
                        "(default 20GiB)")
    parser.add_argument("--kv-store", default=None, metavar="URL", help="a shared KV tier in Redis/Valkey, e.g. "
                        "redis://127.0.0.1:6379/0 (run it with maxmemory-policy allkeys-lru)")
    parser.add_argument("--kv-chunk", type=int, default=256, help="tokens per stored KV chunk, a multiple of "
                        "--block-size (default 256)")
    parser.add_argument("--kv-store-timeout", type=float, default=1.0, help="seconds any tier call may take "
                        "before it counts as a miss (default 1)")
    parser.add_argument("--metrics-prefix", default="kvcache", help="Prometheus metric prefix; 'vllm' makes "
                        "dashboards written for vLLM read this server (default kvcache)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    ray = parser.add_argument_group("replicas on Ray Serve (pip install -e \".[distributed]\")")
    ray.add_argument("--replicas", type=int, default=None, metavar="N", help="run N engine replicas on Ray Serve "
                     "behind one endpoint (a local Ray cluster unless --ray-address)")
    ray.add_argument("--router", default="prefix", choices=["prefix", "pow2", "round-robin"], help="how requests "
                     "pick a replica: longest cached prefix when load is balanced (default), Ray Serve's power of "
                     "two choices, or round-robin")
    ray.add_argument("--ray-address", default=None, help="join this Ray cluster (e.g. auto, or host:6379)")
    ray.add_argument("--replica-cpus", type=float, default=None, help="CPUs (and threads) per replica (default: "
                     "this machine's cores / --replicas)")
    ray.add_argument("--router-match", type=float, default=0.1, help="fraction of a prompt's blocks a past prefix "
                     "must cover to route by it (default 0.1)")
    ray.add_argument("--router-balance-abs", type=int, default=8, help="load is out of balance (route to the least "
                     "loaded) when the busiest replica has more than this many requests waiting beyond its batch "
                     "(--max-num-seqs) above the least busy ... (default 8)")
    ray.add_argument("--router-balance-rel", type=float, default=2.0, help="... and more than this times as many "
                     "(default 2)")


def serve_options(**options) -> argparse.Namespace:
    """``kvcache serve``'s options with their defaults, overridden by ``options`` (names with underscores)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    for key, value in options.items():
        if not hasattr(args, key):
            raise TypeError(f"unknown option {key!r} (kvcache serve has no --{key.replace('_', '-')})")
        setattr(args, key, value)
    return args


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

    tiers = open_user_tiers(args)
    model = (random_model(args.random) if args.random else
             load_user_model(args.model, args.dtype, args.float_activations))
    try:
        return LLM(model, kv_memory=args.kv_memory, block_size=args.block_size, max_batch_tokens=args.max_batch_tokens,
                   max_num_seqs=args.max_num_seqs, enable_prefix_caching=not args.no_prefix_caching,
                   kv_cache=args.kv_cache, kv_tiers=tiers)
    except (TypeError, ValueError, MemoryError) as exc:
        if tiers is not None:
            tiers.close()
        raise UsageError(str(exc)) from exc


def open_user_tiers(args: argparse.Namespace):
    """The KV tiers ``--kv-disk`` / ``--kv-store`` name, or a UsageError naming the bad option."""
    from ..engine.requests import parse_bytes
    from ..tiers import open_tiers

    if args.kv_disk is None and args.kv_store is None:
        return None
    try:
        size = parse_bytes(args.kv_disk_size)
    except ValueError as exc:
        raise UsageError(f"--kv-disk-size: {exc}") from None
    try:
        return open_tiers(args.kv_disk, size, args.kv_store, args.kv_chunk, args.kv_store_timeout)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--kv-disk/--kv-store: {exc}") from None


def model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    return args.model or (f"random-{args.random}" if args.random else "kvcache-default")


def check_args(args: argparse.Namespace) -> None:
    if not args.metrics_prefix.replace("_", "").isalnum():
        raise UsageError(f"--metrics-prefix must be letters, digits and underscores, got {args.metrics_prefix!r}")
    check_dtype(args.dtype)
    if args.max_waiting < 1:
        raise UsageError(f"--max-waiting must be at least 1, got {args.max_waiting}")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import build_app

    check_args(args)
    sock = bind(args.host, args.port)
    try:
        llm = build_llm(args)
        name = model_name(args)
        app = build_app(llm, name, args.metrics_prefix, max_waiting=args.max_waiting)
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


