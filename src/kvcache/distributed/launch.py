"""Launch engine replicas on Ray Serve: ``kvcache serve --replicas N`` and ``kvcache.distributed.deploy``.

The application is two deployments: ``KVIngress`` (one replica, no CPU reserved: HTTP, tokenizing, routing) and
``KVEngine`` (N replicas, each an engine with ``--replica-cpus`` threads, its own KV pool, and the shared KV
tier when ``--kv-store`` is given).  The router is the KVEngine deployment's ``RequestRouterConfig``, so every
handle to it (the ingress's) routes the same way.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

from ..usage import UsageError
from .routing import RouterOptions

APP_NAME = "kvcache"


def router_options(args: argparse.Namespace) -> RouterOptions:
    try:
        return RouterOptions(match_threshold=args.router_match, balance_abs=args.router_balance_abs,
                             balance_rel=args.router_balance_rel)
    except ValueError as exc:
        raise UsageError(f"--router-*: {exc}") from None


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad options by name before any Ray process starts."""
    from .router import ROUTERS

    if args.replicas < 1:
        raise UsageError(f"--replicas must be at least 1, got {args.replicas}")
    if args.replica_cpus is not None and args.replica_cpus <= 0:
        raise UsageError(f"--replica-cpus must be positive, got {args.replica_cpus}")
    if args.router not in ROUTERS:
        raise UsageError(f"--router must be one of {', '.join(ROUTERS)}, got {args.router!r}")
    router_options(args)


def build_application(args: argparse.Namespace, model_name: str, app_name: str = APP_NAME):
    """The Serve application (``serve.run`` it): the ingress bound to N engine replicas."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from .ingress import Ingress
    from .replica import EngineReplica
    from .router import ROUTERS

    if args.replica_cpus is None:
        args.replica_cpus = max(1, (os.cpu_count() or 1) // args.replicas)
    kwargs = {}
    if args.router == "prefix":
        o = router_options(args)
        kwargs = {"block_size": args.block_size, "match_threshold": o.match_threshold, "balance_abs": o.balance_abs,
                  "balance_rel": o.balance_rel, "batch_slots": args.max_num_seqs}
    engine = serve.deployment(
        EngineReplica, name="KVEngine", num_replicas=args.replicas,
        ray_actor_options={"num_cpus": args.replica_cpus},
        max_ongoing_requests=args.max_num_seqs + args.max_waiting,  # beyond the batch, the engine's own queue
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
        request_router_config=RequestRouterConfig(request_router_class=ROUTERS[args.router],
                                                  request_router_kwargs=kwargs, request_routing_stats_period_s=1,
                                                  request_routing_stats_timeout_s=5))
    ingress = serve.deployment(Ingress, name="KVIngress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=100_000)
    # The ingress bounds the prompts not yet accepted by a replica itself (503 + Retry-After), so the refusal has
    # OpenAI's body; Serve's max_queued_requests would answer in its own words.  The bound is what every replica
    # can take (a burst is in flight to them) plus --max-waiting prompts queued in the ingress.
    pending = args.replicas * (args.max_num_seqs + args.max_waiting) + args.max_waiting
    return ingress.bind(engine.bind(args, model_name, app_name), model_name, app_name, args.metrics_prefix, pending)


def start(args: argparse.Namespace, model_name: str, app_name: str = APP_NAME) -> str:
    """Join (``--ray-address``) or start a Ray cluster, start Serve's HTTP proxy on ``--host``/``--port`` and run
    the application; the base URL once every replica is up."""
    import ray
    from ray import serve

    from ..server.serve import bind

    check_args(args)
    sock = bind(args.host, args.port)  # a port in use is a one-line error before Ray starts
    port = sock.getsockname()[1]
    sock.close()
    if not ray.is_initialized():
        ray.init(address=args.ray_address or "local", namespace="serve",
                 logging_level=args.log_level.upper())
    serve.start(http_options={"host": args.host, "port": port}, logging_config=_logging(args))
    try:
        serve.run(build_application(args, model_name, app_name), name=app_name, route_prefix="/",
                  logging_config=_logging(args))
    except RuntimeError as exc:  # a replica failed to start (bad model, bad spec): its error, not Ray's trace
        serve.delete(app_name)
        raise UsageError(f"the replicas did not start: {_last_line(exc)}") from None
    return f"http://{args.host}:{port}"


def replace(args: argparse.Namespace, model_name: str, app_name: str = APP_NAME) -> None:
    """Deploy the application again with other options (router, replicas) behind the running proxy: fresh
    replicas, fresh pools, a fresh router."""
    from ray import serve

    check_args(args)
    serve.delete(app_name)
    serve.run(build_application(args, model_name, app_name), name=app_name, route_prefix="/",
              logging_config=_logging(args))


def stop(app_name: str = APP_NAME, local: bool = True) -> None:
    """Delete the application; with ``local`` (the cluster was started here) shut Serve and Ray down too."""
    import ray
    from ray import serve

    serve.delete(app_name)
    if local:
        serve.shutdown()
        ray.shutdown()


def run(args: argparse.Namespace, model_name: str) -> int:
    """``kvcache serve --replicas N``: deploy, print the address, serve until Ctrl-C."""
    url = start(args, model_name)
    print(f"kvcache serve: {model_name} on {url} ({args.replicas} replicas on Ray Serve, {args.router} routing; "
          "the page at /, OpenAI API at /v1; `serve status` shows them)", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop cleans up as Ctrl-C does
    try:
        while True:  # Ctrl-C ends it: the command line says "interrupted" and exits with 130
            time.sleep(1)
    finally:
        stop(local=args.ray_address is None)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _logging(args: argparse.Namespace) -> dict:
    """Serve's logs (one line per request at info) at ``--log-level``; they land where Ray puts every log."""
    return {"log_level": args.log_level.upper()}


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
