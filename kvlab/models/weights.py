"""Weight-only int8 quantization of a causal LM's linear layers, for faster decoding on CPU.

This changes the model (its weights), not the KV cache; ``kvlab.cache.quant`` compresses the cache, and the two
can be combined.

The scheme follows gpt-fast's weight-only int8 quantization (pytorch-labs/gpt-fast, ``quantize.py``,
``WeightOnlyInt8QuantHandler``): every output channel (one row of a Linear's ``(out, in)`` weight) is rounded
symmetrically to int8 with one float scale, and the matmul runs on the int8 codes with the scales applied to the
output, through ``torch.ops.aten._weight_int8pack_mm`` on CPU where it helps, otherwise as
``F.linear(x, codes.to(x.dtype)) * scales``. Details and deviations:

  - Per-channel symmetric rounding: ``scale = max|w_row| / 127``, rounded *up* to a bfloat16-representable value
    (then stored in the activation dtype), and ``code = round(w / scale)`` in [-127, 127] (no -128, no zero
    point). Every weight's error stays within ``scale / 2``; because the scale is exactly representable in bf16,
    the bf16 kernel and the fp32 fallback multiply by the same numbers.
  - Quantized: every ``nn.Linear`` of the text decoder (attention q/k/v/o, MLP gate/up/down) and the lm_head.
    Not quantized: the token embedding, norms, rotary tables, biases (kept in full precision) and anything outside
    the text decoder (e.g. a vision tower). A lm_head tied to the embedding (SmolLM2, Gemma 3) gets its own int8
    copy; the embedding keeps its full-precision values and ``config.tie_word_embeddings`` is set to False so that
    transformers does not re-tie them. The model's total bytes therefore drop less than the linears' bytes.
  - Kernel choice, measured on SmolLM2-135M on a 2-core AVX-512 Xeon, torch 2.13, 2 threads (one decode step
    through all 211 Linears: fp32 ``F.linear`` 22.7 ms). ``_weight_int8pack_mm`` has a vectorized CPU kernel only
    for bf16 activations: called with fp32 activations, as gpt-fast does for an fp32 model, it took 49 ms (2x
    *slower* than fp32; fp16 activations are slower still). So fp32 inputs go through the op as a bf16 copy, with
    the output cast back: 17.0 ms (1.35x faster; 1.6x with 1 thread), at a small cost in fidelity (mean KL to the
    fp32 model 0.0042 nats vs 0.0038 for the same int8 weights computed in fp32). The dequantizing fallback took
    33 ms. The op is a GEMV-style kernel: beyond ``INT8PACK_MAX_ROWS`` rows (prefill) it is slower than fp32 GEMM,
    so larger inputs take the fallback, which dequantizes the codes once per call and runs fp32 GEMM (prefill at
    about fp32 speed, with exact int8-weight numerics). The op's bf16 path reads out of bounds (it crashed in
    testing) when ``in_features`` is not a multiple of 16; such layers always take the fallback.
    Rejected: ``torch.ao`` dynamic int8 linear (fbgemm/x86/onednn) is faster on large shapes but also quantizes
    the activations per tensor, which wrecked quality (mean KL 0.88 nats, 57% greedy agreement), and that
    eager-mode API is deprecated in favour of torchao; ``_weight_int4pack_mm_for_cpu`` (group 32) was 2x faster
    again but is int4 (mean KL 0.051, 87% agreement), a different scheme.
  - Off CPU (or for fp16 inputs) every call takes the fallback; gpt-fast relies on ``torch.compile`` to fuse it,
    which kvlab does not do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvlab.errors import ParameterError

WEIGHT_SCHEMES = ("fp", "int8")
INT8_MAX = 127
# Inputs with more rows than this (prefill) take the dequantize-then-GEMM path, which is faster there.
INT8PACK_MAX_ROWS = 8
# _weight_int8pack_mm's bf16 CPU kernel needs in_features to be a multiple of this (it reads past the end otherwise).
INT8PACK_BF16_ALIGN = 16
KERNELS = ("auto", "int8pack", "dequant")
_INT8PACK_MM = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
_INT8PACK_INPUT_DTYPES = (torch.float32, torch.bfloat16)


def check_weight_scheme(scheme: str) -> str:
    """Return ``scheme`` if it is one of ``WEIGHT_SCHEMES``; otherwise raise ``ParameterError``."""
    if scheme not in WEIGHT_SCHEMES:
        raise ParameterError(f"unknown weight scheme {scheme!r}; use one of {', '.join(WEIGHT_SCHEMES)}")
    return scheme


def _round_up_to_bf16(values: torch.Tensor) -> torch.Tensor:
    """Positive finite fp32 values rounded up to the nearest bfloat16-representable value (returned as fp32)."""
    bits = values.to(torch.float32).contiguous().view(torch.int32)
    rounded = (bits + 0xFFFF) & ~0xFFFF
    return rounded.view(torch.float32)


def quantize_int8_per_channel(weight: torch.Tensor, scale_dtype: torch.dtype | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 rounding of a ``(out, in)`` weight.

    Returns ``codes`` (int8, ``(out, in)``, values in [-127, 127]) and ``scales`` (``(out,)``, in ``scale_dtype``,
    default the weight's dtype), such that ``codes * scales[:, None]`` approximates ``weight`` to within
    ``scales / 2`` per element. The weight is read, never modified.
    """
    if weight.dim() != 2:
        raise ParameterError(f"expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}; "
                             "pass a Linear's weight")
    scale_dtype = scale_dtype or weight.dtype
    w = weight.detach().to(torch.float32)
    scales = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    scales = _round_up_to_bf16(scales)
    codes = torch.round(w / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scales.to(scale_dtype)


class Int8WeightLinear(nn.Module):
    """A Linear whose weight is stored as int8 codes with one scale per output channel.

    Buffers: ``weight`` int8 ``(out_features, in_features)``; ``scales`` ``(out_features,)`` in the activation dtype;
    ``bias`` ``(out_features,)`` or None. ``forward`` takes ``(..., in_features)`` and returns
    ``(..., out_features)`` in the input's dtype, equal (to float rounding) to ``F.linear(x, dequantized, bias)``.

    ``kernel`` picks the matmul: ``"auto"`` (default) uses ``_weight_int8pack_mm`` for CPU fp32/bf16 inputs of at
    most ``INT8PACK_MAX_ROWS`` rows and the dequantizing fallback otherwise; ``"int8pack"`` uses the op whenever it
    can run (CPU, fp32/bf16 input, op present, aligned ``in_features``); ``"dequant"`` always uses the fallback.
    fp32 inputs go through the op as bf16 (see the module docstring), so that path rounds activations to bf16.
    """

    weight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.kernel = "auto"
        self._int8pack_aligned = self.in_features % INT8PACK_BF16_ALIGN == 0
        self._auto_max_numel = INT8PACK_MAX_ROWS * self.in_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._bf16_scales: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightLinear:
        """Quantize ``linear`` (left unchanged) into a new module on its device; scales take the weight's dtype."""
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     dtype=weight.dtype, device=weight.device)
        codes, scales = quantize_int8_per_channel(weight)
        module.weight.copy_(codes)
        module.scales.copy_(scales)
        if linear.bias is not None:
            assert module.bias is not None  # built with bias=True above
            module.bias.copy_(linear.bias.detach())
        return module

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``(out, in)`` weight this module computes with: ``codes * scales[:, None]``, in ``dtype``."""
        dtype = dtype or self.scales.dtype
        return self.weight.to(torch.float32).mul(self.scales.to(torch.float32)[:, None]).to(dtype)

    def nbytes(self) -> int:
        """Bytes of the codes, scales and bias."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scales, self.bias) if t is not None)

    def choose_kernel(self, x: torch.Tensor) -> str:
        """``"int8pack"`` or ``"dequant"``: the path ``forward`` takes for input ``x``."""
        kernel = self.kernel
        if kernel == "dequant":
            return "dequant"
        if kernel not in KERNELS:
            raise ParameterError(f"unknown kernel {kernel!r}; use one of {', '.join(KERNELS)}")
        usable = (_INT8PACK_MM is not None and self._int8pack_aligned and x.is_cpu
                  and x.dtype in _INT8PACK_INPUT_DTYPES and x.numel() > 0
                  and (kernel == "int8pack" or x.numel() <= self._auto_max_numel)
                  and not (x.requires_grad and torch.is_grad_enabled()))
        return "int8pack" if usable else "dequant"

    def _kernel_scales(self) -> torch.Tensor:
        """``scales`` as bf16 for the op, cached until the buffer is replaced or modified in place."""
        scales = self.scales
        key = (scales.data_ptr(), scales._version, scales.dtype)
        if self._bf16_scales is None or self._bf16_scales[0] != key:
            self._bf16_scales = (key, scales.to(torch.bfloat16))
        return self._bf16_scales[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.choose_kernel(x) == "int8pack":
            rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            assert _INT8PACK_MM is not None  # choose_kernel picks int8pack only when the op exists
            out = _INT8PACK_MM(rows, self.weight, self._kernel_scales())
            out = out.to(x.dtype).reshape(x.shape[:-1] + (self.out_features,))
        else:
            out = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight=int8 per-channel, scales={str(self.scales.dtype).removeprefix('torch.')}, "
                f"kernel={self.kernel}")


def _linear_bytes(linear: nn.Linear) -> int:
    return sum(t.numel() * t.element_size() for t in (linear.weight, linear.bias) if t is not None)


def _model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights are shared)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def _target_linears(model: nn.Module) -> list[nn.Linear]:
    """The text decoder's Linears and the output embedding (lm_head), each once, in module order."""
    roots = []
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    roots.append(decoder if isinstance(decoder, nn.Module) else model)
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if isinstance(head, nn.Linear):
        roots.append(head)
    targets: dict[int, nn.Linear] = {}
    for root in roots:
        for module in root.modules():
            if isinstance(module, nn.Linear):
                targets.setdefault(id(module), module)
    return list(targets.values())


def _untie(model: nn.Module, targets: list[nn.Linear]) -> bool:
    """Stop transformers from re-tying any target's weight to another parameter; True if one was tied."""
    target_weights = {id(linear.weight) for linear in targets}
    target_names = {name for name, param in model.named_parameters(remove_duplicate=False)
                    if id(param) in target_weights}
    target_storages = {linear.weight.untyped_storage().data_ptr() for linear in targets}
    target_modules = {id(linear) for linear in targets}
    tied = any(param.untyped_storage().data_ptr() in target_storages
               for module in model.modules() if id(module) not in target_modules
               for param in module.parameters(recurse=False))
    if not tied:
        return False
    for prefix, module in model.named_modules():
        config = getattr(module, "config", None)
        for cfg in {id(c): c for c in _configs(config)}.values():
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
        mapping = getattr(module, "all_tied_weights_keys", None)
        if isinstance(mapping, dict):
            full = (lambda key, prefix=prefix: f"{prefix}.{key}" if prefix else key)
            for key, value in list(mapping.items()):
                if full(key) in target_names or full(value) in target_names:
                    mapping.pop(key)
    return True


def _configs(config) -> list:
    if config is None:
        return []
    found = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        found.append(get_text_config(decoder=True))
    return found


def quantize_weights(model: nn.Module, scheme: str = "int8") -> dict:
    """Replace the model's decoder Linears and lm_head by ``Int8WeightLinear`` in place (scheme ``"int8"``).

    This changes the model (its weights), not the KV cache. Scheme ``"fp"`` changes nothing. The model stays usable
    by transformers ``forward``/``generate``; a tied lm_head is untied (the embedding keeps its values).

    Returns ``{"scheme", "layers"`` (Linears converted), ``"bytes_before"``, ``"bytes_after"`` (bytes of those
    Linears' weights and biases, before and after; a tied lm_head counts its full weight), ``"model_bytes_before"``,
    ``"model_bytes_after"`` (all parameters and buffers, shared storage counted once), ``"untied_lm_head"}``.
    Raises ``ParameterError`` for an unknown scheme.
    """
    check_weight_scheme(scheme)
    targets = _target_linears(model)
    model_bytes_before = _model_bytes(model)
    bytes_before = sum(_linear_bytes(linear) for linear in targets)
    report = {"scheme": scheme, "layers": 0, "bytes_before": bytes_before, "bytes_after": bytes_before,
              "model_bytes_before": model_bytes_before, "model_bytes_after": model_bytes_before,
              "untied_lm_head": False}
    if scheme == "fp" or not targets:
        return report

    untied = _untie(model, targets)
    with torch.no_grad():
        replacements = {id(linear): Int8WeightLinear.from_linear(linear) for linear in targets}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    report.update(layers=len(replacements), bytes_after=sum(m.nbytes() for m in replacements.values()),
                  model_bytes_after=_model_bytes(model), untied_lm_head=untied)
    return report


def weight_fidelity(reference_model: nn.Module, quantized_model: nn.Module, token_ids: torch.Tensor) -> dict:
    """How closely ``quantized_model`` follows ``reference_model`` on the same tokens (one forward each).

    This measures a change to the model (its weights), not to the KV cache. ``token_ids`` is a LongTensor of shape
    ``(seq,)`` or ``(batch, seq)``; each model runs once over all positions without a cache, and the logits
    ``(batch, seq, vocab)`` are compared in fp32 at every position.

    Returns ``{"positions"`` (batch * seq), ``"kl_mean"`` (mean over positions of KL(reference || quantized) of the
    next-token distributions, in nats), ``"kl_max"`` (nats), ``"top1_agreement"`` (fraction in [0, 1] of positions
    whose greedy argmax tokens agree)``}``.
    """
    if token_ids.dim() not in (1, 2) or token_ids.numel() == 0 or token_ids.dtype not in (torch.int64, torch.int32):
        raise ParameterError(f"token_ids must be a non-empty (seq,) or (batch, seq) integer tensor, "
                             f"got shape {tuple(token_ids.shape)} of {token_ids.dtype}")
    ids = token_ids.reshape(1, -1) if token_ids.dim() == 1 else token_ids

    def logits(model: nn.Module) -> torch.Tensor:
        device = next(model.parameters()).device
        with torch.inference_mode():
            out = model(input_ids=ids.to(device=device, dtype=torch.long), use_cache=False)
        return out.logits.to(device="cpu", dtype=torch.float32).reshape(-1, out.logits.shape[-1])

    reference = torch.log_softmax(logits(reference_model), dim=-1)
    quantized = torch.log_softmax(logits(quantized_model), dim=-1)
    probs = reference.exp()
    terms = torch.where(probs > 0, probs * (reference - quantized), torch.zeros_like(probs))
    kl = terms.sum(dim=-1).clamp_min(0.0)
    agree = (reference.argmax(dim=-1) == quantized.argmax(dim=-1)).to(torch.float32)
    return {"positions": int(kl.numel()), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float(agree.mean())}
