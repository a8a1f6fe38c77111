"""The one-file model format: round trip, metadata, refusing pickles, encoder weights."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from _faults import deny_writes_under, fill_disk_under
from cellfit.errors import CellfitError
from cellfit.model import (
    ModelInfo,
    build_model,
    load_encoder_weights,
    load_model,
    read_model_info,
    save_model,
    training_record,
)

SMALL_DECODER = [16, 16, 16, 16, 16]


def _info(**kw) -> ModelInfo:
    base = {"encoder": "mobilenet_v2", "decoder_channels": SMALL_DECODER}
    base.update(kw)
    return ModelInfo(**base)


def _build(info: ModelInfo, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(info, **kw).eval()


@pytest.fixture(scope="module")
def tiny():
    info = _info(
        in_channels=2,
        n_classes=4,
        mode="semantic",
        class_names=["background", "nucleus", "cytoplasm", "débris"],
        normalization={"method": "percentile", "low": 2.0, "high": 99.5},
        boundary_width=2,
        training=[{"steps": 12, "validation": {"f1": 0.5}, "losses": [1.0, 0.5]}],
    )
    return _build(info), info


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_round_trip_gives_identical_outputs_and_metadata(tiny, tmp_path):
    model, info = tiny
    path = save_model(tmp_path / "sub" / "m.cellfit", model, info)
    assert path == tmp_path / "sub" / "m.cellfit" and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.cellfit"]  # no temp left
    loaded, info2 = load_model(path)
    assert not loaded.training
    assert info2 == info
    assert read_model_info(path) == info
    _assert_same_state(model, loaded)
    x = torch.randn(1, 2, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_model_file_is_safetensors_with_json_header(tiny, tmp_path):
    model, info = tiny
    path = save_model(tmp_path / "m.cellfit", model, info)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["cellfit"])
    assert meta["encoder"] == "mobilenet_v2"
    assert meta["class_names"][3] == "débris"
    assert meta["training"][0]["steps"] == 12
    assert b"\x80\x04" not in raw[:16] and not raw.startswith(b"PK")


def test_save_overwrites_atomically(tiny, tmp_path, monkeypatch):
    """Replacing a model file is all or nothing: a save that fails half-way through
    writing (the disk fills up after half the new file) leaves the old file byte for
    byte, and no temporary; a save that succeeds replaces it whole."""
    model, info = tiny
    path = tmp_path / "m.cellfit"
    save_model(path, model, info)
    old = path.read_bytes()
    old_digest = hashlib.sha256(old).hexdigest()
    info2 = _info(**{**info.__dict__, "training": [*info.training, {"steps": 3}]})
    with monkeypatch.context() as m:
        disk = fill_disk_under(m, tmp_path, room=len(old) // 2)
        with pytest.raises(CellfitError, match=r"could not save the model to .*m\.cellfit "
                                               r"\(No space left on device\)"):
            save_model(path, model, info2)
        assert disk["failures"] == 1 and disk["room"] == 0  # it stopped half-way
    assert hashlib.sha256(path.read_bytes()).hexdigest() == old_digest
    assert read_model_info(path) == info
    assert [p.name for p in tmp_path.iterdir()] == ["m.cellfit"]  # no temporary left
    save_model(path, model, info2)
    assert len(read_model_info(path).training) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m.cellfit"]


def test_a_save_refused_by_permissions_is_one_sentence_and_writes_nothing(tiny, tmp_path,
                                                                         monkeypatch):
    model, info = tiny
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "m.cellfit").write_bytes(b"the user's older file")
    refused = deny_writes_under(monkeypatch, locked)
    for path in (locked / "m.cellfit", locked / "new" / "m.cellfit"):
        with pytest.raises(CellfitError) as err:
            save_model(path, model, info)
        assert str(err.value) == (
            f"could not save the model to {path} (Permission denied): check the free space "
            "and the write permission of its folder."
        )
    assert len(refused) == 2
    monkeypatch.undo()
    assert sorted(p.name for p in locked.iterdir()) == ["m.cellfit"]
    assert (locked / "m.cellfit").read_bytes() == b"the user's older file"


def test_saving_the_same_model_again_writes_the_same_bytes(tiny, tmp_path):
    """A model file's digest identifies the model (batch results are skipped by it), so
    saving the same model again, anywhere, writes the very same file. safetensors keeps
    the header's metadata in a hash map whose order changes from call to call: the
    header is written in a fixed order."""
    model, info = tiny
    files = {save_model(tmp_path / f"d{i}" / "m.cellfit", model, info).read_bytes()
             for i in range(16)}
    assert len(files) == 1
    raw = files.pop()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and raw[8:9] == b"{"  # safetensors' aligned header
    header = json.loads(raw[8 : 8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert header["__metadata__"]["format"] == "pt"
    loaded, info2 = load_model(tmp_path / "d0" / "m.cellfit")
    assert info2 == info
    _assert_same_state(model, loaded)


def test_fresh_models_differ_so_the_round_trip_test_means_something(tiny):
    model, info = tiny
    other = _build(info, seed=1)
    x = torch.randn(1, 2, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model(x), other(x))


def test_model_info_ignores_unknown_keys():
    text = json.dumps({**json.loads(ModelInfo(encoder="resnet18").to_json()), "from_the_future": 1})
    info = ModelInfo.from_json(text)
    assert info.encoder == "resnet18" and info.n_classes == 3


# ------------------------------------------------------------- refusing pickles
class _Payload:
    """Unpickling this touches a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_torch_save_checkpoint_is_refused(tiny, tmp_path):
    model, _ = tiny
    path = tmp_path / "model.cellfit"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    for fn in (load_model, read_model_info):
        with pytest.raises(CellfitError, match="pickled PyTorch file, which can run code") as e:
            fn(path)
        assert "\n" not in str(e.value)


def test_raw_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    with pytest.raises(CellfitError, match="pickled"):
        load_model(path)
    with pytest.raises(CellfitError, match="pickled"):
        read_model_info(path)
    assert not marker.exists()


def test_encoder_weights_in_a_code_bearing_pickle_are_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "weights.pth"
    torch.save({"conv": _Payload(marker)}, path)
    model = build_model(_info())
    with pytest.raises(CellfitError, match="may contain code"):
        load_encoder_weights(model, path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a cellfit model file"),
        (b"hello, this is a text file\n", "not a cellfit model file"),
    ],
)
def test_not_a_model_file(tmp_path, content, message):
    path = tmp_path / "m.cellfit"
    path.write_bytes(content)
    with pytest.raises(CellfitError, match=message):
        load_model(path)


def test_safetensors_without_cellfit_header(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(CellfitError, match="not a cellfit model"):
        read_model_info(path)


@pytest.mark.parametrize("header", ["{not json", "[1, 2]", '"text"'])
def test_damaged_cellfit_header_is_a_clear_error(tmp_path, header):
    """(A damaged header used to escape as a JSONDecodeError: an "internal error".)"""
    path = tmp_path / "m.cellfit"
    save_file({"a": torch.zeros(2)}, str(path), metadata={"cellfit": header})
    with pytest.raises(CellfitError, match=r"header .* is damaged"):
        read_model_info(path)


def test_missing_model_and_folder(tmp_path):
    with pytest.raises(CellfitError, match="does not exist"):
        load_model(tmp_path / "nope.cellfit")
    with pytest.raises(CellfitError, match="is a folder"):
        load_model(tmp_path)


def test_weights_that_do_not_fit_the_described_network(tiny, tmp_path):
    model, info = tiny
    wrong = _info(**{**info.__dict__, "n_classes": 5, "class_names": [*info.class_names, "x"]})
    path = save_model(tmp_path / "m.cellfit", model, wrong)
    with pytest.raises(CellfitError, match="do not match the network"):
        load_model(path)


def test_unknown_encoder_and_architecture():
    with pytest.raises(CellfitError, match="unknown encoder 'resnet9000'"):
        build_model(_info(encoder="resnet9000"))
    with pytest.raises(CellfitError, match="cannot build"):
        build_model(_info(architecture="SegFormer"))


# ----------------------------------------------------------- encoder weights
@pytest.mark.parametrize("prefix", ["", "encoder."])
def test_load_encoder_weights_from_safetensors(tmp_path, prefix):
    info = _info()
    src = _build(info, seed=1)
    dst = _build(info, seed=2)
    decoder_before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("decoder")}
    enc_state = {prefix + k: v.contiguous() for k, v in src.encoder.state_dict().items()}
    path = tmp_path / "enc.safetensors"
    save_file(enc_state, str(path))
    n = load_encoder_weights(dst, path)
    assert n == len(enc_state)
    _assert_same_state(src.encoder, dst.encoder)
    for k, v in dst.state_dict().items():
        if k.startswith("decoder"):
            assert torch.equal(v, decoder_before[k])


def test_build_model_with_a_local_weights_file(tmp_path):
    info = _info()
    src = _build(info, seed=1)
    path = tmp_path / "enc.pth"
    torch.save(src.encoder.state_dict(), path)  # a plain state dict is fine
    dst = build_model(info, encoder_weights=str(path))
    _assert_same_state(src.encoder, dst.encoder)


def test_encoder_weights_of_another_encoder_are_refused(tmp_path):
    other = build_model(_info(encoder="resnet18"))
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in other.encoder.state_dict().items()}, str(path))
    with pytest.raises(CellfitError, match="none of the weights"):
        load_encoder_weights(build_model(_info()), path)


def test_encoder_weights_missing_or_garbage(tmp_path):
    model = build_model(_info())
    with pytest.raises(CellfitError, match="does not exist"):
        load_encoder_weights(model, tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(CellfitError, match="not a safetensors weights file"):
        load_encoder_weights(model, bad)


# ------------------------------------------------------------ training record
def _record(losses, **kw):
    facts = dict(
        seconds=12.34, stopped_early=False, device="cpu", batch_size=4, patch_size=64,
        loss="focal+dice", class_weights=[1.0, 2.0, 3.0], class_pixels=[10, 20, 30],
        validation={"f1": 0.5}, validation_history=[{"step": 2, "f1": 0.5}],
        validated_on="6 held-back cells", best_step=2, kept="final weights", best_score=0.5,
        annotation={"cells": 6}, scale=1.0, init=None, distill=None, lr=1e-3,
        encoder_weights=None, seed=0,
    )
    facts.update(kw)
    return training_record(losses=losses, **facts)


def test_training_record_keys_and_loss_thinning(tiny, tmp_path):
    rec = _record([1.0, 0.5, 0.25])
    assert list(rec) == [
        "date", "steps", "seconds", "stopped_early", "device", "batch_size", "patch_size",
        "loss", "class_weights", "class_pixels", "losses", "losses_every", "final_loss",
        "validation", "validation_history", "validated_on", "best_step", "kept",
        "best_score", "annotation", "scale", "init", "distill", "lr", "encoder_weights",
        "seed", "versions",
    ]
    assert rec["steps"] == 3 and rec["seconds"] == 12.3 and rec["losses_every"] == 1
    assert rec["final_loss"] == round((1.0 + 0.5 + 0.25) / 3, 5)
    assert rec["class_pixels"] == [10, 20, 30] and "torch" in rec["versions"]
    many = _record(list(np.linspace(1, 0, 450)), class_pixels=np.array([1, 2]))
    assert many["losses_every"] == 2 and len(many["losses"]) == 225
    assert many["class_pixels"] == [1, 2] and type(many["class_pixels"][0]) is int
    assert many["final_loss"] == round(float(np.mean(np.linspace(1, 0, 450)[-10:])), 5)
    assert _record([])["final_loss"] is None and _record([])["steps"] == 0
    # stored in (and read back from) a model file as given
    model, info = tiny
    info = ModelInfo.from_json(info.to_json())
    info.training.append(rec)
    back = read_model_info(save_model(tmp_path / "r.cellfit", model, info)).training[-1]
    assert back == json.loads(json.dumps(rec))
