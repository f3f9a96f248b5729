"""Tests of sim/data.py: generators, disk cache, tensors and client partitions."""

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from scipy import ndimage

from sim.core import data
from sim.core.data import COLOURS


@pytest.fixture(scope="module")
def fill():
    return data.make_fill50k(400, size=32, seed=3)


def _rgb(name):
    return np.array(COLOURS[name], dtype=np.uint8)


# --- palette ---------------------------------------------------------------


def test_palette_is_the_eight_rgb_cube_corners():
    assert list(COLOURS) == ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black"]
    corners = {tuple(int(v) for v in c) for c in COLOURS.values()}
    assert corners == {(r, g, b) for r in (0, 255) for g in (0, 255) for b in (0, 255)}


# --- fill50k ---------------------------------------------------------------


def test_fill50k_same_seed_same_bytes_other_seed_differs():
    a, b = data.make_fill50k(30, seed=7), data.make_fill50k(30, seed=7)
    c = data.make_fill50k(30, seed=8)
    for key in ("target", "condition", "cx", "cy", "r"):
        assert a[key].tobytes() == b[key].tobytes()
    assert a["prompt"] == b["prompt"]
    assert a["target"].tobytes() != c["target"].tobytes()
    assert a["prompt"] != c["prompt"]


@pytest.mark.parametrize("size", [8, 32, 64])
def test_fill50k_shapes_and_dtypes(size):
    d = data.make_fill50k(5, size=size)
    assert set(d) == {"target", "condition", "prompt", "fg", "bg", "cx", "cy", "r"}
    for key in ("target", "condition"):
        assert d[key].shape == (5, size, size, 3) and d[key].dtype == np.uint8
    for key in ("cx", "cy", "r"):
        assert d[key].shape == (5,) and d[key].dtype == np.float64
    assert len(d["prompt"]) == len(d["fg"]) == len(d["bg"]) == 5
    # the condition is white on black only
    assert set(np.unique(d["condition"])) == {0, 255}


def test_prompts_name_the_colours_drawn(fill):
    for i, (prompt, fg, bg) in enumerate(zip(fill["prompt"], fill["fg"], fill["bg"])):
        assert fg != bg
        assert prompt == f"a {fg} circle on a {bg} background"
        centre = fill["target"][i, int(round(fill["cy"][i])), int(round(fill["cx"][i]))]
        assert np.array_equal(centre, _rgb(fg))
        assert np.array_equal(fill["target"][i, 0, 0], _rgb(bg))
        # exactly two colours in the target
        assert len(np.unique(fill["target"][i].reshape(-1, 3), axis=0)) == 2


def test_colour_pairs_cover_all_56_ordered_pairs():
    d = data.make_fill50k(2000, seed=0)
    pairs = list(zip(d["fg"], d["bg"]))
    counts = {p: pairs.count(p) for p in set(pairs)}
    assert len(counts) == 56
    assert min(counts.values()) > 10 and max(counts.values()) < 70  # expected 35.7 each


def test_circles_have_allowed_radius_and_stay_inside(fill):
    size = 32
    assert fill["r"].min() >= 0.15 * size and fill["r"].max() <= 0.35 * size
    assert fill["r"].max() - fill["r"].min() > 0.15 * size  # radii really vary
    for i in range(len(fill["r"])):
        ring = np.ones((size, size), bool)
        ring[2:-2, 2:-2] = False  # 2 px margin at size 32
        assert (fill["target"][i][ring] == _rgb(fill["bg"][i])).all()


def test_outline_lies_on_the_disc_boundary(fill):
    for i in range(len(fill["r"])):
        disc = (fill["target"][i] != _rgb(fill["bg"][i])).any(axis=-1)
        outline = fill["condition"][i, ..., 0] > 127
        assert outline.any()
        assert not (outline & ~disc).any()  # on the disc
        outside_neighbour = ndimage.binary_dilation(~disc) & disc
        assert np.array_equal(outline, outside_neighbour)  # 1 px: exactly the inner boundary
        assert np.array_equal(ndimage.binary_fill_holes(outline), disc)
        ys, xs = np.nonzero(outline)
        dist = np.hypot(xs - fill["cx"][i], ys - fill["cy"][i])
        assert dist.max() <= fill["r"][i] and dist.min() > fill["r"][i] - 1


def test_outline_thickness_scales_with_size():
    assert data.outline_thickness(32) == 1 and data.outline_thickness(64) == 2
    d = data.make_fill50k(20, size=64, seed=1)
    for i in range(20):
        outline = d["condition"][i, ..., 0] > 127
        disc = ndimage.binary_fill_holes(outline)
        # two erosions of the disc remove the whole outline, one does not
        assert not (outline & ndimage.binary_erosion(disc, iterations=2)).any()
        assert (outline & ndimage.binary_erosion(disc, iterations=1)).any()


# --- faces -----------------------------------------------------------------


@pytest.fixture(scope="module")
def faces():
    return data.make_faces(size=32, seed=0)


def test_faces_shape_greyscale_and_prompt(faces):
    assert set(faces) == {"target", "condition", "prompt"}
    assert faces["target"].shape == (100, 32, 32, 3) and faces["target"].dtype == np.uint8
    assert faces["condition"].shape == (100, 32, 32, 3) and faces["condition"].dtype == np.uint8
    t = faces["target"]
    assert (t[..., 0] == t[..., 1]).all() and (t[..., 0] == t[..., 2]).all()
    assert t.std() > 20  # real pictures, not flat
    assert faces["prompt"] == ["a photo of a face"] * 100


def test_face_edges_are_binary_and_never_empty(faces):
    cond = faces["condition"]
    assert set(np.unique(cond)) == {0, 255}
    lit = (cond[..., 0] > 0).mean(axis=(1, 2))
    assert (lit > 0.01).all() and (lit < 0.5).all()


def test_faces_are_the_lfw_faces_not_the_non_faces():
    from skimage import data as skdata

    lfw = skdata.lfw_subset()
    assert lfw.shape == (200, 25, 25)
    native = data.make_faces(size=25)["target"][..., 0]
    expected = np.round(lfw[:100] * 255).astype(np.uint8)
    assert np.abs(native.astype(int) - expected).max() <= 1


def test_faces_subset_by_seed():
    a = data.make_faces(size=16, seed=1, n=10)
    b = data.make_faces(size=16, seed=1, n=10)
    c = data.make_faces(size=16, seed=2, n=10)
    assert a["target"].shape == (10, 16, 16, 3)
    assert a["target"].tobytes() == b["target"].tobytes()
    assert a["target"].tobytes() != c["target"].tobytes()


# --- cache -----------------------------------------------------------------


def test_cache_round_trip_is_bit_identical(tmp_path):
    ds = data.load_dataset("fill50k", n=50, size=16, seed=4, cache_dir=tmp_path)
    ref = data.make_fill50k(50, size=16, seed=4)
    assert isinstance(ds, datasets.Dataset) and len(ds) == 50
    assert (tmp_path / "datasets" / f"fill50k-v{data.DATA_VERSION}-n50-s16-seed4").is_dir()
    for key in ("target", "condition"):
        got = ds[key][:]
        assert got.dtype == np.uint8 and got.shape == (50, 16, 16, 3)
        assert got.tobytes() == ref[key].tobytes()
    for key in ("cx", "cy", "r"):
        assert np.asarray(ds[key][:], dtype=np.float64).tobytes() == ref[key].tobytes()
    for key in ("prompt", "fg", "bg"):
        assert list(ds[key][:]) == ref[key]
    row = ds[3]
    assert row["target"].dtype == np.uint8 and np.array_equal(row["target"], ref["target"][3])
    assert row["prompt"] == ref["prompt"][3] and row["r"] == ref["r"][3]


def test_second_load_reads_the_cache(tmp_path, monkeypatch):
    first = data.load_dataset("fill50k", n=20, size=16, cache_dir=tmp_path)

    def boom(*args, **kwargs):
        raise AssertionError("regenerated instead of reading the cache")

    monkeypatch.setattr(data, "make_fill50k", boom)
    second = data.load_dataset("fill50k", n=20, size=16, cache_dir=tmp_path)
    assert second["target"][:].tobytes() == first["target"][:].tobytes()
    with pytest.raises(AssertionError, match="regenerated"):
        data.load_dataset("fill50k", n=21, size=16, cache_dir=tmp_path)  # another key


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITCONTROL_CACHE", str(tmp_path / "env"))
    assert data.default_cache_dir() == tmp_path / "env"
    data.load_dataset("faces", n=5, size=8)
    assert (tmp_path / "env" / "datasets" / f"faces-v{data.DATA_VERSION}-n5-s8-seed0").is_dir()


def test_crash_while_saving_leaves_no_cache(tmp_path, monkeypatch):
    def crash(self, path, *args, **kwargs):
        (Path(path) / "half-written").write_text("x")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        data.load_dataset("fill50k", n=10, size=8, cache_dir=tmp_path)
    assert list((tmp_path / "datasets").iterdir()) == []


def test_faces_dataset_defaults_to_all_100(tmp_path):
    ds = data.load_dataset("faces", cache_dir=tmp_path)
    assert len(ds) == 100 and ds.column_names == ["target", "condition", "prompt"]
    assert ds["condition"][:].shape == (100, 32, 32, 3)


# --- tensors ---------------------------------------------------------------


def test_to_tensors_ranges_and_exact_inverse(tmp_path):
    ds = data.load_dataset("fill50k", n=12, size=16, cache_dir=tmp_path)
    t = data.to_tensors(ds)
    assert t["target"].shape == t["condition"].shape == (12, 3, 16, 16)
    assert t["target"].dtype == t["condition"].dtype == torch.float32
    assert t["target"].min() == -1 and t["target"].max() == 1
    assert set(t["condition"].unique().tolist()) == {0.0, 1.0}
    assert t["prompt"] == list(ds["prompt"][:]) and isinstance(t["prompt"][0], str)
    back = ((t["target"] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert back.tobytes() == ds["target"][:].tobytes()
    # a plain dict of columns works the same
    same = data.to_tensors(data.make_fill50k(12, size=16))
    assert torch.equal(same["target"], t["target"])


# --- partitions ------------------------------------------------------------


def _check_disjoint_cover(parts, n):
    joined = np.concatenate(parts)
    assert all(p.dtype == np.int64 for p in parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


def test_iid_partition_disjoint_covering_balanced():
    parts = data.partition(103, 10, seed=1)
    _check_disjoint_cover(parts, 103)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert [p.tolist() for p in parts] == [p.tolist() for p in data.partition(103, 10, seed=1)]
    assert [p.tolist() for p in parts] != [p.tolist() for p in data.partition(103, 10, seed=2)]
    assert not np.array_equal(parts[0], np.arange(len(parts[0])))  # shuffled


def _label_skew(parts, labels):
    """Mean over clients of the share of the client's most common label."""
    return np.mean([np.unique(labels[p], return_counts=True)[1].max() / len(p) for p in parts])


def test_dirichlet_partition_disjoint_covering_and_skewed():
    labels = np.array(data.make_fill50k(2000, seed=0)["fg"])
    skew = {}
    for alpha in (0.1, 100.0):
        parts = data.partition(labels, 10, scheme="dirichlet", alpha=alpha, seed=0)
        _check_disjoint_cover(parts, 2000)
        assert min(len(p) for p in parts) >= 1
        skew[alpha] = _label_skew(parts, labels)
    assert skew[100.0] < 0.25  # near the IID value 1/8
    assert skew[0.1] > 0.5
    assert skew[0.1] > skew[100.0] + 0.3


def test_dirichlet_gives_every_client_a_sample():
    labels = np.repeat(np.arange(4), 10)  # 40 samples, 4 labels, 30 clients
    for seed in range(5):
        parts = data.partition(labels, 30, scheme="dirichlet", alpha=0.01, seed=seed)
        _check_disjoint_cover(parts, 40)
        assert min(len(p) for p in parts) >= 1


# --- argument errors -------------------------------------------------------


@pytest.mark.parametrize(
    "call, word",
    [
        (lambda: data.load_dataset("mnist"), "name"),
        (lambda: data.load_dataset("fill50k", n=0), "n"),
        (lambda: data.load_dataset("faces", n=101), "n"),
        (lambda: data.load_dataset("fill50k", size=4), "size"),
        (lambda: data.make_fill50k(0), "n"),
        (lambda: data.make_fill50k(3, size=7), "size"),
        (lambda: data.make_faces(n=0), "n"),
        (lambda: data.partition(10, 0), "num_clients"),
        (lambda: data.partition(10, 11), "num_clients"),
        (lambda: data.partition(["a", "b"], 3, scheme="dirichlet"), "num_clients"),
        (lambda: data.partition(10, 2, scheme="dirichlet", alpha=0), "alpha"),
        (lambda: data.partition(10, 2, scheme="dirichlet", alpha=-1.0), "alpha"),
        (lambda: data.partition(10, 2, scheme="pathological"), "scheme"),
        (lambda: data.partition(10, 2, scheme="dirichlet"), "labels_or_n"),
        (lambda: data.partition(10.0, 2), "labels_or_n"),
        (lambda: data.partition([], 1), "labels_or_n"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, word):
    with pytest.raises(ValueError, match=rf"\b{word}\b"):
        call()


def test_error_messages_list_allowed_values():
    with pytest.raises(ValueError, match="fill50k.*faces"):
        data.load_dataset("mnist")
    with pytest.raises(ValueError, match="iid.*dirichlet"):
        data.partition(10, 2, scheme="pathological")
    with pytest.raises(ValueError, match="dataset size 10"):
        data.partition(10, 11)
