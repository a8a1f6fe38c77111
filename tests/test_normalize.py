"""Percentile normalisation and matching an image's channels to the model's."""

from __future__ import annotations

import numpy as np
import pytest

from cellfit.errors import CellfitError
from cellfit.normalize import match_channels, normalize, percentiles


def test_percentile_normalisation_maps_low_and_high_to_0_and_1():
    x = np.arange(1001, dtype=np.uint16).reshape(1, 1, 7, 143)  # values 0..1000
    out = normalize(x, {"method": "percentile", "low": 1.0, "high": 99.0})
    assert out.dtype == np.float32 and out.shape == x.shape
    # the 1st and 99th percentiles of 0..1000 are 10 and 990
    np.testing.assert_allclose(out.ravel()[[10, 990, 500]], [0.0, 1.0, 0.5], atol=1e-6)


def test_normalisation_is_per_channel_and_handles_flat_images():
    x = np.zeros((2, 2, 10, 10), np.float32)
    x[:, 0] = np.linspace(0, 1, 100).reshape(10, 10)
    x[:, 1] = 7.0  # a flat channel
    stats = percentiles(x, 0.0, 100.0)
    np.testing.assert_allclose(stats, [[0.0, 1.0], [7.0, 7.0]])
    out = normalize(x, {"method": "percentile", "low": 0.0, "high": 100.0})
    np.testing.assert_allclose(out[:, 0], x[:, 0], atol=1e-6)
    assert np.isfinite(out).all() and (out[:, 1] == 0).all()


def test_unknown_normalisation_method():
    with pytest.raises(CellfitError, match="normalisation 'zscore'"):
        normalize(np.zeros((1, 1, 2, 2)), {"method": "zscore"})


def test_grayscale_into_an_rgb_model_is_repeated():
    x = np.random.default_rng(0).random((2, 1, 5, 6)).astype(np.float32)
    out = match_channels(x, 3)
    assert out.shape == (2, 3, 5, 6)
    for c in range(3):
        np.testing.assert_array_equal(out[:, c], x[:, 0])


def test_rgb_and_rgba_into_a_grayscale_model_are_averaged():
    x = np.random.default_rng(0).random((1, 4, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(match_channels(x[:, :3], 1)[:, 0], x[:, :3].mean(1), rtol=1e-6)
    np.testing.assert_allclose(
        match_channels(x, 1)[:, 0], x[:, :3].mean(1), rtol=1e-6
    )  # alpha dropped
    np.testing.assert_array_equal(match_channels(x, 3), x[:, :3])


@pytest.mark.parametrize(("have", "want"), [(2, 1), (5, 1), (2, 3), (3, 2)])
def test_other_channel_mismatches_are_errors(have, want):
    """Averaging a nuclei and a membrane channel into one is not what the model saw
    (this used to average any number of channels into a grayscale model)."""
    x = np.zeros((1, have, 4, 4), np.float32)
    with pytest.raises(
        CellfitError, match=f"has {have} channels but the model was trained on {want}"
    ):
        match_channels(x, want)


def test_sample_steps_bound_the_pixels_percentiles_read(monkeypatch):
    import cellfit.normalize as cnorm

    assert cnorm.sample_steps(1, 100, 100) == (1, 1)
    monkeypatch.setattr(cnorm, "MAX_SAMPLES", 1000)
    step, plane_step = cnorm.sample_steps(10, 200, 300)
    read = -(-10 // plane_step) * -(-200 // step) * -(-300 // step)
    assert read <= 2 * 1000
    rng = np.random.default_rng(0)
    planes = rng.random((10, 1, 200, 300))
    sample = planes[::plane_step, 0, ::step, ::step]
    np.testing.assert_allclose(percentiles(planes, 1, 99)[0], np.percentile(sample, [1, 99]))
