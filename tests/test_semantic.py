"""Semantic (many-class) mode in the engine and the command line: class names and
colours kept in the model file, per-class IoU in the validation, ``--class-names``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from _nets import FakeNetTrainer
from cellfit.cli import class_lines, main
from cellfit.errors import CellfitError
from cellfit.model import (
    BACKGROUND_COLOR,
    ModelInfo,
    build_model,
    default_class_colors,
    load_model,
    read_model_info,
    save_model,
)
from cellfit.synthetic import synthetic_cells
from cellfit.train import (
    TrainConfig,
    _brief,
    class_iou_text,
    new_model_info,
    validation_scores,
    validation_text,
)

SMALL = {"encoder": "mobilenet_v2", "decoder_channels": [16, 16, 16, 16, 16]}
TINY = {"patch_size": 32, "batch_size": 2, "device": "cpu", "val_every": 2, "warmup_steps": 1}


def _semantic_info(**kw) -> ModelInfo:
    base = {**SMALL, "mode": "semantic", "n_classes": 4,
            "class_names": ["background", "nucleus", "mitosis", "debris"]}
    return ModelInfo(**{**base, **kw})


def _annotation(shape=(48, 48)) -> np.ndarray:
    """Background (1) everywhere painted, three classes (2, 3, 4) in squares."""
    ann = np.zeros(shape, np.uint16)
    ann[2:46, 2:46] = 1
    ann[5:15, 5:15] = 2
    ann[20:30, 5:15] = 3
    ann[5:15, 25:35] = 4
    return ann


# -------------------------------------------------------------- the model file
def test_class_names_and_colours_survive_save_and_load(tmp_path):
    colors = ["#598cd9", "#ff0000", "#00ff00", "#0000ff"]
    info = _semantic_info(class_colors=colors)
    torch.manual_seed(0)
    path = save_model(tmp_path / "m.cellfit", build_model(info), info)
    _model, back = load_model(path)
    assert back.class_names == ["background", "nucleus", "mitosis", "debris"]
    assert back.class_colors == colors and back.colors() == colors
    assert read_model_info(path).class_colors == colors


def test_a_model_file_without_colours_loads_with_the_default_palette(tmp_path):
    info = _semantic_info()
    path = save_model(tmp_path / "m.cellfit", build_model(info), info)
    # a file of an older cellfit: no class_colors key at all
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["cellfit"])
    assert "class_colors" in meta
    del meta["class_colors"]
    header["__metadata__"]["cellfit"] = json.dumps(meta)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    back = read_model_info(path)
    assert back.class_colors is None
    assert back.colors() == default_class_colors(4)
    assert back.colors()[0] == BACKGROUND_COLOR


def test_the_default_palette_tells_dozens_of_classes_apart():
    colors = default_class_colors(64)
    assert len(set(colors)) == 64
    assert colors[:3] == default_class_colors(3)  # a class keeps its colour


@pytest.mark.parametrize(
    ("colors", "fragment"),
    [
        (["#598cd9", "#ff0000"], "it gives 2 class colours for a network of 4 outputs"),
        (["red", "#ff0000", "#00ff00", "#0000ff"], "class_colors is ['red'"),
        ("#ff0000", "class_colors is '#ff0000', not a list of colours"),
    ],
)
def test_wrong_class_colours_in_a_model_file_are_refused_in_one_sentence(colors, fragment):
    data = json.loads(_semantic_info().to_json())
    data["class_colors"] = colors
    with pytest.raises(CellfitError) as err:
        ModelInfo.from_json(json.dumps(data))
    text = str(err.value)
    assert fragment in text and text.count(". ") == 0 and text.endswith("model."), text


# ------------------------------------------------------------- names in training
def test_names_and_colours_of_the_config_reach_the_model():
    planes = [np.zeros((1, 1, 48, 48), np.float32)]
    anns = [_annotation()[None]]
    cfg = TrainConfig(mode="semantic", class_names=["background", "a", "b", "c"],
                      class_colors=["#598cd9", "#FF0000", "#00ff00", "#0000ff"])
    info = new_model_info(cfg, planes, anns, 1.0)
    assert info.class_names == ["background", "a", "b", "c"]
    assert info.class_colors == ["#598cd9", "#ff0000", "#00ff00", "#0000ff"]
    default = new_model_info(TrainConfig(mode="semantic"), planes, anns, 1.0)
    assert default.class_names == ["background", "class 1", "class 2", "class 3"]
    assert default.class_colors == default_class_colors(4)


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"class_names": ["background", "a", "b"]},
         "2 class names were given for 3 painted classes (values 2 to 4): give one name"),
        ({"class_names": ["background", "a", "a", "b"]}, "the class name 'a' is given twice"),
        ({"class_names": ["background", "a", " ", "b"]}, "the class name ' ' cannot be used"),
        ({"class_colors": ["#598cd9", "#ff0000"]}, "1 class colours were given for 3 painted"),
        ({"class_colors": ["#598cd9", "#ff0000", "red", "#00ff00"]},
         "the class colour 'red' is not understood"),
    ],
)
def test_wrong_names_or_colours_are_refused_in_one_sentence(kw, fragment):
    planes = [np.zeros((1, 1, 48, 48), np.float32)]
    with pytest.raises(CellfitError) as err:
        new_model_info(TrainConfig(mode="semantic", **kw), planes, [_annotation()[None]], 1.0)
    assert fragment in str(err.value), str(err.value)


def test_class_names_in_instance_mode_are_refused():
    img, lab = synthetic_cells((48, 48), n_cells=4, seed=2)
    with pytest.raises(CellfitError, match="class names and colours are for semantic mode"):
        FakeNetTrainer([img], [np.where(lab > 0, lab + 1, 1)],
                       TrainConfig(steps=1, class_names=["background", "x"], **TINY))


# ------------------------------------------------------------- per-class IoU
class ValueIsClass(nn.Module):
    """A "network" whose class at each pixel is the pixel's value (rounded): logits
    ``-100 (x - k)^2`` for class k."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("k", torch.arange(n_classes, dtype=torch.float32)[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -100.0 * (x[:, :1] - self.k) ** 2


def test_per_class_iou_is_right_on_a_constructed_case():
    """Painted (value - 1 = class) against predicted class, counted by hand:

    class A (1): 8 painted, 6 predicted A, 2 predicted B; 2 background pixels predicted A
    class B (2): 4 painted, all predicted B
    background:  8 painted, 6 predicted background, 2 predicted A
    IoU A = 6 / (6 + 2 + 2) = 0.6; IoU B = 4 / (4 + 2) = 2/3; IoU background = 6 / 8.
    """
    ann = np.zeros((16, 16), np.uint16)
    pred = np.zeros((16, 16), np.float32)
    ann[0, 0:8], pred[0, 0:6], pred[0, 6:8] = 2, 1, 2  # A: 6 right, 2 taken for B
    ann[2, 0:4], pred[2, 0:4] = 3, 2  # B: all right
    ann[4, 0:8], pred[4, 0:6], pred[4, 6:8] = 1, 0, 1  # background: 2 taken for A
    pred[8:, :] = 2  # unannotated pixels: never counted
    info = ModelInfo(mode="semantic", n_classes=3, class_names=["background", "A", "B"])
    val = validation_scores(ValueIsClass(3), info, [(pred[None], ann)], torch.device("cpu"))
    per = val["per_class"]
    assert per["A"]["iou"] == pytest.approx(0.6)
    assert per["B"]["iou"] == pytest.approx(2 / 3)
    assert per["background"]["iou"] == pytest.approx(0.75)
    assert (per["A"]["support"], per["B"]["support"], per["background"]["support"]) == (8, 4, 8)
    assert val["iou"] == pytest.approx((0.6 + 2 / 3) / 2)
    # the training record keeps each class's IoU, and the words name the classes
    brief = _brief(val, classes=True)
    assert brief["class_iou"] == {"A": 0.6, "B": 0.6667}
    assert "per_class" not in brief and "class_iou" not in _brief(val)
    text = validation_text({"validated_on": "3 held-back objects", "validation": brief})
    assert text.endswith("IoU by class: A 0.60, B 0.67"), text


def test_many_classes_are_said_compactly_worst_first():
    ious = {f"class {i}": round(0.3 + i / 100, 2) for i in range(1, 32)}
    ious["mitosis"] = 0.05
    text = class_iou_text({"class_iou": ious})
    assert text.startswith("IoU by class, the 5 worst of 32: mitosis 0.05, class 1 0.31,")
    assert text.count(",") == 5 and "; mean " in text and len(text) < 140


def test_a_semantic_training_records_the_iou_of_each_named_class():
    img = np.random.default_rng(0).random((48, 48)).astype(np.float32)
    cfg = TrainConfig(mode="semantic", steps=2, time_limit=None,
                      class_names=["background", "nucleus", "mitosis", "debris"], **TINY)
    t = FakeNetTrainer([img], [_annotation()], cfg)
    events = list(t.run())
    val = [e.validation for e in events if e.validation][-1]
    assert set(val["per_class"]) == {"background", "nucleus", "mitosis", "debris"}
    rec = t.info.training[-1]
    assert set(rec["validation"]["class_iou"]) == {"nucleus", "mitosis", "debris"}
    assert "IoU by class: nucleus" in validation_text(rec)
    ModelInfo.from_json(t.info.to_json())  # the record passes the model file's checks


# ------------------------------------------------------------- the command line
@pytest.fixture
def files(tmp_path):
    img = np.random.default_rng(1).integers(0, 4000, (48, 48)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", img)
    tifffile.imwrite(tmp_path / "a_labels.tif", _annotation())
    return tmp_path


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *fragments):
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cellfit: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_class_names_of_the_wrong_count_exit_with_one_sentence(files, capsys):
    code, _out, err = _run(
        capsys, "train", files / "a.tif", "--labels", files / "a_labels.tif",
        "--out", files / "m.cellfit", "--mode", "semantic", "--steps", "1",
        "--class-names", "nucleus,mitosis",
    )
    _one_line_error(code, err, "2 class names were given for 3 painted classes (values 2 to 4)")
    assert not (files / "m.cellfit").exists()


def test_cli_class_names_in_instance_mode_are_refused(files, capsys):
    code, _out, err = _run(
        capsys, "train", files / "a.tif", "--labels", files / "a_labels.tif",
        "--out", files / "m.cellfit", "--class-names", "nucleus",
    )
    _one_line_error(code, err, "--class-names is for semantic mode", "--mode semantic")


def test_cli_trains_with_class_names_and_info_shows_them(files, capsys):
    out = files / "m.cellfit"
    code, _o, err = _run(
        capsys, "train", files / "a.tif", "--labels", files / "a_labels.tif", "--out", out,
        "--mode", "semantic", "--steps", "1", "--patch-size", "32", "--device", "cpu",
        "--init", "scratch", "--class-names", "nucleus", "--class-names", "mitosis,debris",
        "--class-colors", "#ff0000,#00ff00,#0000ff",
    )
    assert code == 0, err
    info = read_model_info(out)
    assert info.class_names == ["background", "nucleus", "mitosis", "debris"]
    assert info.class_colors == [BACKGROUND_COLOR, "#ff0000", "#00ff00", "#0000ff"]
    code, text, _e = _run(capsys, "info", out)
    assert code == 0
    assert "semantic: 3 classes and background" in text
    for line in ("1: background #598cd9", "2: nucleus #ff0000", "3: mitosis #00ff00",
                 "4: debris #0000ff"):
        assert f"            {line}\n" in text, text


def test_info_lists_many_classes_a_few_to_a_line():
    n = 32
    info = ModelInfo(mode="semantic", n_classes=n,
                     class_names=["background"] + [f"type {i}" for i in range(1, n)])
    lines = class_lines(info)
    assert 3 <= len(lines) <= 12 and all(len(line) <= 76 for line in lines)
    assert "32: type 31 " in lines[-1]
