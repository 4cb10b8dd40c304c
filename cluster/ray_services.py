"""Ray Train's own services, started by the driver before any worker so that none of them times out.

Ray Train's controller asks Ray's autoscaling coordinator (a detached actor, one per cluster) for the
run's resources as it starts, and gives that first request 5 s. The controller creates the actor
itself when it is missing; on a busy machine (the workers importing torch beside it) a new actor
process takes longer than that, and the controller logged "Failed to send resource request" with a
traceback into the console and ``ray job logs``. Created and waited for here, it answers at once.
"""

from __future__ import annotations

READY_TIMEOUT_S = 120


def start_autoscaling_coordinator() -> None:
    """Create (or find) Ray's autoscaling coordinator and wait until it is up.

    The helper is Ray Data's internal one (Ray 2.60), the one the controller calls: same name,
    namespace and options, so the controller finds this actor. Where a Ray has moved it, the
    controller creates the actor itself as before (and may warn once)."""
    import ray

    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        return
    ray.get(get_or_create_autoscaling_coordinator().__ray_ready__.remote(), timeout=READY_TIMEOUT_S)
