"""kvlab profile end to end on the tiny Llama: measure, store where duo reads, show with a heatmap; and duo's
one-line error when a model has no profile."""

from __future__ import annotations

import json

import pytest

from kvlab.cli import main
from kvlab.models.profile import PROFILE_DIR_ENV, read_profile

MEASURE = ["profile", "--model", "tiny-llama", "--samples", "2", "--length", "64"]


@pytest.fixture
def profiles(tmp_path, monkeypatch):
    folder = tmp_path / "profiles"
    monkeypatch.setenv(PROFILE_DIR_ENV, str(folder))
    return folder


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile-cli") / "doc.txt"
    assert main(["haystack", "--model", "tiny-llama", "--tokens", "300", "--out", str(path)]) == 0
    return path


def test_profile_measures_stores_and_shows(profiles, tiny_llama, capsys):
    assert main(MEASURE) == 0
    out = capsys.readouterr().out
    stored = profiles / f"{tiny_llama.fingerprint}.json"
    assert f"wrote {stored}" in out
    profile = read_profile(stored, expected_fingerprint=tiny_llama.fingerprint)
    assert profile.settings == {"samples": 2, "length_tokens": 64, "needle_tokens": 16, "seed": 0,
                                "haystack": "prose"}
    assert main(MEASURE) == 0 and read_profile(stored) == profile  # deterministic: same data, same scores
    capsys.readouterr()
    assert main(["profile", "--model", "tiny-llama", "--show"]) == 0
    shown = capsys.readouterr().out
    assert "head profile of tiny-llama" in shown and f"heatmap: {stored.with_suffix('.png')}" in shown
    assert stored.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_out_file_and_heatmap_path(profiles, tmp_path, capsys):
    target = tmp_path / "mine.json"
    assert main([*MEASURE, "--out", str(target)]) == 0
    assert target.is_file() and not profiles.exists()  # written where asked, not to the store
    heatmap = tmp_path / "heat.png"
    assert main(["profile", "--model", "tiny-llama", "--show", "--out", str(target), "--heatmap", str(heatmap)]) == 0
    assert heatmap.read_bytes()[:4] == b"\x89PNG"


def test_show_refuses_a_profile_of_another_model(profiles, tmp_path, capsys):
    target = tmp_path / "gemma.json"
    assert main(["profile", "--model", "tiny-gemma3", "--samples", "1", "--length", "64", "--out", str(target)]) == 0
    capsys.readouterr()
    assert main(["profile", "--model", "tiny-llama", "--show", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tiny-gemma3" in err[0] and "kvlab profile --model tiny-llama" in err[0]


def test_duo_without_a_profile_is_one_line(profiles, document, capsys):
    code = main(["ask", "--model", "tiny-llama", "--context-file", str(document), "--question", "Which key?",
                 "--policy", "duo", "--max-new-tokens", "2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no head profile" in err[0] and "kvlab profile --model" in err[0]


def test_duo_through_the_generic_policy_flags(profiles, document, capsys):
    assert main(MEASURE) == 0
    capsys.readouterr()
    assert main(["ask", "--model", "tiny-llama", "--context-file", str(document), "--question", "Which key?",
                 "--policy", "duo", "-p", "retrieval_share=0.5", "-p", "recent_tokens=16", "--max-new-tokens", "2",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["policy"] == "duo" and data["policy_params"]["retrieval_share"] == 0.5
    assert data["kept_tokens"] < data["context_tokens"]


def test_bad_lengths_are_one_line(profiles, capsys):
    assert main(["profile", "--model", "tiny-llama", "--length", "20"]) == 2
    assert "--length" in capsys.readouterr().err
