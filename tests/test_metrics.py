"""Tests of sim/metrics.py: prompt-colour accuracy and outline IoU."""

import numpy as np
import pytest
import torch

from sim.core import data
from sim.core import metrics
from sim.core.data import COLOURS


@pytest.fixture(scope="module")
def fill():
    return data.make_fill50k(300, size=32, seed=11)


def _flat(name, size=32):
    return np.broadcast_to(np.array(COLOURS[name], np.uint8), (size, size, 3)).copy()


def _square_image(fg="yellow", bg="blue", top=8, left=12, side=10):
    img = _flat(bg)
    img[top : top + side, left : left + side] = COLOURS[fg]
    return img


def _square_outline(top, left, side, size=32):
    cond = np.zeros((size, size, 3), np.uint8)
    cond[top : top + side, left : left + side] = 255
    cond[top + 1 : top + side - 1, left + 1 : left + side - 1] = 0
    return cond


# --- ground truth, flat and noise images -------------------------------------


def test_ground_truth_targets_score_perfectly(fill):
    acc = metrics.colour_accuracy(fill["target"], fill["fg"], fill["bg"])
    assert acc == {"fg_colour_acc": 1.0, "bg_colour_acc": 1.0, "colour_acc": 1.0, "colour_acc_se": 0.0}
    assert metrics.outline_iou(fill["target"], fill["condition"]) >= 0.95


def test_tensors_in_model_range_score_like_uint8(fill):
    t = data.to_tensors(fill)
    assert metrics.colour_accuracy(t["target"], fill["fg"], fill["bg"])["colour_acc"] == 1.0
    per_uint8 = metrics.outline_iou_per_image(fill["target"], fill["condition"])
    per_tensor = metrics.outline_iou_per_image(t["target"], t["condition"])
    assert np.array_equal(per_uint8, per_tensor)


def test_flat_background_has_zero_iou(fill):
    flats = np.stack([_flat(bg) for bg in fill["bg"]])
    assert metrics.outline_iou(flats, fill["condition"]) < 0.01
    acc = metrics.colour_accuracy(flats, fill["fg"], fill["bg"])
    assert acc["bg_colour_acc"] == 1.0 and acc["fg_colour_acc"] == 0.0
    assert metrics.measure_colours(flats[0]) == (None, fill["bg"][0])


def test_noise_images_score_near_chance(fill):
    noise = torch.randn(300, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    acc = metrics.colour_accuracy(noise, fill["fg"], fill["bg"])
    assert abs(acc["bg_colour_acc"] - 1 / 8) < 0.07
    assert abs(acc["fg_colour_acc"] - 1 / 8) < 0.07
    assert acc["colour_acc"] < 0.08
    assert metrics.outline_iou(noise, fill["condition"]) < 0.4


def test_wrong_colours_are_counted_wrong(fill):
    # swap circle and background colours: the geometry is kept, both colours are wrong
    swapped = fill["target"].copy()
    for i, (fg, bg) in enumerate(zip(fill["fg"], fill["bg"])):
        is_fg = (swapped[i] == COLOURS[fg]).all(-1)
        swapped[i][is_fg], swapped[i][~is_fg] = COLOURS[bg], COLOURS[fg]
    acc = metrics.colour_accuracy(swapped, fill["fg"], fill["bg"])
    assert acc == {"fg_colour_acc": 0.0, "bg_colour_acc": 0.0, "colour_acc": 0.0, "colour_acc_se": 0.0}
    assert metrics.outline_iou(swapped, fill["condition"]) >= 0.95


# --- hand-made images --------------------------------------------------------


def test_nearest_colour_map_snaps_off_palette_pixels():
    img = np.array(
        [[[200, 30, 20], [20, 230, 10], [240, 250, 200]], [[90, 100, 110], [10, 20, 220], [250, 0, 240]]],
        np.uint8,
    )
    names = np.array(list(COLOURS))[metrics.nearest_colour_map(img)]
    assert names.tolist() == [["red", "green", "white"], ["black", "blue", "magenta"]]


def test_hand_made_square_known_colours_and_mask():
    img = _square_image("yellow", "blue", top=8, left=12, side=10)
    assert metrics.measure_colours(img) == ("yellow", "blue")
    expected = np.zeros((32, 32), bool)
    expected[8:18, 12:22] = True
    assert np.array_equal(metrics.foreground_mask(img), expected)
    # slightly noisy versions of the same colours still measure the same
    jitter = np.random.default_rng(0).integers(-60, 60, img.shape)
    noisy = np.clip(img.astype(int) + jitter, 0, 255).astype(np.uint8)
    assert metrics.measure_colours(noisy) == ("yellow", "blue")


def test_background_comes_from_the_border_not_the_majority():
    img = _flat("red")
    img[2:30, 2:30] = COLOURS["cyan"]  # the "circle" covers 77% of the image
    assert metrics.measure_colours(img) == ("cyan", "red")


def test_tiny_foreground_counts_as_no_circle():
    img = _flat("green")
    img[10:13, 10:13] = COLOURS["black"]  # 9 px < 2% of 1024
    assert metrics.measure_colours(img) == (None, "green")
    img[10:16, 10:16] = COLOURS["black"]  # 36 px > 2%
    assert metrics.measure_colours(img) == ("black", "green")


def test_disc_from_condition_fills_the_outline():
    disc = metrics.disc_from_condition(_square_outline(5, 6, 12))
    expected = np.zeros((32, 32), bool)
    expected[5:17, 6:18] = True
    assert np.array_equal(disc, expected)
    # float conditions in [0, 1], channels first, give the same disc
    as_float = torch.from_numpy(_square_outline(5, 6, 12)).permute(2, 0, 1).float() / 255
    assert np.array_equal(metrics.disc_from_condition(as_float), expected)


def test_outline_iou_of_shifted_square_is_one_third():
    img = _square_image("white", "black", top=8, left=8, side=10)
    cond = _square_outline(8, 13, 10)  # same square shifted 5 px right
    per = metrics.outline_iou_per_image(img[None], cond[None])
    assert per.shape == (1,) and per[0] == pytest.approx(50 / 150)
    images, conds = np.stack([img, img]), np.stack([cond, _square_outline(8, 8, 10)])
    assert metrics.outline_iou_per_image(images, conds) == pytest.approx([1 / 3, 1.0])
    assert metrics.outline_iou(images, conds) == pytest.approx(2 / 3)


def test_a_list_of_images_works_like_a_batch(fill):
    as_list = [fill["target"][i] for i in range(5)]
    assert metrics.colour_accuracy(as_list, fill["fg"][:5], fill["bg"][:5])["colour_acc"] == 1.0


# --- argument errors ---------------------------------------------------------


def test_colour_label_count_must_match_images(fill):
    with pytest.raises(ValueError, match="fgs"):
        metrics.colour_accuracy(fill["target"][:3], fill["fg"][:2], fill["bg"][:3])
    with pytest.raises(ValueError, match="bgs"):
        metrics.colour_accuracy(fill["target"][:3], fill["fg"][:3], fill["bg"][:4])


def test_bad_shapes_are_rejected(fill):
    with pytest.raises(ValueError, match="img"):
        metrics.nearest_colour_map(np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="img"):
        metrics.measure_colours(np.zeros((32, 32, 3), np.float32))  # float must be channels first
    with pytest.raises(ValueError, match="images"):
        metrics.colour_accuracy(fill["target"][0], ["red"], ["blue"])  # one image, not a batch
    with pytest.raises(ValueError, match="images"):
        metrics.colour_accuracy([], [], [])
    with pytest.raises(ValueError, match="conditions"):
        metrics.outline_iou(fill["target"][:3], fill["condition"][:2])


def test_score_reports_the_standard_error_of_outline_iou(fill):
    """Half perfect images, half flat backgrounds: IoU ~0.5 with SE = std(ddof=1)/sqrt(n)."""
    from sim.engine.evaluate import score, standard_error

    n = 40
    flats = np.stack([_flat(bg) for bg in fill["bg"][n // 2:n]])
    images = np.concatenate([fill["target"][:n // 2], flats])
    out = score(images, fill["condition"][:n], fill["fg"][:n], fill["bg"][:n])
    per = metrics.outline_iou_per_image(images, fill["condition"][:n])
    assert out["outline_iou"] == pytest.approx(per.mean())
    assert out["outline_iou_se"] == pytest.approx(per.std(ddof=1) / np.sqrt(n))
    assert 0.07 < out["outline_iou_se"] < 0.09  # ~0.5 / sqrt(40)
    assert score(fill["target"][:n], fill["condition"][:n], fill["fg"][:n], fill["bg"][:n])["outline_iou_se"] < 0.01
    assert standard_error([0.3]) == 0.0
