"""The Ray Serve request router of ``kvlab serve --replicas`` (``replicas.py``): a request goes to the replica the
frontend names in it (``Forwarded.prefer``: the one that answered for its document or conversation before) while
that replica is running and takes requests; otherwise, and for requests without a preference, to the less loaded of
two random replicas, as Serve's default router does.

Serve's model multiplexing would also route by id, but a replica's ids reach the routers through the controller
some 0.1-0.5 s after it loads them, so the first question right after a document upload went to a random replica.
The frontend knows the holder the moment the upload's answer passes through it, so it decides, and this router only
follows. It imports ray at import time: only ``replicas.build`` imports it.
"""

from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from kvlab.server.replicas import Forwarded


class AffinityRouter(RequestRouter):
    """Ranks: the preferred replica alone first (when it is a candidate), then two random others. Serve probes a
    rank's queue lengths and takes the least loaded replica that accepts, moving to the next rank when none does."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        prefer = _preferred(pending_request)
        preferred = [replica for replica in candidate_replicas if prefer and replica.replica_id.unique_id == prefer]
        others = [replica for replica in candidate_replicas if replica not in preferred]
        ranks = [preferred] if preferred else []
        if others:
            ranks.append(random.sample(others, min(2, len(others))))
        return ranks


def _preferred(pending_request: PendingRequest | None) -> str:
    if pending_request is None:
        return ""
    return next((arg.prefer for arg in pending_request.args if isinstance(arg, Forwarded)), "")
