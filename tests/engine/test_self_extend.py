"""Self-Extend (``--extend self-extend``) against a reference written from the paper's definition, and the runtime's
invariants: a window covering the whole text changes nothing, chunked prefill and one-token decoding agree with
one pass, and the extension is part of the model's identity."""

from __future__ import annotations

import pytest
import torch

from kvlab.cache.kvcache import PADDING_POSITION
from kvlab.cache.layout import LayerSpec
from kvlab.cache.paged import PagedLayerCache
from kvlab.engine import Engine
from kvlab.engine.runner import ModelRunner
from kvlab.engine.self_extend import self_extend_attend
from kvlab.errors import ParameterError
from kvlab.models import load_model
from kvlab.models.extension import SelfExtend, parse_extension
from kvlab.policies import make_policy

THETA = 10000.0


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Standard RoPE at absolute ``positions`` (written out here, independent of kvlab.cache.rope)."""
    dim = x.shape[-1]
    inv_freq = THETA ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[..., None] * inv_freq
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    first, second = x.double().chunk(2, -1)
    return x.double() * cos + torch.cat([-second, first], -1) * sin


def reference(raw_q, raw_k, v, q_pos, k_pos, group, window, scale):
    """The paper's Self-Extend for one KV head group: neighbour scores with true positions where the key is fewer
    than ``window`` back, grouped scores (key p // G, query q // G + W - W // G) elsewhere, causal softmax."""
    near = rope(raw_q, q_pos) @ rope(raw_k, k_pos).T
    far = rope(raw_q, q_pos // group + window - window // group) @ rope(raw_k, k_pos // group).T
    distance = q_pos[:, None] - k_pos[None, :]
    scores = torch.where(distance < window, near, far) * scale
    scores = scores.masked_fill(distance < 0, float("-inf"))
    return torch.softmax(scores, -1) @ v.double()


class FakeLayer:
    def __init__(self, spec, positions):
        self.spec, self.positions = spec, positions


@pytest.mark.parametrize("flash", [True, False])  # False: the explicit path other devices take
def test_attention_matches_the_papers_definition_with_padding_and_eviction_gaps(flash, monkeypatch):
    import kvlab.engine.self_extend as module

    if not flash:
        monkeypatch.setattr(module, "flash_available", lambda query: False)
    torch.manual_seed(0)
    kv_heads, group_heads, dim, group, window = 2, 3, 16, 4, 6
    spec = LayerSpec("full", kv_heads, kv_heads * group_heads, dim, None, rope_theta=THETA)
    # head 0 lost positions 5..9 to eviction; head 1 lost 25..29 and holds one padding slot; 30..34 are the new
    positions = torch.stack([torch.tensor([*range(0, 5), *range(10, 30), *range(30, 35)]),
                             torch.tensor([PADDING_POSITION, *range(1, 25), *range(30, 35)])])
    slots = positions.shape[1]
    q_pos = torch.arange(30, 35)
    raw_k = torch.randn(kv_heads, slots, dim)
    values = torch.randn(kv_heads, slots, dim)
    raw_q = torch.randn(kv_heads * group_heads, len(q_pos), dim)
    stored_k = torch.stack([rope(raw_k[h], positions[h].clamp(min=0)) for h in range(kv_heads)]).float()
    query = torch.stack([rope(raw_q[h], q_pos) for h in range(kv_heads * group_heads)]).float()
    scale = dim ** -0.5
    got = self_extend_attend(query[None], stored_k[None], values[None], FakeLayer(spec, positions), q_pos, scale,
                             SelfExtend(group=group, window=window))[0]
    for head in range(kv_heads * group_heads):
        kv = head // group_heads
        keep = positions[kv] != PADDING_POSITION
        expected = reference(raw_q[head], raw_k[kv][keep], values[kv][keep], q_pos, positions[kv][keep], group,
                             window, scale)
        torch.testing.assert_close(got[head].double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("new", [1, 7])
def test_shared_positions_take_the_flash_split_and_match_the_papers_definition(new, monkeypatch):
    """Every head holds the same slots (a gap evicted from all of them): slots far behind every query go through
    the flash kernel, the rest are scored pair by pair, in blocks, and the merge equals the definition."""
    torch.manual_seed(1)
    kv_heads, group_heads, dim, group, window = 2, 2, 16, 3, 5
    spec = LayerSpec("full", kv_heads, kv_heads * group_heads, dim, None, rope_theta=THETA)
    held = torch.tensor([*range(0, 12), *range(20, 40)])
    q_pos = torch.arange(40, 40 + new)
    slot_positions = torch.cat([held, q_pos])
    positions = slot_positions.expand(kv_heads, -1)
    raw_k = torch.randn(kv_heads, len(slot_positions), dim)
    values = torch.randn(kv_heads, len(slot_positions), dim)
    raw_q = torch.randn(kv_heads * group_heads, new, dim)
    stored_k = torch.stack([rope(raw_k[h], slot_positions) for h in range(kv_heads)]).float()
    query = torch.stack([rope(raw_q[h], q_pos) for h in range(kv_heads * group_heads)]).float()
    scale = dim ** -0.5
    import kvlab.engine.self_extend as module

    calls = []
    real = module._split_attend
    monkeypatch.setattr(module, "_split_attend", lambda *args: calls.append(1) or real(*args))
    monkeypatch.setattr(module, "SCORE_ELEMENTS_PER_BLOCK", 64)  # one query per block
    got = self_extend_attend(query[None], stored_k[None], values[None], FakeLayer(spec, positions), q_pos,
                             scale, SelfExtend(group=group, window=window))[0]
    assert calls, "shared positions should take the split path"
    for head in range(kv_heads * group_heads):
        kv = head // group_heads
        expected = reference(raw_q[head], raw_k[kv], values[kv], q_pos, slot_positions, group, window, scale)
        torch.testing.assert_close(got[head].double(), expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def plain():
    return Engine(load_model("tiny-llama"), chunk_tokens=64)


def extended(group=4, window=32, chunk_tokens=64) -> Engine:
    return Engine(load_model("tiny-llama", extension=SelfExtend(group=group, window=window)),
                  chunk_tokens=chunk_tokens)


def last_logits(engine: Engine, ids: torch.Tensor) -> torch.Tensor:
    return engine.prefill(ids).last_logits


def test_a_window_covering_the_text_changes_nothing(plain):
    ids = torch.randint(3, 200, (150,))
    wide = extended(window=512)
    torch.testing.assert_close(last_logits(wide, ids), last_logits(plain, ids))


def test_grouping_changes_the_output_once_keys_fall_outside_the_window(plain):
    ids = torch.randint(3, 200, (150,))
    assert not torch.allclose(last_logits(extended(window=32), ids), last_logits(plain, ids), atol=1e-4)


def test_chunked_prefill_and_decode_steps_agree_with_one_pass():
    ids = torch.randint(3, 200, (140,))
    one_pass = extended(chunk_tokens=1024).prefill(ids).last_logits
    chunked = extended(chunk_tokens=48)
    torch.testing.assert_close(chunked.prefill(ids).last_logits, one_pass, rtol=1e-4, atol=1e-4)
    stepped = chunked.prefill(ids[:120]).cache
    runner = ModelRunner(chunked.model, stepped)
    for token in ids[120:].tolist():
        logits = runner.step(token)
    torch.testing.assert_close(logits, one_pass, rtol=1e-4, atol=1e-4)


def test_the_extension_widens_the_window_and_changes_the_fingerprint(plain):
    engine = extended(group=4, window=32)
    native = plain.loaded.max_context_tokens
    assert engine.loaded.max_context_tokens == (native - 32) * 4 + 32
    assert engine.loaded.extension == SelfExtend(4, 32)
    assert engine.loaded.fingerprint != plain.loaded.fingerprint
    assert plain.loaded.extension is None


@pytest.mark.parametrize("text, message", [("ntk", "unknown --extend"), ("yarn:factor=1", "factor must be"),
                                           ("self-extend:group=1", "group must be"),
                                           ("self-extend:size=3", "cannot read"),
                                           ("self-extend:window=x", "whole number")])
def test_bad_extension_specs_are_one_line(text, message):
    with pytest.raises(ParameterError, match=message):
        parse_extension(text)


def test_extension_specs_parse():
    assert parse_extension("self-extend") == SelfExtend()
    assert parse_extension("self-extend:group=16:window=512") == SelfExtend(16, 512)
    assert parse_extension("none") is None and parse_extension(None) is None


def test_yarn_interpolates_the_full_attention_rope_and_widens_the_window(plain):
    from kvlab.models.extension import Yarn

    yarn = Engine(load_model("tiny-llama", extension="yarn:factor=4"), chunk_tokens=64)
    assert yarn.loaded.extension == Yarn(4.0)
    assert yarn.loaded.max_context_tokens == 4 * plain.loaded.max_context_tokens
    assert yarn.loaded.config.rope_parameters["rope_type"] == "yarn"
    ids = torch.randint(3, 200, (120,))
    one_pass = yarn.prefill(ids).last_logits
    assert not torch.allclose(one_pass, last_logits(plain, ids), atol=1e-4)
    chunked = Engine(yarn.loaded, chunk_tokens=40).prefill(ids[:100]).cache
    runner = ModelRunner(yarn.model, chunked)
    for token in ids[100:].tolist():
        logits = runner.step(token)
    torch.testing.assert_close(logits, one_pass, rtol=1e-4, atol=1e-4)
    gemma = load_model("tiny-gemma3", extension="yarn:factor=2")
    rope = gemma.config.rope_parameters
    assert rope["full_attention"]["rope_type"] == "yarn" and rope["sliding_attention"]["rope_type"] == "default"


def test_quest_under_self_extend_reads_only_its_pages_and_with_all_of_them_decodes_as_the_full_cache(monkeypatch):
    """Grouped positions no longer make a paged layer read every page: a decode step reads the pages its plain
    and grouped bounds pick (the bounds are checked in tests/cache/test_paged.py), and a budget covering every
    page decodes exactly as the full cache does."""
    engine = extended(group=4, window=32)
    ids = torch.randint(3, 200, (300,))
    prefill = engine.prefill(ids)
    policy = make_policy("quest", dense_layers=0, page_tokens=8, sink_tokens=4, recent_tokens=8)
    read: list[int] = []
    original = PagedLayerCache.grouped_decode_tensors

    def spy(self, query, grouped):
        keys, values, positions = original(self, query, grouped)
        read.append(keys.shape[1])
        return keys, values, positions

    monkeypatch.setattr(PagedLayerCache, "grouped_decode_tensors", spy)

    def decode(cache) -> torch.Tensor:
        runner = ModelRunner(engine.model, cache.fork())
        return torch.stack([runner.step(token) for token in (5, 9, 11)])

    everything, _, _ = engine.compress(prefill, policy, ratio=0.0)
    torch.testing.assert_close(decode(everything), decode(prefill.cache), rtol=1e-4, atol=1e-4)
    assert read and min(read) >= 300
    read.clear()
    eighth, _, _ = engine.compress(prefill, policy, ratio=0.875)
    logits = decode(eighth)
    assert read and max(read) < 300 / 4 and torch.isfinite(logits).all()
