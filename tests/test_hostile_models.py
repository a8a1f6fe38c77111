"""Hostile model files: pickles, forged safetensors headers, oversized or deeply nested
JSON, wrong metadata, newer formats and weights that lie about the network are each
refused with one sentence, without running code or allocating without bound."""

from __future__ import annotations

import inspect
import json
import pickle
import resource
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import save_file

from cellfit.cli import main
from cellfit.errors import CellfitError
from cellfit.model import (
    FORMAT_VERSION,
    MAX_HEADER_BYTES,
    MAX_JSON_DEPTH,
    POSTPROCESS_KEYS,
    ModelInfo,
    build_model,
    load_encoder_weights,
    load_model,
    read_model_info,
    save_model,
)
from cellfit.postprocess import instances_from_probs
from cellfit.starting import starting_model_path

SMALL = {"encoder": "mobilenet_v2", "decoder_channels": [16, 16, 16, 16, 16], "in_channels": 1}


# ----------------------------------------------------------------- helpers
def _refused(fn, path, *fragments: str) -> str:
    """``fn(path)`` raises one sentence holding every fragment; returns it."""
    with pytest.raises(CellfitError) as e:
        fn(path)
    message = str(e.value)
    assert "\n" not in message and message.endswith("."), message
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def _raw_safetensors(
    header: dict | bytes, data: bytes = b"", *, length: int | None = None
) -> bytes:
    """A safetensors file written by hand: ``length`` (default: the true one), the
    header (a dict as JSON, or raw bytes), the data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _info_dict(**changes) -> dict:
    data = json.loads(ModelInfo(**SMALL).to_json())
    data.update(changes)
    return data


def _with_info(path: Path, info: dict | str, source: Path) -> Path:
    """A copy of the model file ``source`` at ``path`` whose cellfit metadata is
    ``info`` (a dict as JSON, or the text itself)."""
    header, data = _split(source.read_bytes())
    header["__metadata__"]["cellfit"] = info if isinstance(info, str) else json.dumps(info)
    path.write_bytes(_raw_safetensors(header, data))
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A small, valid model file (one channel, instance mode)."""
    torch.manual_seed(0)
    info = ModelInfo(**SMALL)
    path = tmp_path_factory.mktemp("good") / "good.cellfit"
    return save_model(path, build_model(info), info)


class _Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ------------------------------------------------------------------ pickles
def _pickles(marker: Path, folder: Path) -> dict[str, bytes]:
    """The same code-running payload in each pickle format PyTorch or Python writes."""
    out = {}
    for name, kw in [
        ("torch zip", {}),
        ("torch legacy", {"_use_new_zipfile_serialization": False}),
    ]:
        f = folder / f"{name}.bin"
        torch.save({"weights": torch.zeros(3), "hook": _Payload(marker)}, f, **kw)
        out[name] = f.read_bytes()
    for protocol in (0, 1, 2, 4, 5):
        out[f"pickle protocol {protocol}"] = pickle.dumps(_Payload(marker), protocol=protocol)
    return out


def test_the_pickle_payloads_do_run_code(tmp_path):
    """The payloads below are live: unpickling one creates the marker (so the tests
    that check the marker is absent mean something)."""
    marker = tmp_path / "ran"
    pickle.loads(_pickles(marker, tmp_path)["pickle protocol 4"])
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".cellfit", ".safetensors", ".pt", ".pth", ""])
def test_pickles_are_refused_under_any_name_without_running(tmp_path, suffix):
    marker = tmp_path / "code-ran"
    for kind, raw in _pickles(marker, tmp_path).items():
        path = tmp_path / f"model{suffix}"
        path.write_bytes(raw)
        word = "pickled PyTorch file" if kind.startswith("torch") else "pickled Python file"
        for fn in (read_model_info, load_model):
            _refused(fn, path, word, "which can run code when opened", "train or export")
        assert not marker.exists(), kind


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ""])
def test_encoder_weights_in_code_bearing_pickles_are_refused_without_running(tmp_path, suffix):
    marker = tmp_path / "code-ran"
    model = build_model(ModelInfo(**SMALL))
    for kind, raw in _pickles(marker, tmp_path).items():
        path = tmp_path / f"weights{suffix}"
        path.write_bytes(raw)
        fragment = "may contain code" if kind == "torch zip" else "pickle in an old format"
        _refused(lambda p: load_encoder_weights(model, p), path, fragment)
        assert not marker.exists(), kind


# ---------------------------------------------------------- forged headers
F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "data", "fragment"),
    [
        ({"w": {**F32_2, "dtype": "F128"}}, bytes(8), "tensor 'w' has the unknown dtype 'F128'"),
        ({"w": {**F32_2, "dtype": 4}}, bytes(8), "unknown dtype 4"),
        (
            {"w": {**F32_2, "shape": [1000, 1000]}},
            bytes(8),
            "tensor 'w' is 1000×1000 F32, 4000000 bytes, but spans 8 bytes",
        ),
        ({"w": {**F32_2, "dtype": "F64"}}, bytes(8), "is 2 F64, 16 bytes, but spans 8 bytes"),
        ({"w": {**F32_2, "shape": [-2]}}, bytes(8), "impossible shape [-2]"),
        ({"w": {**F32_2, "shape": [2.0]}}, bytes(8), "impossible shape"),
        ({"w": {**F32_2, "shape": [True, 2]}}, bytes(8), "impossible shape"),
        ({"w": {**F32_2, "shape": [0, 2**60]}}, bytes(8), "impossible shape"),
        ({"w": {**F32_2, "shape": [1] * 17}}, bytes(8), "impossible shape"),
        ({"w": {**F32_2, "shape": "2"}}, bytes(8), "impossible shape"),
        ({"w": {**F32_2, "data_offsets": [8, 0]}}, bytes(8), "impossible data_offsets [8, 0]"),
        ({"w": {**F32_2, "data_offsets": [-8, 0]}}, bytes(8), "impossible data_offsets"),
        ({"w": {**F32_2, "data_offsets": [0]}}, bytes(8), "impossible data_offsets"),
        (
            {"w": {**F32_2, "data_offsets": [0, 2**64 + 8]}},
            bytes(8),
            "ends at byte 18446744073709551624 of a 8-byte data section",
        ),
        ({"w": {**F32_2, "data_offsets": [0, 10**6]}}, bytes(8), "ends at byte 1000000"),
        ({"w": {"dtype": "F32", "shape": [2]}}, bytes(8), "is not given as dtype, shape"),
        ({"w": {**F32_2, "code": "print(1)"}}, bytes(8), "is not given as dtype, shape"),
        ({"w": [1, 2]}, bytes(8), "is not given as dtype, shape"),
        (
            {"a": F32_2, "b": {**F32_2, "data_offsets": [4, 12]}},
            bytes(12),
            "tensors 'a' and 'b' overlap",
        ),
        ({"a": F32_2, "b": F32_2}, bytes(8), "tensors 'a' and 'b' overlap"),
        (
            {"a": {**F32_2, "shape": [1], "data_offsets": [0, 4]}},
            bytes(8),
            "bytes 4 to 8 of its data belong to no tensor",
        ),
        (
            {
                "a": {**F32_2, "shape": [1], "data_offsets": [0, 4]},
                "b": {**F32_2, "shape": [1], "data_offsets": [8, 12]},
            },
            bytes(12),
            "bytes 4 to 8 of its data belong to no tensor",
        ),
        (
            {"w": {**F32_2, "data_offsets": [8, 16]}},
            bytes(16),
            "bytes 0 to 8 of its data belong to no tensor",
        ),
        (
            {"__metadata__": {"cellfit": {"encoder": 1}}, "w": F32_2},
            bytes(8),
            "__metadata__ is not a table of texts",
        ),
        ({"__metadata__": ["cellfit"], "w": F32_2}, bytes(8), "__metadata__ is not a table"),
    ],
)
def test_forged_safetensors_headers_are_refused(tmp_path, header, data, fragment):
    path = tmp_path / "forged.cellfit"
    path.write_bytes(_raw_safetensors(header, data))
    for fn in (read_model_info, load_model):
        _refused(fn, path, "is damaged or forged", fragment, "get an intact copy, or retrain")


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (b"{not json", "its header is not valid JSON"),
        (b'{"w": 1,}', "its header is not valid JSON"),
        (b'{"\xff\xfe": 1}', "its header is not valid JSON"),
        (b'{"w": ' + b"1" * 5000 + b"}", "its header is not valid JSON"),
        (
            b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            f"its header is nested more than {MAX_JSON_DEPTH} levels deep",
        ),
        (
            b'{"a": ' + b'{"b": ' * 100_000 + b"1" + b"}" * 100_000 + b"}",
            f"its header is nested more than {MAX_JSON_DEPTH} levels deep",
        ),
        (
            b'{"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, '
            b'"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}',
            "'w' appears twice",
        ),
    ],
)
def test_headers_that_are_not_json_or_too_deep_are_refused(tmp_path, header, fragment):
    """(100,000 nested lists used to be a RecursionError.)"""
    path = tmp_path / "forged.cellfit"
    path.write_bytes(_raw_safetensors(header))
    _refused(read_model_info, path, "is damaged or forged", fragment)


def test_a_header_length_beyond_the_file_or_the_bound_is_refused_before_reading(tmp_path):
    path = tmp_path / "forged.cellfit"
    path.write_bytes(_raw_safetensors({"w": F32_2}, bytes(8), length=2**60))
    _refused(read_model_info, path, f"its header claims {2**60} bytes, more than the 16 MiB")
    path.write_bytes(_raw_safetensors({"w": F32_2}, bytes(8), length=4000))
    size = path.stat().st_size
    _refused(load_model, path, f"its header claims 4000 bytes but the whole file has {size} bytes")
    # a header of 300 MB that is there (a sparse file) is refused without reading it
    with path.open("wb") as f:
        f.write(struct.pack("<Q", 300 * 2**20) + b'{"w": ')
        f.truncate(8 + 300 * 2**20)
    tracemalloc.start()
    try:
        _refused(read_model_info, path, "more than the 16 MiB cellfit reads")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak


def test_a_header_just_under_the_bound_is_read(tmp_path, good):
    """The bound refuses what no model needs, not a model with a long history."""
    header, data = _split(good.read_bytes())
    info = json.loads(header["__metadata__"]["cellfit"])
    info["training"] = [{"note": "x" * 1000}] * (MAX_HEADER_BYTES // 1100)
    header["__metadata__"]["cellfit"] = json.dumps(info)
    path = tmp_path / "long.cellfit"
    path.write_bytes(_raw_safetensors(header, data))
    assert MAX_HEADER_BYTES // 2 < path.stat().st_size - len(data) < MAX_HEADER_BYTES
    assert len(read_model_info(path).training) == MAX_HEADER_BYTES // 1100


@pytest.mark.parametrize("content", [b"", b"1234567", b"[1, 2, 3]", b"PK\x03\x04not torch"])
def test_short_and_foreign_files_are_not_models(tmp_path, content):
    path = tmp_path / "m.cellfit"
    path.write_bytes(content)
    _refused(read_model_info, path, "is not a cellfit model file")


# ------------------------------------------------------------ model info
@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"cell_diameter": "abc"}, "cell_diameter is 'abc', not a cell diameter in pixels"),
        ({"cell_diameter": -3}, "cell_diameter is -3"),
        ({"diameter": [1]}, "diameter is [1]"),
        ({"class_names": 5}, "class_names is 5, not a list of names"),
        ({"class_names": ["a", 2, "c"]}, "class_names is ['a', 2, 'c']"),
        ({"class_names": ["a", "b"]}, "it names 2 classes for a network of 3 outputs"),
        ({"training": "x"}, "training is 'x', not a list of training records"),
        ({"training": [5]}, "training record 1 is 5, not a record"),
        (
            {"training": [{"steps": 3}, {"validation": {"f1": "high"}}]},
            "training record 2 has validation {'f1': 'high'}, not validation figures",
        ),
        ({"training": [{"annotation": None}]}, "training record 1 has annotation None"),
        (
            {"training": [{"calibration": {"chosen": {"min_size": "x"}}}]},
            "training record 1 has calibration",
        ),
        ({"training": [{"data": "everything"}]}, "training record 1 has data"),
        ({"in_channels": 10**9}, "in_channels is 1000000000, not a whole number from 1 to 512"),
        ({"in_channels": True}, "in_channels is True"),
        ({"in_channels": 1.0}, "in_channels is 1.0"),
        ({"n_classes": "3"}, "n_classes is '3'"),
        ({"n_classes": 1}, "n_classes is 1, not a whole number from 2 to 1024"),
        ({"n_classes": 4, "class_names": list("abcd")}, "an instance model has 3 outputs, not 4"),
        ({"mode": "panoptic"}, "mode is 'panoptic', not 'instances' or 'semantic'"),
        ({"encoder": 7}, "encoder is 7, not an encoder name"),
        ({"encoder": ""}, "encoder is ''"),
        ({"architecture": None}, "architecture is None"),
        ({"decoder_channels": [10**6] * 5}, "decoder_channels is [1000000, "),
        ({"decoder_channels": "16"}, "decoder_channels is '16'"),
        ({"normalization": "percentile"}, "normalization is 'percentile'"),
        ({"normalization": {"method": "percentile"}}, "normalization is {'method': 'percentile'}"),
        ({"normalization": {"low": -5, "high": 99}}, "normalization is"),
        ({"scale": 1e9}, "scale is 1000000000.0, not a number from 0.05 to 4"),
        ({"scale": float("nan")}, "scale is nan"),
        ({"scale": float("inf")}, "scale is inf"),
        ({"boundary_width": 10**6}, "boundary_width is 1000000"),
        ({"postprocess": {"__class__": 1}}, "postprocess is {'__class__': 1}"),
        ({"postprocess": {"min_size": "big"}}, "postprocess is {'min_size': 'big'}"),
        ({"postprocess": [1]}, "postprocess is [1]"),
        ({"format_version": "1"}, "format_version is '1', not a format number"),
        ({"format_version": 0}, "format_version is 0"),
        (
            {
                "training": [
                    {"x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}
                ]
            },
            f"its model information is nested more than {MAX_JSON_DEPTH} levels deep",
        ),
    ],
)
def test_metadata_fields_of_the_wrong_type_are_refused(tmp_path, good, changes, fragment):
    path = _with_info(tmp_path / "m.cellfit", _info_dict(**changes), good)
    for fn in (read_model_info, load_model):
        message = _refused(fn, path, "the header of model file", "is damaged (", fragment)
        assert message.endswith("): retrain or re-export the model."), message


@pytest.mark.parametrize(
    "field",
    [
        "format_version",
        "encoder",
        "in_channels",
        "n_classes",
        "mode",
        "class_names",
        "decoder_channels",
        "normalization",
    ],
)
def test_missing_required_fields_are_refused(tmp_path, good, field):
    data = _info_dict()
    del data[field]
    path = _with_info(tmp_path / "m.cellfit", data, good)
    _refused(read_model_info, path, f"it lacks {field}")


def test_unknown_keys_are_ignored_and_later_fields_default(tmp_path, good):
    """Forward compatibility: keys of a later cellfit (same format) are ignored; the
    fields added after format 1 (and the history) default when an older file lacks them."""
    data = _info_dict(classes=5, from_the_future={"a": [1, 2]})
    for old in (
        "scale",
        "postprocess",
        "cell_diameter",
        "diameter",
        "boundary_width",
        "architecture",
        "training",
    ):
        del data[old]
    path = _with_info(tmp_path / "m.cellfit", data, good)
    info = read_model_info(path)
    assert info == ModelInfo(**SMALL)
    model, info2 = load_model(path)
    assert info2 == info and not model.training


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"encoder": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001,
        "not json",
        "null",
        "[]",
    ],
)
def test_the_model_information_that_is_not_an_object_is_refused(tmp_path, good, text):
    path = _with_info(tmp_path / "m.cellfit", text, good)
    _refused(read_model_info, path, "the header of model file", "is damaged (its model information")


def test_a_newer_format_asks_for_a_newer_cellfit(tmp_path, good):
    newer = FORMAT_VERSION + 1
    # a newer format may change the fields: the version is checked first
    data = _info_dict(format_version=newer, in_channels="all of them", brand_new=1)
    del data["encoder"]
    path = _with_info(tmp_path / "m.cellfit", data, good)
    for fn in (read_model_info, load_model):
        _refused(
            fn,
            path,
            f"was made by a newer cellfit (model format {newer}; this cellfit "
            f"reads format {FORMAT_VERSION}): update cellfit to open it.",
        )
    with pytest.raises(CellfitError, match=r"newer cellfit .* update cellfit"):
        ModelInfo.from_json(json.dumps(data))


def test_from_json_refuses_with_a_sentence():
    with pytest.raises(
        CellfitError, match=r"model information is damaged \(cell_diameter is 'abc'"
    ):
        ModelInfo.from_json(json.dumps(_info_dict(cell_diameter="abc")))
    assert ModelInfo.from_json(ModelInfo(**SMALL).to_json()) == ModelInfo(**SMALL)


def test_the_postprocess_keys_are_those_the_post_processing_takes():
    params = list(inspect.signature(instances_from_probs).parameters)
    assert params[0] == "probs" and tuple(params[1:]) == POSTPROCESS_KEYS


# ------------------------------------------- weights that lie about the network
def _state(path: Path) -> tuple[dict, bytes]:
    return _split(path.read_bytes())


def _rewrite(path: Path, header: dict, data: bytes) -> Path:
    path.write_bytes(_raw_safetensors(header, data))
    return path


def test_weights_that_do_not_fit_the_network_are_refused_before_loading(tmp_path, good):
    header, data = _state(good)
    names = [k for k in header if k != "__metadata__"]
    # described with 2 input channels, weights for 1
    path = _with_info(tmp_path / "channels.cellfit", _info_dict(in_channels=2), good)
    _refused(
        load_model,
        path,
        "the weights in",
        "do not match the network it describes (",
        "in the file, the network's is",
        "): retrain or re-export the model.",
    )
    assert read_model_info(path).in_channels == 2  # the header alone is consistent
    # a tensor of the network missing (the data re-tiled without it)
    first = min(names, key=lambda k: header[k]["data_offsets"][0])
    cut = header[first]["data_offsets"][1]
    short = {k: v for k, v in header.items() if k != first}
    for k in names:
        if k != first:
            b, e = header[k]["data_offsets"]
            short[k] = {**header[k], "data_offsets": [b - cut, e - cut]}
    _refused(
        load_model,
        _rewrite(tmp_path / "missing.cellfit", short, data[cut:]),
        f"the file lacks 1 of the network's {len(names)} tensors, such as {first!r}",
    )
    # an extra tensor the network does not have
    extra = {
        **header,
        "evil.weight": {"dtype": "F32", "shape": [1], "data_offsets": [len(data), len(data) + 4]},
    }
    _refused(
        load_model,
        _rewrite(tmp_path / "extra.cellfit", extra, data + bytes(4)),
        "the file holds 1 tensor(s) the network does not have, such as 'evil.weight'",
    )
    # a float weight declared as integers of the same size
    name = next(k for k in names if header[k]["dtype"] == "F32")
    ints = {**header, name: {**header[name], "dtype": "I32"}}
    _refused(
        load_model,
        _rewrite(tmp_path / "ints.cellfit", ints, data),
        f"{name!r} holds I32 values, the network's holds torch.float32",
    )


def test_a_huge_network_described_by_a_tiny_file_is_not_built(tmp_path, good):
    """A file of a few MB naming an encoder of 800 million weights is refused on a
    network built without memory (it used to allocate 3 GB, then fail)."""
    path = _with_info(
        tmp_path / "m.cellfit",
        _info_dict(encoder="resnext101_32x48d", decoder_channels=[4096] * 5),
        good,
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    _refused(load_model, path, "do not match the network it describes")
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 500 * 1024, f"peak memory grew by {grown} KiB"
    assert time.perf_counter() - start < 60


def test_a_sound_file_still_loads_and_round_trips(tmp_path, good):
    model, info = load_model(good)
    assert info == ModelInfo(**SMALL)
    x = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    again = save_model(tmp_path / "again.cellfit", model, info)
    assert again.read_bytes() == good.read_bytes()
    with torch.no_grad():
        assert torch.equal(model(x), load_model(again)[0](x))


def test_the_shipped_starting_model_loads():
    path = starting_model_path()
    info = read_model_info(path)
    model, info2 = load_model(path)
    assert info2 == info and info.cell_diameter and not model.training
    n = sum(p.numel() for p in model.parameters())
    assert n > 10**6 and all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------ encoder weights
def test_forged_encoder_weights_are_refused(tmp_path):
    model = build_model(ModelInfo(**SMALL))
    path = tmp_path / "enc.safetensors"
    path.write_bytes(_raw_safetensors({"conv": {**F32_2, "shape": [10**6]}}, bytes(8)))
    _refused(
        lambda p: load_encoder_weights(model, p),
        path,
        "weights file",
        "is damaged (tensor 'conv' is 1000000 F32",
        "give an intact .safetensors file",
    )
    path.write_bytes(_raw_safetensors({"conv": F32_2}, bytes(8), length=2**60))
    _refused(lambda p: load_encoder_weights(model, p), path, "more than the 16 MiB")


def test_plain_weights_still_load(tmp_path):
    """Encoder weights as safetensors or as a plain PyTorch state dict (zip) load."""
    info = ModelInfo(**SMALL)
    src = build_model(info)
    sd = {k: v.contiguous() for k, v in src.encoder.state_dict().items()}
    save_file(sd, str(tmp_path / "enc.safetensors"))
    torch.save(sd, tmp_path / "enc.pth")
    for name in ("enc.safetensors", "enc.pth"):
        assert load_encoder_weights(build_model(info), tmp_path / name) == len(sd)


# ---------------------------------------------------------------------- CLI
def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("cellfit: error: ") and "internal error" not in lines[0]
    assert "Traceback" not in out + err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_cli_info_refuses_a_forged_header_and_a_pickle_in_one_line(tmp_path, capsys):
    forged = tmp_path / "forged.cellfit"
    forged.write_bytes(_raw_safetensors({"w": {**F32_2, "shape": [10**9]}}, bytes(8)))
    _one_line(*_cli(capsys, "info", forged), "is damaged or forged", "spans 8 bytes")
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.cellfit"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    _one_line(*_cli(capsys, "info", evil), "pickled Python file")
    assert not marker.exists()


def test_cli_info_of_a_newer_format_and_predict_with_lying_weights(tmp_path, capsys, good):
    newer = _with_info(tmp_path / "newer.cellfit", _info_dict(format_version=99), good)
    _one_line(*_cli(capsys, "info", newer), "newer cellfit (model format 99", "update cellfit")
    lying = _with_info(tmp_path / "lying.cellfit", _info_dict(in_channels=3), good)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", np.zeros((40, 40), np.uint8))
    out = tmp_path / "out"
    _one_line(
        *_cli(capsys, "predict", lying, tmp_path / "in", "--out", out),
        "do not match the network it describes",
    )
    assert not out.exists()
