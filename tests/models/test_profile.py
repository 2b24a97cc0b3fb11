"""Head profiles: the file format (round trip, verification on read, where it lives) and the copy-attention
measurement (deterministic, in [0, 1], and a head that copies scores highest)."""

import json

import pytest
import torch

from kvlab.cache.layout import LayerSpec
from kvlab.engine.profile import METHOD, CopyAttention, copy_sample, copy_samples, measure_profile
from kvlab.errors import ParameterError
from kvlab.models.profile import (
    FORMAT_VERSION,
    PROFILE_DIR_ENV,
    CorruptProfileError,
    HeadProfile,
    MissingProfileError,
    ProfileError,
    ProfileMismatchError,
    load_profile,
    profile_path,
    profiles_dir,
    read_profile,
    save_profile,
    write_heatmap,
)

VOCAB = torch.arange(3, 259)


def a_profile(fingerprint="00aa11bb22cc33dd", model="tiny-llama") -> HeadProfile:
    return HeadProfile(model, fingerprint, 4, (1, 3), ((0.25, 0.5, 0.125), (1.0, 0.0, 0.3333333333333333)), METHOD,
                       {"samples": 2, "length_tokens": 64, "seed": 0})


def test_round_trip_under_the_cache_root(tmp_path):
    profile = a_profile()
    path = save_profile(profile, root=tmp_path)
    assert path == tmp_path / "profiles" / f"{profile.fingerprint}.json" == profile_path(profile.fingerprint, tmp_path)
    assert load_profile(profile.fingerprint, tmp_path) == profile
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    assert json.loads(path.read_text())["format_version"] == FORMAT_VERSION


def test_default_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(PROFILE_DIR_ENV, raising=False)
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path / "cache"))
    assert profiles_dir() == tmp_path / "cache" / "profiles"
    monkeypatch.setenv(PROFILE_DIR_ENV, str(tmp_path / "elsewhere"))
    assert profiles_dir() == tmp_path / "elsewhere"
    assert profiles_dir(tmp_path / "root") == tmp_path / "root" / "profiles"  # an explicit root wins


def test_a_profile_of_another_model_is_refused_naming_both(tmp_path):
    theirs = a_profile(fingerprint="1111111111111111", model="smollm2-135m")
    path = profile_path("2222222222222222", tmp_path)
    save_profile(theirs, path)
    with pytest.raises(ProfileMismatchError) as caught:
        load_profile("2222222222222222", tmp_path, model="tiny-llama")
    message = str(caught.value)
    assert "1111111111111111" in message and "2222222222222222" in message and "smollm2-135m" in message
    assert "`kvlab profile --model tiny-llama`" in message and "\n" not in message


@pytest.mark.parametrize("damage", ["truncate", "edit", "not-json", "bad-score"])
def test_a_damaged_file_says_to_profile_again(tmp_path, damage):
    path = save_profile(a_profile(), root=tmp_path)
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "edit":
        path.write_text(text.replace("0.125", "0.126"))  # the checksum no longer matches
    elif damage == "not-json":
        path.write_bytes(b"\x89PNG\r\n")
    else:  # a consistent checksum over a score outside [0, 1]
        save_profile(HeadProfile("tiny-llama", a_profile().fingerprint, 2, (0,), ((1.5,),), METHOD), path)
    with pytest.raises(CorruptProfileError) as caught:
        load_profile(a_profile().fingerprint, tmp_path, model="tiny-llama")
    message = str(caught.value)
    assert "damaged" in message and "re-run `kvlab profile --model tiny-llama`" in message and "\n" not in message


def test_a_newer_format_names_the_version(tmp_path):
    path = save_profile(a_profile(), root=tmp_path)
    data = json.loads(path.read_text())
    data["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=f"format version {FORMAT_VERSION + 1}"):
        read_profile(path)


def test_missing_profile_names_the_command(tmp_path):
    with pytest.raises(MissingProfileError, match="`kvlab profile --model tiny-llama`"):
        load_profile("0123456789abcdef", tmp_path, model="tiny-llama")


def test_heatmap_is_a_png(tmp_path):
    path = write_heatmap(a_profile(), tmp_path / "heat.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_copy_samples_hold_the_needle_twice_and_follow_the_seed():
    samples = copy_samples(VOCAB, samples=3, length_tokens=80, needle_tokens=10, seed=4)
    assert [s.needle_start for s in samples] == [0, 30, 60]  # depths 0, 0.5, 1 of a 60-token haystack
    for sample in samples:
        ids = sample.token_ids
        assert ids.numel() == 80 and sample.copy_start == 70
        needle = ids[sample.needle_start:sample.needle_start + 10]
        assert torch.equal(needle, ids[70:]) and len(set(needle.tolist())) == 10
    again = copy_samples(VOCAB, samples=3, length_tokens=80, needle_tokens=10, seed=4)
    other = copy_samples(VOCAB, samples=3, length_tokens=80, needle_tokens=10, seed=5)
    assert all(torch.equal(a.token_ids, b.token_ids) for a, b in zip(samples, again))
    assert not torch.equal(samples[0].token_ids, other[0].token_ids)


def test_a_head_that_copies_gets_the_top_score():
    """Query head 3 (KV head 1) points each copy query at the key of its source position; the rest is noise."""
    spec = LayerSpec("full", kv_heads=3, query_heads=6, head_dim=16)
    generator = torch.Generator().manual_seed(0)
    sample = copy_sample(torch.arange(100, 124), torch.arange(10, 18), depth=0.25)  # needle at 6, copy at 32..39
    total = int(sample.token_ids.numel())
    keys = torch.randn(3, total, 16, generator=generator)
    queries = 0.1 * torch.randn(6, total, 16, generator=generator)
    for position in range(sample.copy_start, total - 1):
        queries[3, position] = 5.0 * keys[1, position - sample.copy_start + sample.needle_start + 1]
    observer = CopyAttention()
    observer.sample = sample
    positions = torch.arange(total)
    observer(0, spec, queries, keys, positions.expand(3, -1), positions, 0.25)
    scores = observer.kv_head_scores([spec])[0]
    assert int(scores.argmax()) == 1
    assert float(scores[1]) > 0.9 and float(scores[[0, 2]].max()) < 0.2


def test_measurement_is_deterministic_and_differs_across_heads(tiny_llama):
    samples = copy_samples(VOCAB, samples=2, length_tokens=96, needle_tokens=12, seed=1)
    first = measure_profile(tiny_llama, samples, settings={"seed": 1})
    second = measure_profile(tiny_llama, copy_samples(VOCAB, samples=2, length_tokens=96, needle_tokens=12, seed=1),
                             settings={"seed": 1})
    assert first == second
    assert first.fingerprint == tiny_llama.fingerprint and first.layers == (0, 1)
    flat = [score for row in first.scores for score in row]
    assert len(flat) == 6 and all(0.0 <= score <= 1.0 for score in flat)
    assert len(set(flat)) > 1


def test_sliding_layers_are_not_profiled(tiny_gemma3):
    samples = copy_samples(VOCAB, samples=1, length_tokens=64, needle_tokens=8)
    profile = measure_profile(tiny_gemma3, samples)
    assert profile.num_layers == 4 and profile.layers == (1, 3) and all(len(row) == 1 for row in profile.scores)


def test_a_sample_too_short_for_its_needle_is_refused():
    with pytest.raises(ParameterError, match="--length"):
        copy_samples(VOCAB, samples=1, length_tokens=20, needle_tokens=10)
