"""Classes of whole objects (cellfit.objectclass) on small constructed scenes."""

import json

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import disk, ellipse

from cellfit.errors import CellfitError
from cellfit.objectclass import (
    ObjectClassifier,
    best_threshold,
    classify_objects,
    examples_from_annotation,
    examples_from_found,
    fit_classifier,
    fit_pixel_vote,
    object_features,
    painted_whole,
    with_ring,
)


def scene(seed, n=6, size=160):
    """Discs (class 1), rods (class 2) and rings (class 3) of equal brightness on a
    noisy background; returns the image and the class of each pixel."""
    rng = np.random.default_rng(seed)
    classes = np.zeros((size, size), np.uint8)
    centres = [(24 + 36 * (i // 4), 24 + 36 * (i % 4)) for i in range(16)]
    for j, (y, x) in enumerate(centres[:n]):
        k = 1 + j % 3
        if k == 1:
            classes[disk((y, x), 8, shape=classes.shape)] = 1
        elif k == 2:
            rr, cc = ellipse(y, x, 3, 13, shape=classes.shape, rotation=rng.uniform(0, np.pi))
            classes[rr, cc] = 2
        else:
            ring = np.zeros_like(classes, bool)
            ring[disk((y, x), 10, shape=classes.shape)] = True
            ring[disk((y, x), 5, shape=classes.shape)] = False
            classes[ring] = 3
    image = 0.1 + 0.5 * (classes > 0) + rng.normal(0, 0.03, classes.shape)
    return image.astype(np.float32), classes


def test_features_tell_shapes_apart():
    image, classes = scene(0)
    ids, feats = object_features(image, classes.astype(int) * 0 + _objects(classes))
    assert feats.shape == (6, 16 + 2)
    holes = feats[:, 5]
    kinds = [int(classes[_objects(classes) == i].max()) for i in ids]
    assert all((h >= 1) == (k == 3) for h, k in zip(holes, kinds))  # rings have a hole
    ecc = feats[:, 2]
    assert min(e for e, k in zip(ecc, kinds) if k == 2) > max(e for e, k in zip(ecc, kinds) if k == 1)


def _objects(classes):
    from scipy import ndimage as ndi

    return ndi.label(classes > 0)[0]


def test_examples_are_the_painted_pieces():
    image, classes = scene(1)
    ann = np.zeros_like(classes)
    ann[classes > 0] = classes[classes > 0] + 1  # every object painted whole
    ann[:4, :] = 1  # a background stroke is no example
    feats, ks = examples_from_annotation(image, ann)
    assert sorted(ks.tolist()) == [1, 1, 2, 2, 3, 3]
    assert feats.shape[0] == 6


def test_one_painted_example_per_class_names_new_objects():
    image, classes = scene(2, n=3)  # one disc, one rod, one ring
    ann = np.where(classes > 0, classes + 1, 0).astype(np.uint8)
    clf = fit_classifier(*examples_from_annotation(image, ann))
    test_image, truth = scene(3, n=12)
    out = classify_objects(test_image, truth > 0, clf, n_classes=4)
    assert out.dtype == np.uint8
    assert np.array_equal(out, truth)


def test_an_object_takes_one_class():
    image, classes = scene(4, n=3)
    ann = np.where(classes > 0, classes + 1, 0).astype(np.uint8)
    clf = fit_classifier(*examples_from_annotation(image, ann))
    out = classify_objects(image, classes > 0, clf, n_classes=4)
    objects = _objects(classes)
    for i in range(1, objects.max() + 1):
        assert len(np.unique(out[objects == i])) == 1


def test_classifier_survives_json_and_refuses_damage():
    image, classes = scene(5)
    ann = np.where(classes > 0, classes + 1, 0).astype(np.uint8)
    clf = fit_classifier(*examples_from_annotation(image, ann))
    back = ObjectClassifier.from_dict(json.loads(json.dumps(clf.to_dict())))
    _, feats = object_features(image, _objects(classes))
    assert np.array_equal(back.predict(feats), clf.predict(feats))
    broken = clf.to_dict()
    broken["classes"] = broken["classes"][:-1]
    with pytest.raises(CellfitError, match="damaged"):
        ObjectClassifier.from_dict(broken)
    with pytest.raises(CellfitError, match="channels"):
        clf.predict(np.zeros((2, feats.shape[1] + 2)))


def test_leave_one_out_sees_separable_classes():
    image, classes = scene(6, n=12)
    ann = np.where(classes > 0, classes + 1, 0).astype(np.uint8)
    clf = fit_classifier(*examples_from_annotation(image, ann))
    assert clf.leave_one_out() == 1.0
    first = [int(np.flatnonzero(clf.classes == k)[0]) for k in (1, 2, 3)]
    one_each = fit_classifier(clf.examples[first], clf.classes[first])
    assert one_each.leave_one_out() is None
    assert fit_classifier(np.zeros((0, 0)), np.zeros(0)) is None


def test_painted_whole_tells_objects_from_strokes():
    _, classes = scene(7, n=6)
    whole_ann = np.where(classes > 0, classes + 1, 0).astype(np.uint8)
    assert painted_whole([whole_ann], [classes > 0]) == (6, 6)
    # two tissue regions, each crossed by one stroke
    regions = np.zeros((120, 120), np.uint8)
    regions[:, :60], regions[:, 60:] = 1, 2
    strokes = np.zeros_like(regions)
    strokes[50:53, 10:50] = 2
    strokes[50:53, 70:110] = 3
    assert painted_whole([strokes], [regions > 0]) == (0, 2)
    # a painted object nothing was found on is not whole
    assert painted_whole([whole_ann], [np.zeros_like(classes, bool)]) == (0, 0)  # cannot tell


def test_examples_from_found_objects_and_painted_background():
    image, classes = scene(8, n=6)
    found = classes > 0
    found[140:150, 140:150] = True  # a false object ...
    ann = np.zeros_like(classes)
    ann[145, 130:155] = 1  # ... crossed by a background stroke
    objects = _objects(classes)
    first = objects == 1
    ann[first] = classes[first] + 1  # one object painted whole
    missed = objects == 2
    ann[missed] = classes[missed] + 1  # one painted object the model did not find
    found[missed] = False
    feats, ks = examples_from_found(image, ann, found)
    assert sorted(ks.tolist()) == sorted([0, int(classes[first].max()), int(classes[missed].max())])
    clf = fit_classifier(feats, ks)
    out = classify_objects(image, found, clf, n_classes=4)
    assert not out[140:150, 140:150].any()  # the false object is dropped as background
    assert (out[first] == classes[first]).all()


# ------------------------------------------------------------- in training and prediction
TINY = {"patch_size": 64, "batch_size": 2, "decoder_channels": (16, 16, 16, 16, 16),
        "mode": "semantic", "steps": 2, "val_every": 100, "time_limit": None}


def _painted_scene():
    image, classes = scene(9, n=6)
    ann = np.where(classes > 0, classes + 1, 0).astype(np.uint8)
    ann[150:, :] = 1
    return image, classes, ann


def test_training_keeps_object_examples_in_the_model(tmp_path):
    from cellfit.model import read_model_info
    from cellfit.postprocess import labels_from_probs
    from cellfit.predict import predict_plane
    from cellfit.train import TrainConfig, Trainer

    image, _, ann = _painted_scene()
    t = Trainer([image], [ann], TrainConfig(classify="objects", **TINY))
    list(t.run())
    record = t.info.training[-1]["objects"]
    assert record["by"] == "objects" and record["painted"] == 6
    assert record["vote"] and "pixel_vote" in t.info.postprocess["objects"]
    assert record["examples"] >= 1
    saved = read_model_info(t.save(tmp_path / "m.cellfit"))
    assert saved.postprocess["objects"] == t.info.postprocess["objects"]
    probs = predict_plane(t.model, t.info, image[None], device=t.device)
    out = labels_from_probs(probs, "semantic", image=image[None], **t.info.postprocess)
    objects = _objects(np.argmax(probs, 0) > 0)
    for i in range(1, objects.max() + 1):  # one class per object found
        assert len(np.unique(out[objects == i])) == 1
    # without the image, pixel by pixel
    assert np.array_equal(labels_from_probs(probs, "semantic", **t.info.postprocess),
                          np.argmax(probs, 0))


def test_a_ring_of_background_only_around_painted_objects_and_only_for_objects():
    from cellfit.train import TrainConfig, Trainer

    ann = np.zeros((20, 20), np.uint8)
    ann[5:9, 5:9] = 3
    ann[5:9, 9:12] = 2  # a touching painted neighbour keeps its class
    ann[0, :] = 1
    ringed = with_ring(ann, 2)
    assert ringed is not ann and (ann[10:12, 5:9] == 0).all()  # the input is untouched
    assert (ringed[9:11, 5:12] == 1).all() and (ringed[5:9, 9:12] == 2).all()
    assert (ringed[14:, :] == 0).all()  # far away: still unpainted

    image, _, painted = _painted_scene()
    objects = Trainer([image], [painted], TrainConfig(classify="objects", **TINY))
    assert objects.ring
    plain = Trainer([image], [painted], TrainConfig(classify="auto", **TINY))
    assert not plain.ring
    background = [(t.train_targets[0] == 0).sum() for t in (objects, plain)]
    assert background[0] > background[1]  # the ring is in what the network learns
    list(objects.run())  # the model now has object classes: training it again rings
    again = Trainer([image], [painted], TrainConfig(classify="auto", **TINY),
                    model=objects.model, info=objects.info)
    assert again.ring
    assert not Trainer([image], [painted], TrainConfig(classify="pixels", **TINY),
                       model=objects.model, info=objects.info).ring


def test_pixels_drop_the_examples_a_model_had():
    from cellfit.train import TrainConfig, Trainer

    image, _, ann = _painted_scene()
    t = Trainer([image], [ann], TrainConfig(classify="objects", **TINY))
    list(t.run())
    assert "objects" in t.info.postprocess
    again = Trainer([image], [ann], TrainConfig(classify="pixels", **TINY),
                    model=t.model, info=t.info)
    list(again.run())
    assert "objects" not in again.info.postprocess
    assert again.info.training[-1]["objects"]["by"] == "pixels"


def test_auto_follows_whether_painted_objects_are_whole(monkeypatch):
    import cellfit.train as train_module
    from cellfit.train import TrainConfig, Trainer

    image, classes, ann = _painted_scene()
    truth = (classes > 0).astype(np.float32)

    def fake_predict(model, info, plane, **kwargs):  # the network "finds" the true objects
        ys, xs = np.nonzero(current["ann"])
        m = train_module.OBJECTS_MARGIN
        crop = truth[max(0, ys.min() - m) : ys.max() + 1 + m, max(0, xs.min() - m) : xs.max() + 1 + m]
        if crop.shape != plane.shape[1:]:  # a validation crop
            return np.full((4, *plane.shape[1:]), 0.25, np.float32)
        return np.stack([1 - crop, crop, 0 * crop, 0 * crop])

    monkeypatch.setattr(train_module, "predict_plane", fake_predict)
    current = {}

    def run(annotation):
        current["ann"] = annotation
        t = Trainer([image], [annotation], TrainConfig(classify="auto", **TINY))
        list(t.run())
        return t

    whole = run(ann)
    assert whole.info.training[-1]["objects"]["by"] == "objects"
    assert whole.info.training[-1]["objects"]["whole"] == 6
    strokes = np.zeros_like(ann)  # a short stroke across each object: not whole
    for sl in ndi_find(classes):
        y = (sl[0].start + sl[0].stop) // 2
        strokes[y, sl[1].start + 2 : sl[1].start + 4] = classes[y, sl[1].start + 3] + 1
    strokes[150:, :] = 1
    part = run(strokes)
    assert part.info.training[-1]["objects"]["by"] == "pixels"
    assert "objects" not in part.info.postprocess


def test_the_outline_threshold_fits_the_painted_objects():
    _, classes, ann = _painted_scene()
    fat = ndimage.binary_dilation(classes > 0, iterations=2)
    # background probability: low inside the objects, 0.35 on a 2-pixel halo around them
    p_bg = np.where(classes > 0, 0.02, np.where(fat, 0.35, 0.9)).astype(np.float32)
    t, score = best_threshold([ann], [p_bg[None]])
    assert t == 0.3 and score == pytest.approx(1.0)
    exact = np.where(classes > 0, 0.1, 0.9).astype(np.float32)
    assert best_threshold([ann], [exact[None]])[0] == 0.5  # the first of equals


def test_grouped_weights_weigh_background_against_all_objects():
    from cellfit.losses import balanced_class_weights, grouped_class_weights

    assert grouped_class_weights([900, 100]) == balanced_class_weights([900, 100])
    counts = [9000] + [100] * 30
    flat, grouped = balanced_class_weights(counts), grouped_class_weights(counts)
    assert flat[1] / flat[0] == pytest.approx(90)  # each rare class against background
    assert grouped[1] / grouped[0] == pytest.approx(3)  # background against all 30 together
    assert sum(g * c for g, c in zip(grouped[1:], counts[1:])) == pytest.approx(grouped[0] * 9000)


def ndi_find(classes):
    from scipy import ndimage as ndi

    return ndi.find_objects(_objects(classes))


def test_cli_classify_needs_semantic_mode(tmp_path, capsys):
    from cellfit.cli import main

    rc = main(["train", str(tmp_path / "a.tif"), "--labels", str(tmp_path / "a_labels.tif"),
               "--out", str(tmp_path / "m.cellfit"), "--classify", "objects"])
    err = capsys.readouterr().err
    assert rc != 0 and "--classify is for semantic mode" in err and "Traceback" not in err


def test_the_words_say_how_classes_are_decided():
    from cellfit.cli import class_rule_text
    from cellfit.model import ModelInfo
    from cellfit.train import objects_text

    image, _, ann = _painted_scene()
    clf = fit_classifier(*examples_from_annotation(image, ann))
    info = ModelInfo(mode="semantic", n_classes=4, class_names=["background", "a", "b", "c"],
                     postprocess={"objects": clf.to_dict()})
    assert class_rule_text(info).startswith("each object found takes one class")
    assert "6 painted objects" in class_rule_text(info)
    info.postprocess = {}
    assert class_rule_text(info) == "each pixel takes its likeliest class"
    by = objects_text({"objects": {"by": "objects", "examples": 7, "background_examples": 2}})
    assert "most alike of 7 painted objects (2 of them false objects" in by
    pixels = objects_text({"objects": {"by": "pixels", "whole": 1, "painted": 9}}, flag="X")
    assert pixels == ("Classes pixel by pixel: 1 of 9 painted pieces were painted whole "
                      "(X to class whole objects anyway)")
    assert objects_text({}) == ""


def test_a_grey_image_is_classed_like_its_copy_in_a_colour_models_channels():
    image, _, ann = _painted_scene()
    rgb = np.repeat(image[None], 3, axis=0)  # as a grey image reaches an RGB model
    clf = fit_classifier(*examples_from_annotation(rgb, ann))
    assert clf.n_channels == 3
    test_image, truth = scene(3, n=12)
    grey = classify_objects(test_image, truth > 0, clf, n_classes=4)
    colour = classify_objects(np.repeat(test_image[None], 3, axis=0), truth > 0, clf, 4)
    assert np.array_equal(grey, colour) and (grey > 0).any()
    with pytest.raises(CellfitError, match="channels"):
        classify_objects(np.zeros((2, 160, 160), np.float32), truth > 0, clf, 4)


def test_cellfit_predict_classes_whole_objects(tmp_path):
    import tifffile

    from cellfit.cli import main
    from cellfit.train import TrainConfig, Trainer

    image, _, ann = _painted_scene()
    t = Trainer([image], [ann], TrainConfig(classify="objects", **TINY))
    list(t.run())
    # every painted example of class 3: each object found must come out class 3, whatever
    # its pixels' likeliest classes
    t.info.postprocess["objects"]["classes"] = [3] * len(t.info.postprocess["objects"]["classes"])
    t.info.postprocess["objects"].pop("pixel_vote")  # the examples decide
    model = t.save(tmp_path / "m.cellfit")
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", image)
    assert main(["predict", str(model), str(tmp_path / "in" / "a.tif"),
                 "--out", str(tmp_path / "out"), "--probabilities"]) == 0
    labels = tifffile.imread(tmp_path / "out" / "a_labels.tif")
    probs = tifffile.imread(tmp_path / "out" / "a_prob.tif")
    clf = ObjectClassifier.from_dict(t.info.postprocess["objects"])
    found = _objects(probs[0] < clf.threshold)
    assert found.max() > 0
    assert np.array_equal(labels, np.where(found > 0, 3, 0))


@pytest.mark.parametrize("whole", [6, 1])
def test_auto_learns_the_ring_from_a_third_of_the_run_when_objects_are_whole(monkeypatch, whole):
    from cellfit.train import TrainConfig, Trainer

    image, _, ann = _painted_scene()
    t = Trainer([image], [ann], TrainConfig(classify="auto", **{**TINY, "steps": 6}))
    assert t.ring_pending and not t.ring
    before = [x.copy() for x in t.train_targets]
    calls = []

    def found(self=t):
        calls.append(self.step)
        return [], [], [], 0.5, whole, 6

    monkeypatch.setattr(t, "_found_objects", found)
    list(t.run())
    assert calls[0] == 2  # decided once, a third into the run (then again at the end)
    assert t.ring == (whole == 6) and not t.ring_pending
    changed = any(not np.array_equal(a, b) for a, b in zip(before, t.train_targets))
    assert changed == (whole == 6)
    assert t.ring_from_step == (2 if whole == 6 else None)


def test_a_resumed_run_keeps_the_ring_it_had_learnt(monkeypatch, tmp_path):
    from cellfit.train import TrainConfig, Trainer

    image, _, ann = _painted_scene()
    cfg = TrainConfig(classify="auto", checkpoint=tmp_path / "m.resume",
                      **{**TINY, "steps": 9})
    t = Trainer([image], [ann], cfg)
    monkeypatch.setattr(t, "_found_objects", lambda: ([], [], [], 0.5, 6, 6))
    for ev in t.run():
        if ev.step == 5:
            t.stop()
    assert t.ring and t.ring_from_step == 3
    again = Trainer([image], [ann], TrainConfig(**{**cfg.__dict__, "resume": True}))
    assert again.ring and again.ring_from_step == 3 and not again.ring_pending
    assert all(np.array_equal(a, b) for a, b in zip(again.train_targets, t.train_targets))


def _textured(seed, size=160):
    """Discs of one size and mean brightness: flat (class 1) or striped (class 2)."""
    rng = np.random.default_rng(seed)
    classes = np.zeros((size, size), np.uint8)
    _, xx = np.mgrid[0:size, 0:size]
    stripes = 0.5 + 0.35 * np.sin(xx * 1.6)
    image = np.full((size, size), 0.1)
    for j in range(16):
        y, x = 20 + 40 * (j // 4), 20 + 40 * (j % 4)
        rr, cc = disk((y, x), 11, shape=classes.shape)
        k = 1 + (j + seed) % 2
        classes[rr, cc] = k
        image[rr, cc] = 0.5 if k == 1 else stripes[rr, cc]
    image = image + rng.normal(0, 0.02, image.shape)
    return image.astype(np.float32), classes


def test_the_pixel_vote_tells_textures_apart_from_one_painted_object_each():
    image, classes = _textured(0)
    ann = np.zeros_like(classes)
    objects = ndimage.label(classes > 0)[0]
    for k in (1, 2):  # one object of each class painted whole, a little background
        first = objects[classes == k].min()
        ann[objects == first] = k + 1
    ann[:4, :] = 1
    vote = fit_pixel_vote([image], [ann])
    assert vote is not None and list(vote.classes) == [0, 1, 2]
    test_image, truth = _textured(1)
    clf = fit_classifier(*examples_from_annotation(image, ann))
    clf.vote = vote
    out = classify_objects(test_image, truth > 0, clf, n_classes=3)
    assert np.array_equal(out, truth)
    # an "object" of plain background (a false object) is dropped
    false = np.zeros_like(truth)
    false[2:8, 40:120] = 1
    assert not classify_objects(test_image, false > 0, clf, n_classes=3).any()


def test_the_pixel_vote_survives_json_and_refuses_damage():
    image, _, ann = _painted_scene()
    clf = fit_classifier(*examples_from_annotation(image, ann))
    clf.vote = fit_pixel_vote([image], [ann])
    d = json.loads(json.dumps(clf.to_dict()))
    back = ObjectClassifier.from_dict(d)
    test_image, truth = scene(3, n=12)
    assert np.array_equal(classify_objects(test_image, truth > 0, back, 4),
                          classify_objects(test_image, truth > 0, clf, 4))
    d["pixel_vote"]["weights"] = d["pixel_vote"]["weights"][:-1]
    with pytest.raises(CellfitError, match="damaged"):
        ObjectClassifier.from_dict(d)
    assert fit_pixel_vote([image], [np.where(ann > 0, 1, 0)]) is None  # one class only
