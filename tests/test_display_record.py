"""The model record shown in the plugin explains the post-processing it will apply."""

from __future__ import annotations

from cellfit.model import ModelInfo
from cellfit.plugin._display import model_record_html


def test_the_record_says_when_touching_cells_are_cut_apart():
    plain = ModelInfo(postprocess={"min_size": 120})
    html = model_record_html(plain, None, saved=False)
    assert "Objects smaller than 120 pixels are dropped." in html
    assert "cut apart" not in html
    convex = ModelInfo(postprocess={"min_size": 120, "split_area": 480})
    assert "cut apart at their waist" in model_record_html(convex, None, saved=False)
