"""Attention mechanics shared by kvlab's attention paths (``engine.attention``, ``engine.self_extend``) and the
policies that compute attention themselves (``policies.kvzip``): the CPU
flash kernel, which returns each row's log-sum-exp, and whether it can run; and merging attention results computed
over disjoint key sets by those log-sum-exps, so that a part needing no mask never builds one."""

from __future__ import annotations

import torch


def flash_available(query: torch.Tensor) -> bool:
    return query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16) and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def flash_with_lse(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, causal: bool,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU flash kernel (``flash_available``): query (1, H, q, d) over keys, values (1, H, S, d), no mask
    (causal or not) → output (1, H, q, d) and each row's log-sum-exp (1, H, q)."""
    output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, keys, values, 0.0, causal,
                                                                             scale=scale)[:2]
    return output, lse


def merge_by_lse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Softmax-attention outputs (..., rows, d) over disjoint key sets, each with its log-sum-exp (..., rows), as
    one attention over all of them, in fp32. A part where a row saw no key (lse -inf) adds nothing to that row."""
    if len(parts) == 1:
        return parts[0][0].float()
    top = torch.stack([lse for _, lse in parts]).amax(dim=0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.zeros(parts[0][0].shape, dtype=torch.float32, device=top.device)
    norm = torch.zeros_like(top, dtype=torch.float32)
    for out, lse in parts:
        weight = torch.exp(lse.float() - top)
        total += out.float().nan_to_num(0.0) * weight.unsqueeze(-1)
        norm += weight
    return total / norm.unsqueeze(-1)
