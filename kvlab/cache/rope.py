"""Standard RoPE (HF's rotate-half layout, inverse frequencies theta^(-2i/head_dim)), for code that moves keys or
queries to other positions after the model rotated them: Expected Attention undoes the rotation, Self-Extend
shifts keys and queries to grouped positions. Rotations compose, so a vector rotated at p is moved to p + d by
rotating it by d."""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (*positions.shape, head_dim) float32 of standard RoPE, computed as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rotate_by(x: torch.Tensor, shift: torch.Tensor, theta: float) -> torch.Tensor:
    """``x`` (..., n, head_dim) rotated by ``shift`` positions (broadcastable to (..., n)), in x's dtype. The
    angles are computed at ``shift``'s own shape (pass one row when every head moves alike) and each half of the
    head is written once: x1 cos - x2 sin, x2 cos + x1 sin (rotate-half), with no (..., n, head_dim) cos or sin."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, x.shape[-1], 2, dtype=torch.float, device=x.device) / x.shape[-1]))
    angles = shift.float()[..., None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    source = x.float()
    first, second = source[..., :half], source[..., half:]
    rotated = torch.empty(torch.broadcast_shapes(source.shape, (*cos.shape[:-1], x.shape[-1])), device=x.device)
    torch.mul(first, cos, out=rotated[..., :half]).addcmul_(second, sin, value=-1.0)
    torch.mul(second, cos, out=rotated[..., half:]).addcmul_(first, sin)
    return rotated.to(x.dtype)


def grouped_shift(positions: torch.Tensor, group: int) -> torch.Tensor:
    """How far Self-Extend moves a key at position p: to its grouped position p // group (Jin et al., 2024).
    Shared by the attention (``engine.self_extend``) and the page bounds that must cover it (``cache.paged``)."""
    return positions // group - positions
