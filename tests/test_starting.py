"""The synthetic scene generator, the shipped starting model and fine-tuning from it."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from cellfit.console import FLAGS
from cellfit.errors import CellfitError, worded
from cellfit.model import ModelInfo, build_model, load_model, read_model_info, save_model
from cellfit.starting import (
    SizeTry,
    apply_diameter,
    decide_diameter,
    estimate_diameter,
    is_scratch,
    is_starting,
    needs_diameter,
    scale_for,
    starting_model_path,
    starting_model_problem,
)
from cellfit.synthetic import KINDS, layout, scene, sparse_annotation
from cellfit.targets import IGNORE
from cellfit.train import TrainConfig, Trainer

TINY = {"patch_size": 64, "batch_size": 2, "device": "cpu", "preview_every": 1e9}


# ------------------------------------------------------------------------- scenes
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_scene_kind_gives_an_image_with_exact_labels(kind):
    img, labels, got = scene(kind, (96, 128), diameter=20, seed=1)
    assert got == kind
    assert img.shape[:2] == (96, 128) and labels.shape == (96, 128)
    assert img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)
    assert img.dtype in (np.uint8, np.uint16, np.float32)
    ids = np.unique(labels)
    assert ids[0] == 0 and len(ids) > 3
    assert np.array_equal(ids, np.arange(len(ids)))  # 1..N without gaps
    # cells differ from the background in the image (the labels describe the picture)
    grey = img.astype(np.float64) if img.ndim == 2 else img.astype(np.float64).mean(-1)
    inside, outside = grey[labels > 0].mean(), grey[labels == 0].mean()
    assert abs(inside - outside) > 0.05 * grey.std()


def test_scenes_are_reproducible_and_varied():
    a = scene(None, (64, 64), 16, seed=5)
    b = scene(None, (64, 64), 16, seed=5)
    assert a[2] == b[2] and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    kinds = {scene(None, (32, 32), 10, seed=s)[2] for s in range(40)}
    assert kinds == set(KINDS)
    with pytest.raises(ValueError, match="unknown scene kind"):
        scene("confocal", (32, 32), 10, seed=0)


def test_layout_cell_size_and_touching_cells():
    rng = np.random.default_rng(0)
    labels, _cells = layout(rng, (256, 256), diameter=24, density=0.6, touching=1.0)
    sizes = np.bincount(labels.ravel())[1:]
    inner = sizes[sizes > 0.5 * np.pi * 144]  # cells not cut by the image edge
    d = 2 * np.sqrt(np.median(inner) / np.pi)
    assert 18 < d < 32
    # touching cells: some pairs of different ids are direct neighbours
    h = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    assert h.sum() > 20
    apart, _ = layout(np.random.default_rng(0), (256, 256), 24, density=0.3, touching=0.0)
    h2 = (apart[:, 1:] != apart[:, :-1]) & (apart[:, 1:] > 0) & (apart[:, :-1] > 0)
    assert h2.sum() < h.sum() / 4


# --------------------------------------------------------------- cell size helpers
def test_names_scale_and_diameter_helpers():
    assert is_starting("starting") and is_starting(" Starting ") and not is_starting("m.cellfit")
    assert is_scratch(None) and is_scratch("scratch") and not is_scratch("starting")
    assert scale_for(30, 60) == 0.5 and scale_for(30, 15) == 2.0
    with pytest.raises(CellfitError, match="positive"):
        scale_for(30, 0)
    info = ModelInfo(in_channels=3, cell_diameter=30.0)
    assert needs_diameter(info)
    set_ = apply_diameter(info, 120)
    assert set_.scale == 0.25 and set_.diameter == 120 and not needs_diameter(set_)
    assert set_.postprocess["min_size"] == int(0.25 * np.pi / 4 * 120**2)
    assert info.scale == 1.0  # a copy: the original is untouched
    with pytest.raises(CellfitError, match="fixed cell size"):
        apply_diameter(ModelInfo(), 40)


def test_what_the_starting_model_cannot_take():
    info = ModelInfo(in_channels=3, cell_diameter=30.0)
    assert starting_model_problem(info, "instances", 1) is None
    assert starting_model_problem(info, "instances", 3) is None
    assert "semantic" in starting_model_problem(info, "semantic", 1)
    assert "2 channels" in starting_model_problem(info, "instances", 2)


# ------------------------------------------------------------ the shipped model
def test_the_shipped_starting_model():
    path = starting_model_path()
    assert path.stat().st_size <= 25e6
    info = read_model_info(path)
    assert info.mode == "instances" and info.in_channels == 3
    assert info.cell_diameter == 30 and needs_diameter(info)
    rec = info.training[-1]
    names = " ".join(d["name"] for d in rec["data"])
    assert "synthetic" in names and "DSB2018" in names
    assert all(d.get("licence") for d in rec["data"])
    assert "u2os" not in str(rec).lower()  # measuring data never trains it
    assert rec["steps"] > 0 and rec["command"].startswith("python scripts/pretrain")
    # version 3, and what it was continued from (every earlier run's record is kept)
    assert rec["purpose"] == "cellfit generalist starting model v3"
    assert [r["purpose"] for r in rec["continued_from"]][-1].endswith("model v2")
    assert [r["steps"] for r in rec["continued_from"]] == [r["steps"] for r in info.training[:-1]]
    assert "H&E" in names or "H&E" in " ".join(d.get("what", "") for d in rec["data"])
    for d in rec["data"]:
        assert d["licence"] and ("BSD" in d["licence"] or "CC0" in d["licence"])
    model, _ = load_model(path)
    assert next(model.parameters()).dtype == torch.float32


def _image(seed=0, diameter=48, shape=(192, 192)):
    img, labels, _ = scene("fluo_nuclei", shape, diameter, seed=seed)
    return img, labels


def test_fine_tuning_from_the_starting_model_resizes_to_its_cell_size():
    img, labels = _image(diameter=60, shape=(240, 240))
    ann = sparse_annotation(labels, fraction=0.5, seed=0)
    t = Trainer([img], [ann], TrainConfig(init="starting", steps=1, val_every=100, **TINY))
    d = t.summary["median_cell_diameter"]
    assert t.init == starting_model_path()
    assert t.info.diameter == d and t.info.scale == pytest.approx(30 / d, rel=1e-3)
    assert t.info.in_channels == 3  # grayscale is repeated into the RGB model
    list(t.run())
    assert t.info.training[-1]["init"] == "cellfit starting model"
    assert not needs_diameter(t.info)


def test_a_model_fine_tuned_from_an_older_starting_model_is_unchanged_by_a_new_one(
    tmp_path, monkeypatch
):
    import cellfit.starting as starting
    from cellfit.predict import predict_plane
    from cellfit.starting import TrainPlan, choose_start

    img, labels = _image(diameter=40, shape=(160, 160))
    ann = sparse_annotation(labels, fraction=0.5, seed=0)
    t = Trainer([img], [ann], TrainConfig(init="starting", steps=1, val_every=100, **TINY))
    list(t.run())
    user = save_model(tmp_path / "mine.cellfit", t.model, t.info)
    model, info = load_model(user)
    before = predict_plane(model, info, img[None].astype(np.float32), device="cpu")
    # a newer starting model replaces the shipped one
    new_model, new_info = load_model(starting_model_path())
    with torch.no_grad():
        for p in new_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    new_info.training = [*new_info.training, {"purpose": "a newer starting model"}]
    newer = save_model(tmp_path / "newer.cellfit", new_model, new_info)
    monkeypatch.setattr(starting, "starting_model_path", lambda: newer)
    model, info = load_model(user)
    after = predict_plane(model, info, img[None].astype(np.float32), device="cpu")
    np.testing.assert_array_equal(before, after)
    assert info.diameter and not needs_diameter(info)
    # training the user's model again goes on from it, not from the new starting model
    choice = choose_start(user, "instances", 1)
    assert choice.plan == TrainPlan.FINE_TUNE and choice.init == user
    assert choose_start("starting", "instances", 1).init == newer


def test_the_starting_model_falls_back_to_scratch_where_it_cannot_serve():
    img, labels = _image()
    ann = sparse_annotation(labels, fraction=0.5, seed=0)
    two = np.stack([img, img])[None]  # (P, C, Y, X): one plane of two channels
    t = Trainer([two], [ann], TrainConfig(init="starting", steps=1, **TINY))
    assert t.init is None and t.info.in_channels == 2
    ev = next(iter(t.run()))
    assert "2 channels" in ev.notice and "from scratch" in ev.notice


def test_semantic_training_starts_from_the_starting_models_features():
    from cellfit.model import load_model
    from cellfit.starting import starting_model_path

    img, labels = _image()
    ann = sparse_annotation(labels, fraction=0.5, seed=0)
    # two classes: left and right cells
    sem = np.where(labels > 0, 2 + (np.arange(labels.shape[1]) > labels.shape[1] // 2),
                   np.where(ann == 1, 1, 0)).astype(np.uint8)
    t = Trainer([img], [sem], TrainConfig(init="starting", mode="semantic", steps=1,
                                          decoder_channels=(16, 16, 16, 16, 16), **TINY))
    start, start_info = load_model(starting_model_path())
    assert t.info.n_classes == 3 and t.info.encoder == start_info.encoder
    assert list(t.info.decoder_channels) == list(start_info.decoder_channels)
    own, theirs = t.model.state_dict(), start.state_dict()
    body = [k for k in theirs if not k.startswith("segmentation_head.")]
    assert body and all(torch.equal(own[k].cpu(), theirs[k]) for k in body)
    assert own["segmentation_head.0.weight"].shape[0] == 3  # a new last layer, one per class
    assert not any(ev.notice and "scratch" in ev.notice for ev in t.run())
    assert t.info.training[-1]["init"] == "cellfit starting model's features, new classes"
    # from random weights where asked
    t = Trainer([img], [sem], TrainConfig(init="scratch", mode="semantic", steps=1, **TINY))
    assert not torch.equal(t.model.state_dict()["encoder.features.1.conv.0.0.weight"].cpu(),
                           theirs["encoder.features.1.conv.0.0.weight"])


def test_distillation_acts_only_on_unannotated_pixels():
    img, labels = _image()
    ann = sparse_annotation(labels, fraction=0.3, seed=0)
    t = Trainer([img], [ann], TrainConfig(init="starting", distill=1.0, steps=1, **TINY))
    assert t.teacher is not None
    assert not any(p.requires_grad for p in t.teacher.parameters())
    x = torch.from_numpy(t.sampler.sample(2)[0])
    with torch.no_grad():
        logits = t.model(x)
    y = torch.full(logits.shape[:1] + logits.shape[2:], IGNORE, dtype=torch.long)
    y[:, :, :32] = 1  # left half annotated
    assert float(t._distill_loss(x, logits, y)) == pytest.approx(0.0, abs=1e-5)
    changed = logits.clone()
    changed[:, :, :, :32] += torch.randn_like(changed[:, :, :, :32]) * 3  # annotated side
    assert float(t._distill_loss(x, changed, y)) == pytest.approx(0.0, abs=1e-5)
    changed[:, :, :, 32:] += torch.randn_like(changed[:, :, :, 32:]) * 3  # unannotated side
    assert float(t._distill_loss(x, changed, y)) > 0.1
    # without distillation there is no teacher (and no extra forward pass)
    t2 = Trainer([img], [ann], TrainConfig(init="starting", steps=1, **TINY))
    assert t2.teacher is None


def test_the_diameter_is_estimated_within_a_factor_of_1_5():
    model, info = load_model(starting_model_path())
    for d in (16, 60):
        img, _labels, _ = scene("fluo_nuclei", (int(8 * d), int(8 * d)), d, seed=3)
        planes = img[None].astype(np.float32)
        est = estimate_diameter(model, info, planes, device="cpu")
        assert d / 1.5 < est < d * 1.5, (d, est)


@pytest.mark.parametrize("kind", ["brightfield", "fluo_cells"])
def test_the_diameter_of_brightfield_and_whole_cells_is_estimated(kind):
    model, info = load_model(starting_model_path())
    for d in (20, 45):
        img, labels, _ = scene(kind, (int(9 * d), int(9 * d)), d, seed=4)
        planes = np.moveaxis(img, -1, 0) if img.ndim == 3 else img[None]
        est = estimate_diameter(model, info, planes.astype(np.float32), device="cpu")
        true = 2 * np.sqrt(np.median(np.bincount(labels.ravel())[1:]) / np.pi)
        assert true / 1.5 < est < true * 1.5, (kind, d, true, est)


def test_tries_that_agree_decide_the_diameter():
    tries = [
        SizeTry(15, 40, None, 0.0),  # cells broken up: unusable
        SizeTry(21, 30, 24.0, 0.5),
        SizeTry(30, 25, 26.0, 0.9),
        SizeTry(42, 12, 28.0, 0.4),
        SizeTry(60, 3, 90.0, 0.05),  # a lone, weak vote far away
    ]
    d = decide_diameter(tries)
    # the weighted geometric mean of the three that agree, not the far vote
    expect = np.exp(np.average(np.log([24.0, 26.0, 28.0]), weights=[0.5, 0.9, 0.4]))
    assert d == pytest.approx(expect, abs=0.06)


def test_a_try_that_found_only_a_few_blobs_does_not_vote():
    # shrunk 16 times, a colony of cells becomes three cell-sized blobs, found with
    # confidence; the sizes where the cells themselves are found must decide
    tries = [
        SizeTry(30, 40, 33.0, 0.45),
        SizeTry(42, 22, 36.0, 0.4),
        SizeTry(480, 3, 470.0, 0.9),
    ]
    assert decide_diameter(tries) == pytest.approx(34.4, abs=0.1)
    # counted with them, the blobs make the size unclear
    with pytest.raises(CellfitError, match="the cell size is unclear"):
        decide_diameter(tries, min_cells=2)


def test_two_sizes_that_fit_equally_well_are_reported_not_guessed():
    tries = [SizeTry(21, 30, 20.0, 0.8), SizeTry(60, 8, 64.0, 0.75), SizeTry(85, 2, None, 0.0)]
    with pytest.raises(CellfitError, match="the cell size is unclear") as err:
        decide_diameter(tries, (21, 60, 85))
    msg = str(err.value)
    assert "about 20 and about 64 pixels across" in msg
    assert "tried diameters of 21, 60, 85 pixels" in msg
    assert err.value.setting == "diameter"
    # a clearly weaker rival does not block the answer
    tries[1] = SizeTry(60, 8, 64.0, 0.3)
    assert decide_diameter(tries) == pytest.approx(20.0)


def test_no_cells_anywhere_asks_for_the_diameter():
    model, info = load_model(starting_model_path())
    flat = np.random.default_rng(0).normal(100, 1, (1, 128, 128)).astype(np.float32)
    model.train()
    with pytest.raises(CellfitError, match="set the cell diameter") as err:
        estimate_diameter(model, info, flat)  # on the model's own device
    assert err.value.setting == "diameter"
    # the sizes it tried, in pixels
    assert "tried diameters of 15, 21, 30, 42, 60, 85, 120, 170, 240, 339, 480 pixels" in str(
        err.value
    )
    assert err.value.worded({"diameter": "--diameter PIXELS"}).endswith(
        "set --diameter PIXELS, or fine-tune on a few painted cells."
    )
    assert not model.training  # left in eval mode


# -------------------------------------------------------------- batch and CLI
def test_predicting_with_the_starting_model_estimates_or_takes_the_diameter(tmp_path):
    from cellfit.batch import predict_files

    img, _labels, _ = scene("fluo_nuclei", (256, 256), 40, seed=2)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", img)
    path = starting_model_path()
    out = tmp_path / "out"
    events = list(predict_files(path, [tmp_path / "in"], out, device="cpu"))
    assert events[-1].status == "done"
    assert "cell diameter estimated at" in str(events[0].notice)  # said once, first
    assert "to choose it yourself, set --diameter" in worded(events[0].notice, FLAGS)
    lab = tifffile.imread(out / "a_labels.tif")
    assert lab.shape == img.shape and lab.max() > 3
    # a given diameter changes the result's fingerprint: the file is redone, not skipped
    again = list(predict_files(path, [tmp_path / "in"], out, device="cpu", diameter=40))
    assert again[-1].status == "done" and "replacing it" in again[0].notice
    same = [e for e in predict_files("starting", [tmp_path / "in"], out, device="cpu",
                                     diameter=40) if e.status != "plane"]
    assert same[0].status == "skipped"  # "starting" names the same model file


def test_a_fixed_size_model_refuses_a_diameter(tmp_path):
    from cellfit.batch import predict_files

    info = ModelInfo()
    path = save_model(tmp_path / "m.cellfit", build_model(info), info)
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((32, 32), np.uint8))
    with pytest.raises(CellfitError, match="leave the cell diameter out") as err:
        list(predict_files(path, [tmp_path / "a.tif"], tmp_path / "o", diameter=30))
    assert err.value.setting == "diameter_option"


def test_cli_info_names_the_starting_model_and_its_data_licences(capsys):
    from cellfit.cli import main

    assert main(["info", "starting"]) == 0
    out = capsys.readouterr().out
    assert "cell size   any" in out and "generalist starting model" in out
    assert "licence: BSD-3-Clause" in out
