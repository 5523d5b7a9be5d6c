"""What the HA layer says about a cluster's members, for every pg-* job type's checks and waits.

Labels say who the operator thinks is primary and whether a member runs; Patroni (GET /cluster through the pod
proxy) says more: each member's state (`streaming`, `creating replica`, ...), timeline and lag. A job asks Patroni
where the profile has it; where it has none (CloudNativePG), or Patroni does not answer, `ha_view` says why, and the
job goes by the labels and writes that reason into its detail.
"""

from __future__ import annotations

from collections.abc import Sequence

from jobs.pgkube.kube import Kube, KubeError, PodView
from jobs.pgkube.patroni import ClusterView, Member, Patroni, PatroniRefused
from jobs.pgkube.profiles import Profile
from service.jobtypes import TransientError


def not_streaming(member: Member, leader: Member, max_lag: int) -> str | None:
    """Why `member` is not a replica streaming from `leader` within the lag limit; None when it is."""
    if member.leads:
        return f"{member.name} is the leader"
    if member.state != "streaming":
        return f"{member.name} is {member.state or 'in no state'}, not streaming"
    if member.timeline != leader.timeline:
        return f"{member.name} is on timeline {member.timeline}, the leader {leader.name} on {leader.timeline}"
    if member.lag is None:
        return f"{member.name}'s lag is unknown"
    if member.lag > max_lag:
        return f"{member.name} lags {member.lag} bytes behind the leader, more than max_lag_bytes {max_lag}"
    return None


async def patroni_view(kube: Kube, namespace: str, profile: Profile, pods: Sequence[PodView]) -> ClusterView:
    """GET /cluster, asking the labelled primary first, then the other members (a member being re-cloned or
    terminating is the least likely to answer)."""
    ordered = sorted(pods, key=lambda p: (not profile.is_primary(p), p.deleting, p.name))
    return await Patroni(kube, namespace).cluster([p.name for p in ordered])


async def ha_view(kube: Kube, namespace: str, profile: Profile, pods: Sequence[PodView]) -> ClusterView | str:
    """Patroni's view of the cluster, or why there is none: the profile's operator has no Patroni, or no member's
    Patroni answered (nothing listens, the Role lacks `pods/proxy`, the API server refused)."""
    if not profile.patroni:
        return f"profile {profile.name} has no Patroni"
    try:
        return await patroni_view(kube, namespace, profile, pods)
    except (TransientError, KubeError, PatroniRefused) as exc:
        return f"Patroni did not answer ({exc})"
