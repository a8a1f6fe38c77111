"""'Paint here next': the uncertainty map, suggested regions, doubtful cells, and
``cellfit predict --uncertainty``, on small synthetic images made here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage as ndi
from torch import nn

from cellfit.cli import main
from cellfit.model import ModelInfo, build_model, save_model
from cellfit.predict import predict_plane
from cellfit.synthetic import synthetic_cells
from cellfit.uncertainty import (
    Region,
    iter_uncertain,
    predict_uncertain,
    rank_cells,
    suggest_regions,
    uncertainty_from_probs,
)


def _onehot(classes: np.ndarray, k: int, sure: float = 0.99) -> np.ndarray:
    rest = (1 - sure) / (k - 1)
    return np.stack([np.where(classes == c, sure, rest) for c in range(k)]).astype(np.float32)


# ----------------------------------------------------------------------- the measure
def test_uncertainty_is_low_where_sure_and_high_where_classes_tie():
    classes = np.zeros((20, 20), int)
    classes[:, 10:] = 1
    p = _onehot(classes, 3)
    p[:, 5:8, 5:8] = 1 / 3  # three classes equally likely
    u = uncertainty_from_probs(p, "semantic")
    assert u.dtype == np.float32 and u.shape == (20, 20)
    assert u.min() >= 0 and u.max() <= 1
    sure = np.ones((20, 20), bool)
    sure[5:8, 5:8] = False
    assert u[sure].max() < 0.1
    assert u[5:8, 5:8].min() > 0.99
    # two of three tied: in between
    p[:, 0, 0] = (0.5, 0.5, 0.0)
    assert 0.5 < uncertainty_from_probs(p, "semantic")[0, 0] < 0.7


def test_instance_uncertainty_counts_cell_versus_background_and_broad_seed_doubt():
    p = np.zeros((3, 16, 24), np.float32)
    p[:] = np.array([0.005, 0.99, 0.005], np.float32)[:, None, None]  # sure interior
    mix = np.array([0.005, 0.4975, 0.4975], np.float32)[:, None, None]
    p[:, 2:4, :12] = mix  # a thin interior/boundary mix, as at every cell edge: no doubt
    p[:, 8:16, :12] = mix  # a broad one (a clump the model cannot split): doubt
    p[:, :, 12:] = np.array([0.5, 0.25, 0.25], np.float32)[:, None, None]  # cell or not?
    u = uncertainty_from_probs(p, "instances")
    assert u[:6, :12].max() < 0.1
    assert u[10:14, 2:10].min() > 0.9
    assert u[:, 14:].min() > 0.99


def _disc_probs(sigma: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A clean predicted disc (interior r < 8, boundary ring to r < 10), blurred like a
    network's output, and the distance to its centre."""
    yy, xx = np.indices((64, 64))
    r = np.hypot(yy - 32, xx - 32)
    classes = np.where(r < 8, 1, np.where(r < 10, 2, 0))
    p = _onehot(classes, 3)
    p = np.stack([ndi.gaussian_filter(c, sigma) for c in p])
    return p, r


def test_a_clean_predicted_cell_is_sure_inside_and_out_not_a_bright_ring():
    p, r = _disc_probs()
    u = uncertainty_from_probs(p, "instances")
    assert u[r < 6].mean() < 0.1
    assert u[r > 13].mean() < 0.1
    # the interior-to-boundary transition (r 5.5..8) is no doubt...
    transition = (r > 5.5) & (r < 8)
    assert u[transition].mean() < 0.15
    # ...where the full 3-class entropy would draw a bright ring there
    pn = p / p.sum(0)
    full = -(pn * np.log(pn)).sum(0) / np.log(3)
    assert full[transition].mean() > 0.3
    # only the thin line where cell turns to background is unsure
    assert (u > 0.5).sum() < 2.5 * 2 * np.pi * 9.5


class Gradient(nn.Module):
    """A 'network' that calls a pixel class 1 where the image rises to the right: its
    flipped views disagree with it on a ramp."""

    def __init__(self, n_classes: int = 2) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.encoder.weight.zero_()
            self.encoder.weight[0, 0, 1, 0] = -200.0
            self.encoder.weight[0, 0, 1, 2] = 200.0
        self.n_classes = n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.encoder(x)
        return torch.cat([-g, g], dim=1)


def test_predictions_whose_augmented_views_disagree_are_uncertain():
    info = ModelInfo(mode="semantic", n_classes=2, class_names=["background", "a"])
    net = Gradient()
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))[None]
    plain = predict_plane(net, info, ramp, tile=64, overlap=0)
    inner = (slice(8, -8), slice(8, -8))
    # each view is sure...
    assert uncertainty_from_probs(plain, "semantic")[inner].max() < 0.05
    events = list(predict_uncertain(net, info, ramp, tile=64, overlap=0))
    last = events[-1]
    assert last.probabilities is not None and last.uncertainty is not None
    assert last.uncertainty.shape == (64, 64) and last.uncertainty.dtype == np.float32
    # ...but the flipped ones say the opposite: their mean is unsure
    assert last.uncertainty[inner].min() > 0.9
    # a flat image: every view agrees (nothing rises), the same everywhere
    stack = np.stack([ramp, np.zeros_like(ramp)])
    evs = [e for e in iter_uncertain(net, info, stack, tile=64, overlap=0)
           if e.uncertainty is not None]
    assert [e.plane for e in evs] == [0, 1]
    assert np.allclose(evs[0].uncertainty, last.uncertainty, atol=1e-5)


# ---------------------------------------------------------------------- suggestions
def _check_boxes(regions: list[Region], shape: tuple[int, int]) -> None:
    assert [r.rank for r in regions] == list(range(1, len(regions) + 1))
    assert [r.score for r in regions] == sorted((r.score for r in regions), reverse=True)
    for r in regions:
        assert 0 <= r.y0 < r.y1 <= shape[0] and 0 <= r.x0 < r.x1 <= shape[1]
    for i, a in enumerate(regions):
        for b in regions[i + 1 :]:
            assert not (a.y0 < b.y1 and b.y0 < a.y1 and a.x0 < b.x1 and b.x0 < a.x1), (a, b)


def test_suggestions_avoid_painted_regions_and_never_overlap():
    rng = np.random.default_rng(0)
    unc = rng.random((200, 160)).astype(np.float32) * 0.2
    unc[20:80, 20:80] = 0.9  # most uncertain, but painted
    ann = np.zeros(unc.shape, np.int32)
    ann[20:80, 20:80] = 1
    regions = suggest_regions(unc, ann, n=8, size=40)
    assert len(regions) == 8
    _check_boxes(regions, unc.shape)
    for r in regions:
        assert r.y1 - r.y0 == 40 and r.x1 - r.x0 == 40
        assert (ann[r.slices] != 0).mean() <= 0.05
    # the box-size rules: about three diameters, at least 32, at most the image
    big = suggest_regions(unc, ann, n=1, diameter=20)[0]
    assert (big.y1 - big.y0, big.x1 - big.x0) == (60, 60)
    small = suggest_regions(unc, ann, n=1, diameter=5)[0]
    assert (small.y1 - small.y0, small.x1 - small.x0) == (32, 32)
    flat = suggest_regions(unc[:20], ann[:20], n=1)[0]  # 64 px by default, the image is 20
    assert (flat.y0, flat.y1, flat.x1 - flat.x0) == (0, 20, 20)
    # nothing fits when all is painted
    assert suggest_regions(unc, np.ones_like(ann), n=3, size=40) == []


def test_an_ambiguous_region_ranks_above_a_clear_one():
    # a clear scene (a sure prediction) with one patch where the classes tie
    classes = np.zeros((128, 128), int)
    classes[::16, :] = 1
    p = _onehot(classes, 2)
    p[:, 80:112, 16:48] = 0.5
    u = uncertainty_from_probs(p, "semantic")
    ann = np.zeros(u.shape, np.int32)
    ann[:32, 96:] = 1
    top = suggest_regions(u, ann, n=3, size=32)[0]
    assert top.box == (80, 16, 112, 48)
    assert top.uncertainty > 0.9
    _check_boxes(suggest_regions(u, ann, n=3, size=32), u.shape)


def test_of_two_equally_uncertain_regions_the_one_unlike_the_painted_ranks_first():
    rng = np.random.default_rng(1)
    image = rng.normal(0.3, 0.02, (128, 192)).astype(np.float32)
    # left third: textured, like the painted corner; right third: smooth and bright
    image[:, :64] += rng.normal(0, 0.3, (128, 64)).astype(np.float32)
    image[:, 128:] = 0.9 + rng.normal(0, 0.01, (128, 64)).astype(np.float32)
    unc = np.full(image.shape, 0.1, np.float32)
    unc[48:80, 16:48] = 0.8  # in the textured part
    unc[48:80, 144:176] = 0.8  # in the smooth part
    ann = np.zeros(image.shape, np.int32)
    ann[:32, :48] = 2  # painted: textured
    regions = suggest_regions(unc, ann, image, n=2, size=32)
    assert regions[0].box == (48, 144, 80, 176)
    assert regions[1].box == (48, 16, 80, 48)
    assert regions[0].novelty > regions[1].novelty + 0.3
    assert regions[0].uncertainty == pytest.approx(regions[1].uncertainty)
    # nothing painted: novelty 1 everywhere, the order is the uncertainty's
    plain = suggest_regions(unc, np.zeros_like(ann), image, n=2, size=32)
    assert all(r.novelty == 1 for r in plain)


def test_suggestions_on_a_large_plane_take_seconds():
    import time

    rng = np.random.default_rng(0)
    unc = rng.random((2048, 2048)).astype(np.float32)
    image = rng.random((2048, 2048)).astype(np.float32)
    ann = np.zeros(unc.shape, np.int32)
    ann[100:400, 100:400] = 1
    t = time.perf_counter()
    regions = suggest_regions(unc, ann, image, n=5, diameter=20)
    assert time.perf_counter() - t < 20
    _check_boxes(regions, unc.shape)


# -------------------------------------------------------------------- doubtful cells
def test_rank_cells_puts_a_doubtful_cell_first_and_leaves_painted_cells_out():
    labels = np.zeros((64, 96), np.int32)
    labels[8:24, 8:24] = 1  # sure
    labels[8:24, 40:56] = 2  # doubtful inside
    labels[40:56, 40:56] = 3  # doubtful, but painted
    labels[40:56, 72:88] = 4  # a little doubtful, at its edge
    unc = np.full(labels.shape, 0.02, np.float32)
    unc[12:20, 44:52] = 0.9
    unc[40:56, 40:56] = 0.95
    unc[38:58, 70:90] = 0.3
    unc[40:56, 72:88] = 0.02
    ann = np.zeros(labels.shape, np.int32)
    ann[38:58, 38:58] = 5
    cells = rank_cells(labels, unc, annotation=ann)
    assert [c.label for c in cells] == [2, 4, 1]
    assert [c.rank for c in cells] == [1, 2, 3]
    assert cells[0].score > cells[1].score > cells[2].score
    assert cells[0].bbox == (8, 40, 24, 56)
    assert (cells[0].y, cells[0].x) == pytest.approx((15.5, 47.5))
    # without the annotation the painted cell is the most doubtful; n keeps the first
    assert [c.label for c in rank_cells(labels, unc, n=2)] == [3, 2]
    assert rank_cells(np.zeros_like(labels), unc) == []


# ---------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16, 16, 16, 16, 16])
    path = tmp_path_factory.mktemp("model") / "tiny.cellfit"
    return save_model(path, build_model(info), info)


def run(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    _out, err = capsys.readouterr()
    return code, err


def test_cellfit_predict_uncertainty_writes_the_map_and_reruns_behave(tmp_path, capsys,
                                                                     model_file):
    from cellfit.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    help_text = " ".join(sub.choices["predict"].format_help().split())
    assert "--uncertainty" in help_text and "implies --tta" in help_text

    image, _ = synthetic_cells((40, 48), n_cells=3, seed=4)
    stack = np.stack([image, image[::-1]])
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", stack, metadata={"axes": "ZYX"})
    out = tmp_path / "out"
    args = ["predict", model_file, tmp_path / "in", "--out", out, "--device", "cpu"]
    code, err = run(capsys, *args)
    assert code == 0 and "1 file(s) segmented" in err, err
    assert not (out / "a_uncertainty.tif").exists()
    # asked for now: the file is predicted again (with test-time augmentation)
    code, err = run(capsys, *args, "--uncertainty")
    assert code == 0 and "1 file(s) segmented" in err and "skipped" not in err, err
    unc = tifffile.imread(out / "a_uncertainty.tif")
    labels = tifffile.imread(out / "a_labels.tif")
    assert unc.dtype == np.float32 and unc.shape == labels.shape == (2, 40, 48)
    assert unc.min() >= 0 and unc.max() <= 1 and unc.max() > 0
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.tif", "a_uncertainty.tif"]
    # the same again: skipped; without the flag: the labels are complete, skipped too
    code, err = run(capsys, *args, "--uncertainty")
    assert code == 0 and "1 skipped" in err, err
    code, err = run(capsys, *args)
    assert code == 0 and "1 skipped" in err, err
    # the map gone: redone
    (out / "a_uncertainty.tif").unlink()
    code, err = run(capsys, *args, "--uncertainty")
    assert code == 0 and "1 file(s) segmented" in err, err
    assert np.allclose(tifffile.imread(out / "a_uncertainty.tif"), unc, atol=1e-5)


def test_cellfit_predict_uncertainty_refuses_huge_planes_in_one_sentence(
    tmp_path, capsys, model_file
):
    from cellfit.batch import predict_files

    image, _ = synthetic_cells((40, 48), n_cells=3, seed=4)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", image)
    events = list(predict_files(model_file, [tmp_path / "in"], tmp_path / "out",
                                device="cpu", uncertainty=True, huge_pixels=100))
    last = events[-1]
    assert last.status == "failed" and "too large for an uncertainty map" in str(last.error)
    assert not any((tmp_path / "out").iterdir())
    # on a cluster: refused before anything starts, naming the flag
    code, err = run(capsys, "predict", model_file, tmp_path / "in", "--out", tmp_path / "o2",
                    "--uncertainty", "--scheduler", "tcp://127.0.0.1:1")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "--scheduler" in lines[0], err
    assert "Traceback" not in err
