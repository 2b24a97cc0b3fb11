"""A stable identity for a loaded model: the config, a sample of every weight tensor, the tokenizer and the dtype."""

from __future__ import annotations

import hashlib
import json

import torch

SAMPLED_VALUES_PER_TENSOR = 4096


def model_fingerprint(model, tokenizer) -> str:
    """SHA-256 hex digest (first 16 chars) that changes when the config, weights, tokenizer or dtype change.

    Hashing every weight would cost seconds per load; hashing each tensor's name, shape and first 4096 values
    distinguishes any two real checkpoints at a cost of milliseconds.
    """
    digest = hashlib.sha256()
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "_attn_implementation", "_commit_hash", "transformers_version"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        sample = tensor.detach().reshape(-1)[:SAMPLED_VALUES_PER_TENSOR].to("cpu", torch.float32)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    payload = json.dumps([vocab, tokenizer.chat_template, tokenizer.all_special_tokens], default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
