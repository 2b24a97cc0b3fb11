"""Head profiles: one score per (full-attention layer, KV head) of a model, measured once (``kvlab profile``) and
read by policies that treat heads differently (``duo``).

A profile is a small JSON file, ``<root>/profiles/<fingerprint>.json`` (root: ``$KVLAB_CACHE_DIR``, see
``models.convert.cache_root``; ``$KVLAB_PROFILE_DIR`` names the folder itself, for tests or shared profiles). It
carries a format tag and version, the model's name and fingerprint, how it was measured and a SHA-256 of its own
content. It is written atomically and verified on read: a damaged file, a newer format or a profile of another
model each raise one line that names the fix. Sliding-window layers are not profiled (their window is fixed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlab.errors import KvlabError
from kvlab.fileio import atomic_write_bytes, atomic_write_text
from kvlab.models.convert import cache_root

FORMAT = "kvlab-head-profile"
FORMAT_VERSION = 1
PROFILE_DIR_ENV = "KVLAB_PROFILE_DIR"


class ProfileError(KvlabError):
    """A head profile that is missing or cannot be used; the message names the fix."""


class MissingProfileError(ProfileError):
    pass


class CorruptProfileError(ProfileError):
    pass


class ProfileMismatchError(ProfileError):
    pass


@dataclass(frozen=True)
class HeadProfile:
    """``scores[i][h]``: the score of KV head ``h`` of full-attention layer ``layers[i]``, in [0, 1] (higher: the
    head retrieves). ``num_layers`` counts every decoder layer, sliding ones included; ``method`` and ``settings``
    say how the scores were measured."""

    model: str
    fingerprint: str
    num_layers: int
    layers: tuple[int, ...]
    scores: tuple[tuple[float, ...], ...]
    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": self.model,
                "fingerprint": self.fingerprint, "num_layers": self.num_layers, "layers": list(self.layers),
                "scores": [list(row) for row in self.scores], "method": self.method, "settings": self.settings}
        return {**body, "sha256": _digest(body)}

    def ranked_heads(self) -> list[tuple[int, int, float]]:
        """(layer, head, score), best first; ties keep layer-then-head order."""
        heads = [(layer, head, score) for layer, row in zip(self.layers, self.scores) for head, score in enumerate(row)]
        return sorted(heads, key=lambda item: -item[2])


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def profiles_dir(root: Path | str | None = None) -> Path:
    """``root/profiles``; without ``root``: ``$KVLAB_PROFILE_DIR`` if set, else the cache root's ``profiles``."""
    if root is not None:
        return Path(root).expanduser() / "profiles"
    configured = os.environ.get(PROFILE_DIR_ENV)
    return Path(configured).expanduser() if configured else cache_root() / "profiles"


def profile_path(fingerprint: str, root: Path | str | None = None) -> Path:
    return profiles_dir(root) / f"{fingerprint}.json"


def save_profile(profile: HeadProfile, path: Path | str | None = None, *, root: Path | str | None = None) -> Path:
    """Write ``profile`` atomically to ``path`` (default: where ``load_profile`` looks for its model)."""
    target = Path(path).expanduser() if path is not None else profile_path(profile.fingerprint, root)
    atomic_write_text(target, _readable_json(profile.to_json()))
    return target


def _readable_json(data: dict[str, Any]) -> str:
    """One key per line, one layer's scores per line."""
    def value(key: str, item: Any) -> str:
        if key == "scores":
            return "[\n  " + ",\n  ".join(json.dumps(row) for row in item) + "\n ]"
        return json.dumps(item)

    return "{\n" + ",\n".join(f" {json.dumps(key)}: {value(key, item)}" for key, item in data.items()) + "\n}\n"


def load_profile(fingerprint: str, root: Path | str | None = None, *, model: str | None = None) -> HeadProfile:
    """The stored profile of the model with ``fingerprint``; ``model`` (its name) only improves the messages."""
    path = profile_path(fingerprint, root)
    if not path.is_file():
        raise MissingProfileError(f"no head profile for {model or 'this model'} (fingerprint {fingerprint}) in "
                                  f"{path.parent}; measure one with `kvlab profile --model {model or '<this model>'}`")
    return read_profile(path, expected_fingerprint=fingerprint, model=model)


def read_profile(path: Path | str, *, expected_fingerprint: str | None = None,
                 model: str | None = None) -> HeadProfile:
    """Read and verify a profile file; with ``expected_fingerprint``, refuse a profile of another model."""
    path = Path(path).expanduser()
    rerun = f"re-run `kvlab profile --model {model or 'MODEL'}`"
    if not path.is_file():
        raise MissingProfileError(f"head profile {path} does not exist; {rerun}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a kvlab head profile")
        version = data.get("format_version")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ProfileError(f"head profile {path} has format version {version}, newer than this kvlab's "
                               f"({FORMAT_VERSION}); upgrade kvlab or {rerun}")
        body = {key: value for key, value in data.items() if key != "sha256"}
        if data.get("sha256") != _digest(body):
            raise ValueError("its checksum does not match its content")
        profile = _from_json(data)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CorruptProfileError(f"head profile {path} is damaged ({reason}); {rerun}") from None
    if expected_fingerprint is not None and profile.fingerprint != expected_fingerprint:
        raise ProfileMismatchError(
            f"head profile {path} was measured for {profile.model} (fingerprint {profile.fingerprint}), not for "
            f"{model or 'the loaded model'} (fingerprint {expected_fingerprint}); run "
            f"`kvlab profile --model {model or 'MODEL'}`")
    return profile


def _from_json(data: dict[str, Any]) -> HeadProfile:
    layers = tuple(int(layer) for layer in data["layers"])
    scores = tuple(tuple(float(score) for score in row) for row in data["scores"])
    if len(scores) != len(layers) or not layers or len({len(row) for row in scores}) != 1 or not scores[0]:
        raise ValueError("scores do not match its layers")
    if not all(math.isfinite(score) and 0.0 <= score <= 1.0 for row in scores for score in row):
        raise ValueError("a score outside [0, 1]")
    num_layers = int(data["num_layers"])
    if sorted(set(layers)) != list(layers) or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError("layer indices out of order or range")
    settings = data.get("settings", {})
    if not isinstance(settings, dict):
        raise ValueError("settings is not an object")
    return HeadProfile(str(data["model"]), str(data["fingerprint"]), num_layers, layers, scores, str(data["method"]),
                       settings)


def write_heatmap(profile: HeadProfile, path: Path | str) -> Path:
    """A layers x KV heads heatmap PNG of the scores (colour-blind-safe cividis; sliding layers left blank)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    heads = len(profile.scores[0])
    grid = np.full((profile.num_layers, heads), np.nan)
    for layer, row in zip(profile.layers, profile.scores):
        grid[layer] = row
    figure, axes = plt.subplots(figsize=(max(3.5, 0.5 * heads + 2.5), max(2.5, 0.25 * profile.num_layers + 1.5)))
    cmap = plt.get_cmap("cividis").with_extremes(bad="#dddddd")
    image = axes.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", interpolation="nearest",
                        vmin=0.0, vmax=max(float(np.nanmax(grid)), 1e-6))
    axes.set_xlabel("KV head")
    axes.set_ylabel("layer (grey: sliding, not profiled)" if len(profile.layers) < profile.num_layers else "layer")
    axes.set_xticks(range(heads))
    axes.set_yticks(range(profile.num_layers))
    axes.set_title(f"{profile.model}: head profile ({profile.method})")
    figure.colorbar(image, ax=axes, label="score")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    target = Path(path).expanduser()
    atomic_write_bytes(target, buffer.getvalue())
    return target
