"""Every decoder architecture kvlab is tested on: a tiny random-weight model of each is prefilled and decoded by the
engine, greedily, and must produce transformers' own ``generate`` tokens with the full cache; a SnapKV-compressed
cache of it must keep its budget and decode. README.md's "Tested architectures" lists exactly ``ARCHITECTURES``
(``test_readme_lists_exactly_these``). Tiny configs (2 layers, 64 wide); about a second each."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers

from kvlab.engine import Engine
from kvlab.models import LoadedModel
from kvlab.models.tiny import INIT_RANGE, _build, byte_tokenizer
from kvlab.policies import make_policy

# model_type: (config class, model class, config fields beyond the shared tiny shape)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    {"head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 16,
                     "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": None}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {"sliding_window": None}),
}
CONTEXT = "The quick brown fox jumps over the lazy dog near the river bank. " * 3
QUESTION = "What jumps?"
NEW_TOKENS = 6


def tiny(model_type: str) -> LoadedModel:
    config_name, model_name, fields = ARCHITECTURES[model_type]
    tokenizer = byte_tokenizer()
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 initializer_range=INIT_RANGE, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    config = getattr(transformers, config_name)(**{**shape, **fields})
    assert config.model_type == model_type
    model = _build(getattr(transformers, model_name), config, seed=0)
    return LoadedModel(name=f"tiny-{model_type}", model=model, tokenizer=tokenizer)


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_prefill_and_decode_match_generate_then_compress(model_type):
    loaded = tiny(model_type)
    engine = Engine(loaded, chunk_tokens=64)  # several prefill chunks
    answer = engine.ask(CONTEXT, QUESTION, make_policy("full"), query_aware=True, max_new_tokens=NEW_TOKENS,
                        ignore_eos=True)
    parts = engine.prompt(CONTEXT, QUESTION)
    ids = torch.cat([parts.prefix_ids, parts.suffix_ids])[None]
    with torch.inference_mode():
        output = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                       min_new_tokens=NEW_TOKENS, do_sample=False)
    assert answer.token_ids == output[0, ids.shape[1]:].tolist()

    compressed = engine.ask(CONTEXT, QUESTION, make_policy("snapkv"), ratio=0.5, max_new_tokens=NEW_TOKENS,
                            ignore_eos=True)
    assert compressed.kept_tokens == pytest.approx(compressed.context_tokens / 2, abs=1)
    assert compressed.kv_bytes_kept < answer.kv_bytes_kept and len(compressed.token_ids) == NEW_TOKENS


def test_readme_lists_exactly_these():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Tested architectures", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([a-z0-9_]+)` \| `(\w+ForCausalLM)` \|", section, re.MULTILINE)
    assert listed == [(model_type, classes[1]) for model_type, classes in ARCHITECTURES.items()]
