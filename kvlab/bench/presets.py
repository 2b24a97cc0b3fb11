"""Named bench grids. ``quick`` is sized to finish in under 5 minutes on 2 CPU cores with smollm2-135m (15
prefills of ~1K tokens, 105 answers); it is query-aware, SnapKV's own setting, where the policies' differences
show in a short run. ``standard`` is the full suite for a GPU or a long afternoon."""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.errors import ParameterError


@dataclass(frozen=True)
class Preset:
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    samples: int
    policies: tuple[str, ...]
    ratios: tuple[float, ...]
    query_aware: bool = False


PRESETS = {
    "quick": Preset(tasks=("niah_single_2", "niah_multikey_1", "vt"), lengths=(1024,), samples=5,
                    policies=("full", "streaming_llm", "snapkv", "knorm"), ratios=(0.5, 0.75), query_aware=True),
    "standard": Preset(
        tasks=("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2"),
        lengths=(1024, 2048, 4096), samples=10,
        policies=("full", "random", "streaming_llm", "knorm", "tova", "h2o", "snapkv", "pyramidkv", "adakv"),
        ratios=(0.25, 0.5, 0.75, 0.9)),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ParameterError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
