"""A simulated Kubernetes API server (pods, PVCs, StatefulSets, CloudNativePG Clusters, watches, controllers, faults,
Patroni behind the pod proxy) for tests.

The unmodified kubernetes_asyncio client talks to it over real HTTP on 127.0.0.1. See `KubeSim` for the
in-process API and `python -m tests.kube_sim --help` for running it as its own process.
"""

from __future__ import annotations

from tests.kube_sim.faults import Behaviour, MemberFault
from tests.kube_sim.objects import PROFILES, Profile
from tests.kube_sim.sim import CLUSTER, NAMESPACE, KubeSim
from tests.kube_sim.timing import DEMO, FAST, Speed

__all__ = [
    "CLUSTER", "DEMO", "FAST", "NAMESPACE", "PROFILES", "Behaviour", "KubeSim", "MemberFault", "Profile", "Speed",
]  # fmt: skip
