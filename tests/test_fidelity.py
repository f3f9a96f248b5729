"""Offline fidelity metrics (sim.core.fidelity) and the committed project feature network (sim.core.feature_net)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from sim.core import fidelity
from sim.core.data import make_faces, make_fill50k
from sim.core.feature_net import (DEFAULT_DIR, FEATURE_DIM, WEIGHTS_FILE, FeatureNet, heldout_accuracy,
                             load_feature_net)

N = 64
# The committed net's held-out accuracies are in sim/assets/feature-net/MODEL_CARD.md (2,000
# circles); the thresholds leave room for the sampling noise of 300 fresh ones.
MIN_ACC = {"fg_acc": 0.98, "bg_acc": 0.98, "cx_acc": 0.93, "cy_acc": 0.93, "r_acc": 0.9, "deg_acc": 0.95,
           "deg_acc_clean": 0.95, "fg_acc_degraded": 0.95, "bg_acc_degraded": 0.95}


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack([ndimage.gaussian_filter(x.astype(np.float64), (sigma, sigma, 0)) for x in images]
                    ).round().astype(np.uint8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these small forwards run slower on two busy cores than on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def circles():
    """Two disjoint real sets of N circles (seeds no experiment uses) and their conditions."""
    a = make_fill50k(N, seed=6000, max_radius=0.25)
    b = make_fill50k(N, seed=6001, max_radius=0.25)
    return a, b


@pytest.fixture(scope="module")
def net():
    return load_feature_net()


# --- feature network ---------------------------------------------------------


def test_committed_weights_load_with_declared_dim(net):
    path = DEFAULT_DIR / WEIGHTS_FILE
    assert path.stat().st_size < 2 * 1024 * 1024
    assert (DEFAULT_DIR / "MODEL_CARD.md").is_file()
    assert isinstance(net, FeatureNet) and not net.training
    images = make_fill50k(5, seed=6002)["target"]
    feats = fidelity.project_features(images, net)
    assert feats.shape == (5, FEATURE_DIM) and np.isfinite(feats).all()
    # features of a sample do not depend on its batch
    np.testing.assert_allclose(fidelity.project_features(images[:1], net), feats[:1], rtol=1e-4, atol=1e-4)
    # the float input convention gives the same features as uint8
    as_float = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    np.testing.assert_allclose(fidelity.project_features(as_float, net), feats, rtol=1e-4, atol=1e-4)


def test_committed_net_heldout_accuracy(net):
    acc = heldout_accuracy(net, seed=6100, n=300)
    low = {k: (acc[k], v) for k, v in MIN_ACC.items() if acc[k] < v}
    assert not low, f"held-out accuracy below threshold (got, min): {low}"


# --- Frechet distance ------------------------------------------------------------


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert fidelity.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    # commuting (diagonal) covariances: |mu diff|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    want = 3.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = fidelity.frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b))
    assert got == pytest.approx(want)


def test_frechet_eigh_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, 8)), rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 0.5
    assert fidelity.fid_from_features(x, y, "eigh") == pytest.approx(fidelity.fid_from_features(x, y, "sqrtm"),
                                                                   rel=1e-6)


def test_frechet_handles_fewer_samples_than_dims():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(10, 128)), rng.normal(size=(12, 128))
    d = fidelity.fid_from_features(x, y)
    assert np.isfinite(d) and d > 0
    assert fidelity.fid_from_features(x, x) == pytest.approx(0, abs=1e-8)


def test_fid_project_of_a_set_with_itself_is_zero(circles, net):
    x = circles[0]["target"]
    assert fidelity.fid_project(x, x, net) == pytest.approx(0.0, abs=1e-6)


def test_fid_project_separates_degraded_from_real(circles, net):
    a, b = circles[0]["target"], circles[1]["target"]
    real = fidelity.fid_project(a, b, net)
    assert real > 0
    blurred = fidelity.fid_project(a, blur(b, 1.0), net)
    off_palette = fidelity.fid_project(a, (0.5 * b.astype(np.float64) + 64).round().astype(np.uint8), net)
    noise = fidelity.fid_project(a, np.random.default_rng(0).integers(0, 256, b.shape, dtype=np.uint8), net)
    faces = fidelity.fid_project(a, make_faces()["target"][:N], net)
    assert blurred > 2 * real, (real, blurred)
    assert off_palette > 2 * real, (real, off_palette)
    assert noise > 10 * real and faces > 10 * real, (real, noise, faces)


def test_fid_project_small_n_works_and_is_inflated(circles, net):
    a, b = circles[0]["target"], circles[1]["target"]
    small = fidelity.fid_project(a[:16], b[:16], net)
    assert np.isfinite(small) and small > fidelity.fid_project(a, b, net)
    with pytest.raises(ValueError, match="at least 2"):
        fidelity.fid_project(a[:1], b, net)


# --- KID ---------------------------------------------------------------------------


def test_kid_project_near_zero_for_same_distribution(circles, net):
    a, b = circles[0]["target"], circles[1]["target"]
    same_mean, same_std = fidelity.kid_project(a, b, net)
    blur_mean, _ = fidelity.kid_project(a, blur(b, 1.0), net)
    assert same_std >= 0
    assert abs(same_mean) < 0.5 and blur_mean > 1.0, (same_mean, blur_mean)


def test_kid_unbiased_estimator_centres_on_zero():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    mean, std = fidelity.kid_from_features(x, y, subsets=50, subset_size=100)
    assert abs(mean) < 3 * std + 1e-3
    shifted, _ = fidelity.kid_from_features(x, y + 1.0, subsets=50, subset_size=100)
    assert shifted > 10 * max(abs(mean), std)


# --- edge SSIM -----------------------------------------------------------------


def test_edge_ssim_real_targets_beat_noise_and_wrong_conditions(circles):
    a = circles[0]
    target, cond = a["target"], a["condition"]
    real = fidelity.edge_ssim(target, cond)
    noise = fidelity.edge_ssim(np.random.default_rng(0).integers(0, 256, target.shape, dtype=np.uint8), cond)
    wrong = fidelity.edge_ssim(circles[1]["target"], cond)
    assert real > 0.75 and noise < 0.1 and wrong < real - 0.25, (real, noise, wrong)
    per_image = fidelity.edge_ssim_per_image(target, cond)
    assert per_image.shape == (N,) and per_image.mean() == pytest.approx(real)


def test_edge_ssim_finds_edges_of_every_colour_pair(circles):
    # the default thresholds give edges even where circle and background grey levels differ by 0.07
    edges = fidelity.canny_edges(circles[0]["target"])
    assert edges.reshape(N, -1).any(axis=1).all()


def test_edge_ssim_faces_and_float_inputs():
    faces = make_faces(n=20, seed=3)
    real = fidelity.edge_ssim(faces["target"], faces["condition"], low_threshold=None, high_threshold=None)
    assert real > 0.95  # skimage's default thresholds are the condition extractor itself
    assert fidelity.edge_ssim(faces["target"], faces["condition"]) > 0.85
    as_float = torch.from_numpy(faces["target"].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    cond_float = torch.from_numpy(faces["condition"].transpose(0, 3, 1, 2).astype(np.float32) / 255)
    assert fidelity.edge_ssim(as_float, cond_float) == pytest.approx(fidelity.edge_ssim(faces["target"],
                                                                                         faces["condition"]))
    with pytest.raises(ValueError, match="one per image"):
        fidelity.edge_ssim(faces["target"], faces["condition"][:5])


def test_edge_f1_scores_empty_images_zero(circles):
    a = circles[0]
    flat = np.broadcast_to(a["target"][:, :1, :1], a["target"].shape).copy()  # background colour only
    assert fidelity.edge_f1(a["target"], a["condition"]) > 0.8
    assert fidelity.edge_f1(flat, a["condition"]) == 0.0
    assert fidelity.edge_ssim(flat, a["condition"]) > 0.4  # the SSIM caveat of the docstring


# --- Inception FID only with local weights ---------------------------------------


def test_standard_fid_refuses_without_local_weights(tmp_path):
    x = make_fill50k(4, seed=6003)["target"]
    with pytest.raises(FileNotFoundError, match="no inception_path"):
        fidelity.standard_fid(x, x)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fidelity.standard_fid(x, x, inception_path=tmp_path / "inception.pt")


class _FakeDetector(torch.nn.Module):
    """A stand-in with the TorchScript Inception detector's call signature."""

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return x.float().mean(dim=(2, 3))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch 2.13 deprecates TorchScript
def test_standard_fid_with_a_local_torchscript_file(tmp_path):
    path = tmp_path / "detector.pt"
    torch.jit.script(_FakeDetector()).save(str(path))
    x = make_fill50k(16, seed=6004)["target"]
    assert fidelity.standard_fid(x, x, inception_path=path) == pytest.approx(0.0, abs=1e-6)
    assert fidelity.standard_fid(x, blur(x, 2.0) // 2, inception_path=path) > 1.0
