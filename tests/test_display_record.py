"""The model record shown in the plugin explains the post-processing it will apply."""

from __future__ import annotations

from cellfit.model import ModelInfo
from cellfit.plugin._display import STARTING_PURPOSE, model_record_html


def test_the_record_says_when_touching_cells_are_cut_apart():
    plain = ModelInfo(postprocess={"min_size": 120})
    html = model_record_html(plain, None, saved=False)
    assert "Objects smaller than 120 pixels are dropped." in html
    assert "cut apart" not in html
    convex = ModelInfo(postprocess={"min_size": 120, "split_area": 480})
    assert "cut apart at their waist" in model_record_html(convex, None, saved=False)


def test_the_starting_models_pretraining_is_not_counted_as_a_run_of_the_user():
    from cellfit.model import read_model_info
    from cellfit.starting import starting_model_path

    info = read_model_info(starting_model_path())
    # the shipped file says so, for each of its pretraining runs (v1, then v2's and v3's)
    assert len(info.training) >= 2
    assert all(r["purpose"].startswith(STARTING_PURPOSE) for r in info.training)
    assert info.training[-1]["purpose"] == STARTING_PURPOSE + " v3"
    alone = model_record_html(info, None, saved=True)
    assert "Pretraining" in alone and "not your images" in alone and "Run 1" not in alone
    assert alone.count("Pretraining") == len(info.training)
    info.training.append({"steps": 40, "init": "cellfit starting model",
                          "annotation": {"cells": 10}})
    html = model_record_html(info, None, saved=False)
    assert "Run 1</b>" in html and "Run 2" not in html
    assert "fine-tuned from the cellfit starting model" in html
    assert html.index("Run 1") < html.index("Pretraining")  # newest first


def test_the_record_says_how_a_semantic_model_decides_classes():
    names = ["background", "a", "b"]
    objects = {"examples": [[1.0, 2.0], [2.0, 1.0], [0.0, 0.0]], "classes": [1, 2, 0],
               "mean": [1.0, 1.0], "scale": [1.0, 1.0], "threshold": 0.2}
    by_object = ModelInfo(mode="semantic", n_classes=3, class_names=names,
                          postprocess={"objects": objects})
    html = model_record_html(by_object, None, saved=False)
    assert "most alike of 3 painted objects" in html
    by_pixel = ModelInfo(mode="semantic", n_classes=3, class_names=names)
    assert "Classes pixel by pixel" in model_record_html(by_pixel, None, saved=False)
    cells = model_record_html(ModelInfo(), None, saved=False)
    assert "Classes by whole objects" not in cells and "Classes pixel by pixel" not in cells
