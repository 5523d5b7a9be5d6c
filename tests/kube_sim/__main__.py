"""Run the simulated cluster as its own process, for `make demo` and black-box tests.

    python -m tests.kube_sim --port 8081 --kubeconfig /tmp/kubeconfig-sim [--profile zalando] [--speed demo|fast]
        [--rbac deploy/worker-rbac.yaml]

Seeds namespace `db` with StatefulSet `pg` (pg-0 primary, pg-1 and pg-2 replicas, PVCs data-pg-N Bound; with
`--profile cnpg` a CloudNativePG Cluster `pg` instead: pg-1 primary, pg-2 and pg-3 replicas, PVCs pg-N), writes
the kubeconfig, logs one `kube-sim ready` line and serves until SIGINT or SIGTERM. Faults can be injected over
HTTP: `curl -X POST $URL/_sim/faults -d '{"kind": "pod", "name": "pg-1", "behaviour": "crash_loop"}'`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from tests.kube_sim.objects import PROFILES
from tests.kube_sim.rbac import Rbac
from tests.kube_sim.sim import KubeSim
from tests.kube_sim.timing import SPEEDS

log = logging.getLogger("tests.kube_sim")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.kube_sim", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081, help="0 picks a free port")
    parser.add_argument("--kubeconfig", required=True, help="where to write the kubeconfig")
    parser.add_argument("--context", default="sim", help="context name in the kubeconfig")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="zalando", help="label conventions")
    parser.add_argument("--speed", choices=sorted(SPEEDS), default="demo", help="controller delays")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--no-seed", action="store_true", help="start with an empty cluster")
    parser.add_argument(
        "--rbac", type=Path, metavar="FILE", help="enforce the Roles and bindings of this manifest (403 otherwise)"
    )
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sim = KubeSim(args.profile, args.speed, rbac=Rbac.load(args.rbac) if args.rbac else None)
    if not args.no_seed:
        sim.seed_cluster(replicas=args.replicas)
    await sim.start(host=args.host, port=args.port)
    try:
        path = sim.write_kubeconfig(args.kubeconfig, context=args.context)
        log.info(
            "kube-sim ready: %s kubeconfig=%s context=%s profile=%s speed=%s",
            sim.url,
            path,
            args.context,
            args.profile,
            args.speed,
        )
        await stop.wait()
        log.info("kube-sim stopping")
    finally:
        await sim.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
