"""Fault injection: every damaged, foreign, mismatched or missing cache file is refused with the right error class
and a one-line message, and never loads."""

import dataclasses
import hashlib
import json
import random
import struct

import pytest
import safetensors.torch
import torch

from kvlab.cache.quant import quantize_cache
from kvlab.errors import (
    CacheChecksumError,
    CacheFileError,
    CacheMetadataError,
    CacheMismatchError,
    CacheVersionError,
    CorruptCacheError,
    KvlabError,
    MissingCacheFileError,
)
from kvlab.models.fingerprint import tokenizer_fingerprint
from kvlab.store import load_cache, read_meta, save_cache
from kvlab.store.tensors import payload_sha256


@pytest.fixture(scope="module")
def files(tmp_path_factory, llama_snapkv):
    """A plain and an int4 cache file of the same model, as bytes, plus a directory to write variants into."""
    directory = tmp_path_factory.mktemp("faults")
    run = llama_snapkv
    save_cache(directory / "plain.kv", run.cache, run.meta(), run.result.last_logits)
    quantized = quantize_cache(run.cache, "int4", group_size=16, residual_tokens=8)
    save_cache(directory / "int4.kv", quantized, run.meta(quantized))
    return directory


def refused(path, error_class, **kwargs):
    """Load must raise ``error_class`` with a one-line message naming the file, with no chained traceback."""
    with pytest.raises(error_class) as caught:
        load_cache(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    error = caught.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return message


def write_variant(files, name: str, data: bytes):
    path = files / name
    path.write_bytes(data)
    return path


def header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def flip_offsets(data: bytes, count=60):
    """A deterministic spread: every byte of the length prefix, then samples of the JSON header and the payload."""
    rng = random.Random(0)
    end = header_end(data)
    return list(range(8)) + sorted(rng.sample(range(8, end), 26)) + sorted(rng.sample(range(end, len(data)), 26))


@pytest.mark.parametrize("name", ["plain.kv", "int4.kv"])
@pytest.mark.parametrize("mask", [0xFF, 0x01, 0x20])
def test_flipped_bytes_are_refused(files, name, mask):
    data = (files / name).read_bytes()
    offsets = flip_offsets(data)
    assert len(offsets) == 60
    for offset in offsets:
        damaged = bytearray(data)
        damaged[offset] ^= mask
        path = write_variant(files, f"flip-{mask}-{name}", bytes(damaged))
        with pytest.raises((CorruptCacheError, CacheVersionError), match=str(path)):
            load_cache(path)


@pytest.mark.parametrize("cut", ["zero", "seven", "header-1", "half", "size-1"])
def test_truncated_files_are_refused(files, cut):
    data = (files / "plain.kv").read_bytes()
    length = {"zero": 0, "seven": 7, "header-1": header_end(data) - 1, "half": len(data) // 2,
              "size-1": len(data) - 1}[cut]
    path = write_variant(files, f"cut-{cut}.kv", data[:length])
    message = refused(path, CorruptCacheError)
    assert "recreate it with `kvlab compress`" in message
    with pytest.raises(CorruptCacheError):
        read_meta(path)


def test_appended_garbage_is_refused(files):
    path = write_variant(files, "tail.kv", (files / "plain.kv").read_bytes() + b"\x00garbage")
    assert "truncated or corrupted" in refused(path, CorruptCacheError)


def raw_file(path, tensors, meta_dict):
    """Write a file as a careful forger would: both checksums recomputed, so only validation can refuse it."""
    meta_dict = dict(meta_dict)
    meta_dict.pop("meta_sha256", None)
    meta_dict["payload_sha256"] = payload_sha256(tensors)
    canonical = json.dumps(meta_dict, sort_keys=True, separators=(",", ":"))
    meta_dict["meta_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    path.write_bytes(safetensors.torch.save(tensors, metadata={"kvlab": json.dumps(meta_dict)}))
    return path


def parts(path):
    """(tensors, metadata dict) of a file."""
    data = path.read_bytes()
    header = json.loads(data[8:header_end(data)])
    return safetensors.torch.load(data), json.loads(header["__metadata__"]["kvlab"])


def test_swapped_metadata_fails_the_payload_checksum(files, llama_snapkv_other):
    """The header of another cache of the same model pasted onto these tensors: a consistent header, the wrong
    payload."""
    other = llama_snapkv_other
    save_cache(files / "other.kv", other.cache, other.meta(), other.result.last_logits)
    tensors, _ = parts(files / "plain.kv")
    _, other_meta = parts(files / "other.kv")
    data = safetensors.torch.save(tensors, metadata={"kvlab": json.dumps(other_meta)})
    path = write_variant(files, "swapped.kv", data)
    assert "payload checksum" in refused(path, CacheChecksumError)
    read_meta(path)  # the header alone is valid: only the payload check can catch this


def test_edited_metadata_fails_the_metadata_checksum(files):
    tensors, meta = parts(files / "plain.kv")
    for field, value in (("model_fingerprint", "0" * 16), ("context_tokens", 199), ("ratio", 0.25)):
        edited = dict(meta, **{field: value})
        data = safetensors.torch.save(tensors, metadata={"kvlab": json.dumps(edited)})
        path = write_variant(files, f"edited-{field}.kv", data)
        assert "metadata checksum" in refused(path, CacheChecksumError)


def test_other_model_and_tokenizer_are_refused(files, llama_snapkv, tiny_gemma3):
    run = llama_snapkv
    meta = dataclasses.replace(run.meta(), model="smollm2-135m", model_fingerprint="ab" * 8)
    path = files / "for-smollm2.kv"
    save_cache(path, run.cache, meta)
    message = refused(path, CacheMismatchError, expected_model_fingerprint=run.engine.loaded.fingerprint,
                      expected_model_name="tiny-llama")
    assert "made for model smollm2-135m (fingerprint abababababababab)" in message
    assert "the loaded model is tiny-llama" in message and "--model smollm2-135m" in message
    load_cache(path, expected_model_fingerprint="ab" * 8)  # the right model loads it
    meta = dataclasses.replace(run.meta(), tokenizer_fingerprint="cd" * 8)
    save_cache(path, run.cache, meta)
    assert "tokenizer" in refused(path, CacheMismatchError,
                                  expected_tokenizer_fingerprint=tokenizer_fingerprint(tiny_gemma3.tokenizer))


def test_newer_format_is_refused(files):
    tensors, meta = parts(files / "plain.kv")
    path = raw_file(files / "v2.kv", tensors, dict(meta, format_version=2))
    message = refused(path, CacheVersionError)
    assert "newer kvlab (format 2" in message and "upgrade kvlab" in message
    with pytest.raises(CacheVersionError):
        read_meta(path)


@pytest.mark.parametrize("change", [
    "format_version=0", "format_version='1'", "missing context_tokens", "unknown key", "context_tokens='200'",
    "layout kv_heads", "layout entry", "dtype float16", "quantization int4", "positions out of range",
    "positions unsorted", "keys shape", "logits 2-D", "extra tensor", "missing tensor",
])
def test_metadata_that_fails_validation(files, change):
    """Checksums recomputed (a forger, or a bug in a writer): validation alone must refuse."""
    tensors, meta = parts(files / "plain.kv")
    tensors = {name: tensor.clone() for name, tensor in tensors.items()}
    if change == "format_version=0":
        meta["format_version"] = 0
    elif change == "format_version='1'":
        meta["format_version"] = "1"
    elif change == "missing context_tokens":
        del meta["context_tokens"]
    elif change == "unknown key":
        meta["surprise"] = 1
    elif change == "context_tokens='200'":
        meta["context_tokens"] = "200"
    elif change == "layout kv_heads":
        meta["layout"][0]["kv_heads"] = 1
        meta["layout"][0]["query_heads"] = 6
    elif change == "layout entry":
        meta["layout"] = meta["layout"][:1]
    elif change == "dtype float16":
        meta["dtype"] = "float16"
    elif change == "quantization int4":
        meta["quantization"] = {"scheme": "int4", "group_size": 32, "residual_tokens": 32}
    elif change == "positions out of range":
        tensors["layer.0.positions"][0, -1] = meta["num_tokens"]
    elif change == "positions unsorted":
        tensors["layer.1.positions"][1, :2] = tensors["layer.1.positions"][1, :2].flip(0)
    elif change == "keys shape":
        tensors["layer.0.keys"] = tensors["layer.0.keys"][:, :-1].contiguous()
    elif change == "logits 2-D":
        tensors["last_logits"] = tensors["last_logits"].reshape(1, -1).contiguous()
    elif change == "extra tensor":
        tensors["layer.2.keys"] = torch.zeros(1)
    elif change == "missing tensor":
        del tensors["layer.1.values"]
    path = raw_file(files / f"invalid-{change.replace(' ', '-')}.kv", tensors, meta)
    refused(path, CacheMetadataError)


def test_not_a_kvlab_file(files):
    plain = safetensors.torch.save({"weight": torch.ones(3)})
    path = write_variant(files, "model.safetensors", plain)
    assert "not a kvlab cache file" in refused(path, CorruptCacheError)
    path = write_variant(files, "notes.kv", b"these are my notes, not a cache\n" * 10)
    refused(path, CorruptCacheError)


def test_empty_missing_and_directory(files):
    assert "empty" in refused(write_variant(files, "empty.kv", b""), CorruptCacheError)
    assert "no cache file" in refused(files / "missing.kv", MissingCacheFileError)
    directory = files / "a-directory.kv"
    directory.mkdir()
    assert "is a directory" in refused(directory, MissingCacheFileError)
    for path in (files / "missing.kv", directory):
        with pytest.raises(MissingCacheFileError):
            read_meta(path)


def test_error_classes_form_one_hierarchy():
    for error in (MissingCacheFileError, CorruptCacheError, CacheChecksumError, CacheMetadataError,
                  CacheVersionError, CacheMismatchError):
        assert issubclass(error, CacheFileError) and issubclass(error, KvlabError)
