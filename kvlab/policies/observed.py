"""Attention of the observation-window queries over a layer's kept keys (shared by SnapKV, PyramidKV, TOVA, ...)."""

from __future__ import annotations

import torch

from kvlab.cache.kvcache import PADDING_POSITION
from kvlab.errors import KvlabError
from kvlab.policies.base import ScoreInputs


def window_attention(inputs: ScoreInputs, last_queries: int | None = None) -> torch.Tensor:
    """(query_heads, W, slots) softmax probabilities of the last ``last_queries`` window queries (all if None).

    Masked like the model's own attention: a query sees slots at or before its position; padding is never seen.
    """
    observation = inputs.observation
    if observation is None or observation.window_queries is None:
        raise KvlabError("this policy needs observation-window queries; "
                         "prefill with the policy's observation_request()")
    queries = observation.window_queries.float()
    query_positions = observation.window_positions
    assert query_positions is not None  # recorded together with window_queries
    if last_queries is not None:
        queries, query_positions = queries[:, -last_queries:], query_positions[-last_queries:]
    spec = inputs.spec
    keys = inputs.keys.float().repeat_interleave(spec.group_size, dim=0)  # (query_heads, slots, d)
    positions = inputs.positions.repeat_interleave(spec.group_size, dim=0)
    logits = queries @ keys.transpose(1, 2) * observation.scaling  # (query_heads, W, slots)
    visible = (positions[:, None, :] <= query_positions[None, :, None]) & (positions[:, None, :] != PADDING_POSITION)
    return logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
