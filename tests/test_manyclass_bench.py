"""The generator of benchmarks/manyclass.py (issue #15): reproducible, 32 classes, one
holding about 99 % of the pixels, rare classes not told apart by brightness, and a sparse
annotation in cellfit's semantic convention."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def mc():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "manyclass.py"
    spec = importlib.util.spec_from_file_location("manyclass_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scenes(mc):
    s = mc.generate(3, 16, 256)
    mc.paint(s, 3)
    return s


def test_same_seed_same_scenes(mc, scenes):
    again = mc.generate(3, 16, 256)
    mc.paint(again, 3)
    for a, b in zip(scenes, again):
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.classes, b.classes)
        assert np.array_equal(a.annotation, b.annotation)
    other = mc.generate(4, 2, 256)
    assert not np.array_equal(other[0].image, scenes[0].image)


def test_32_classes_background_about_99_percent(mc, scenes):
    assert len(mc.CLASSES) == 31 and len(set(mc.CLASS_NAMES)) == mc.N_CLASSES == 32
    cls = np.concatenate([s.classes.ravel() for s in scenes])
    assert set(np.unique(cls)) == set(range(32))
    assert 0.975 <= (cls == 0).mean() <= 0.995
    # rare classes are rare: most of them are absent from most images
    absent = np.mean([[k not in s.classes for s in scenes] for k in range(1, 32)])
    assert absent > 0.6


def test_brightness_alone_does_not_tell_the_classes_apart(mc, scenes):
    signal = np.concatenate([s.signal.ravel() for s in scenes])
    cls = np.concatenate([s.classes.ravel() for s in scenes])
    means = np.array([signal[cls == k].mean() for k in range(1, 32)])
    assert np.sum(np.abs(means - mc.BRIGHT) < 0.01) >= 20
    # the classes sharing a brightness still differ in shape, size or texture
    same = [c for c in mc.CLASSES if c.brightness == mc.BRIGHT]
    assert len({(c.shape, c.size, c.texture) for c in same}) == len(same)
    assert len({c.shape for c in same}) >= 5 and len({c.texture for c in same}) >= 4
    assert len({c.size for c in same}) == 3


def test_every_class_can_be_told_apart_by_eye(mc):
    # a texture needs room to show: the small (8 pixel) classes are flat and differ by shape
    small = [c for c in mc.CLASSES if c.size == "small"]
    assert small and all(c.texture == "flat" for c in small)
    assert len({(c.shape, c.brightness) for c in small}) == len(small)
    assert len({(c.shape, c.size, c.texture) for c in mc.CLASSES}) == 31


def test_annotation_follows_the_semantic_convention_and_is_sparse(mc, scenes):
    painted_objects = total_objects = 0
    for s in scenes:
        a = s.annotation
        assert a.dtype == np.uint8 and a.shape == s.classes.shape
        assert (a == 0).mean() > 0.9  # mostly not annotated
        cells = a >= 2
        assert np.array_equal(a[cells], s.classes[cells] + 1)  # class k painted as k + 1
        assert (s.classes[a == 1] == 0).all()  # background strokes on background only
        ids = np.unique(s.objects[s.objects > 0])
        for j in ids:
            obj = s.objects == j
            painted = cells[obj]
            assert painted.all() or not painted.any()  # objects painted whole or not at all
            painted_objects += int(painted.all())
        total_objects += len(ids)
    assert 0.35 <= painted_objects / total_objects <= 0.65
    ann = np.concatenate([s.annotation.ravel() for s in scenes])
    assert set(np.unique(ann)) == set(range(33))  # background + every class painted somewhere
