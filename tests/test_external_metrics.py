"""FID (Inception) and CLIP score from local weights only: stand-in weights built here, nothing downloaded."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sim.core import fidelity
from sim.core.data import make_fill50k

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch 2.13 deprecates TorchScript


# --- stand-in weights ------------------------------------------------------------


class _FakeInception(torch.nn.Module):
    """The TorchScript Inception detector's call signature: uint8 (N, 3, H, W) -> (N, 2048) features
    (a fixed random projection of 4x4 average-pooled pixels)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("proj", torch.randn(48, 2048, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)
        return pooled @ self.proj


@pytest.fixture(scope="module")
def inception_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception.pt"
    torch.jit.script(_FakeInception()).save(str(path))
    return path


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    """A tiny random CLIPModel and a byte-level CLIP BPE tokenizer (no merges) saved in one folder."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    tok.save_pretrained(folder)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, **ids),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg)
    with torch.no_grad():  # at this seed most image-prompt cosines are negative: flip them, so most score > 0
        model.text_projection.weight.neg_()
    model.save_pretrained(folder)
    return folder


def _eval_data(n=6, seed=6100):
    d = make_fill50k(n, seed=seed, max_radius=0.25)
    return d["target"], d["condition"], list(d["prompt"])


# --- FID (Inception) ----------------------------------------------------------------


def test_standard_fid_is_zero_for_identical_sets_and_grows_with_the_difference(inception_path):
    x = make_fill50k(16, seed=6101)["target"]
    other = make_fill50k(16, seed=6102)["target"]
    noise = np.random.default_rng(0).integers(0, 256, x.shape, dtype=np.uint8)
    assert fidelity.standard_fid(x, x, inception_path) == pytest.approx(0.0, abs=1e-6)
    real_vs_real = fidelity.standard_fid(x, other, inception_path)
    assert 0 < real_vs_real < fidelity.standard_fid(x, noise, inception_path)


def test_score_adds_fid_inception_only_with_weights(inception_path):
    from sim.engine.evaluate import score

    targets, conds, _ = _eval_data()
    assert "fid_inception" not in score(targets, conds, targets_uint8=targets)
    out = score(targets[::-1], conds, targets_uint8=targets, inception_weights=str(inception_path))
    assert out["fid_inception"] == pytest.approx(0.0, abs=1e-6)  # the same set, reordered
    assert {"fid_project", "edge_ssim", "psnr"} <= set(out) and "clip_score" not in out  # no fgs: no circle metrics


# --- CLIP score -------------------------------------------------------------------


def test_clip_score_is_a_deterministic_float_in_0_100(clip_path):
    targets, _, prompts = _eval_data()
    s = fidelity.clip_score(targets, prompts, clip_path)
    assert isinstance(s, float) and 0.0 <= s <= 100.0
    assert fidelity.clip_score(targets, prompts, str(clip_path)) == s
    assert fidelity.clip_score(targets, prompts, clip_path, batch_size=4) == pytest.approx(s, abs=1e-4)  # float32
    # float images in [-1, 1] are the same images
    as_float = torch.from_numpy(targets).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert fidelity.clip_score(as_float, prompts, clip_path) == pytest.approx(s, abs=1e-4)
    long = fidelity.clip_score(targets[:2], ["a red circle " * 20] * 2, clip_path)  # truncated to 77 tokens
    assert 0.0 <= long <= 100.0


def test_clip_score_matches_the_models_own_image_text_logits(clip_path):
    """100 * max(cos, 0) per image, from CLIPModel.forward's logits (which scale cos by exp(logit_scale))."""
    from transformers import AutoTokenizer, CLIPModel

    targets, _, prompts = _eval_data(32, seed=1)
    model = CLIPModel.from_pretrained(str(clip_path), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(clip_path), local_files_only=True)
    enc = tok(prompts, padding=True, return_tensors="pt")
    assert (enc["input_ids"][:, 0] == tok.bos_token_id).all()
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    pixel_values=fidelity._clip_pixels(targets, 32))
        cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    assert (cos > 0).any()  # (and at these seeds one pair is < 0: the per-image clamp is exercised)
    expected = float((100 * cos.clamp(min=0)).mean())
    assert fidelity.clip_score(targets, prompts, clip_path) == pytest.approx(expected, abs=1e-4)


def test_clip_pixels_resize_and_normalise_like_clip():
    flat = np.full((2, 8, 8, 3), (255, 0, 128), dtype=np.uint8)
    x = fidelity._clip_pixels(flat, 32)
    assert x.shape == (2, 3, 32, 32)
    rgb = torch.tensor([1.0, 0.0, 128 / 255])
    expected = (rgb - torch.tensor(fidelity.CLIP_MEAN)) / torch.tensor(fidelity.CLIP_STD)
    assert torch.allclose(x, expected.view(1, 3, 1, 1).expand_as(x), atol=1e-5)
    assert fidelity._clip_pixels(np.zeros((1, 16, 24, 3), np.uint8), 32).shape == (1, 3, 32, 32)  # centre crop


def test_clip_score_refuses_without_local_weights(tmp_path, clip_path):
    targets, _, prompts = _eval_data(2)
    with pytest.raises(FileNotFoundError, match="no clip_path"):
        fidelity.clip_score(targets, prompts)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        fidelity.clip_score(targets, prompts, tmp_path / "clip-vit-base-patch16")
    with pytest.raises(ValueError, match="one prompt per image"):
        fidelity.clip_score(targets, prompts[:1], clip_path)


def test_score_adds_clip_score_only_with_weights(clip_path):
    from sim.engine.evaluate import score

    targets, conds, prompts = _eval_data()
    assert "clip_score" not in score(targets, conds, targets_uint8=targets, prompts=prompts)
    out = score(targets, conds, targets_uint8=targets, prompts=prompts, clip_weights=str(clip_path))
    assert out["clip_score"] == pytest.approx(fidelity.clip_score(targets, prompts, clip_path))
    assert "fid_inception" not in out


# --- wiring: evaluate(), config, `splitcontrol evaluate --set` -------------------------


def test_evaluate_threads_both_weights(tiny_base, inception_path, clip_path):
    from sim.core.data import to_tensors
    from sim.engine.evaluate import evaluate

    eval_set = to_tensors(make_fill50k(4, seed=6103, max_radius=0.25))
    plain, imgs = evaluate(tiny_base, eval_set, None, None, steps=1, guidance=1.0, seed=0, desc="test")
    assert "fid_inception" not in plain and "clip_score" not in plain
    both, imgs2 = evaluate(tiny_base, eval_set, None, None, steps=1, guidance=1.0, seed=0, desc="test",
                           inception_weights=str(inception_path), clip_weights=str(clip_path))
    assert np.array_equal(imgs, imgs2)
    assert {k: both[k] for k in plain} == plain
    assert both["fid_inception"] > 0 and 0 <= both["clip_score"] <= 100
    assert both["clip_score"] == pytest.approx(fidelity.clip_score(imgs, eval_set["prompt"], clip_path))


def test_config_keys_for_local_weights(tmp_path, inception_path, clip_path):
    from sim.core.config import load_config, to_run_config

    cfg = load_config("smoke", [f"inception-weights={inception_path}", f"clip-weights={clip_path}"])
    assert cfg.inception_weights == str(inception_path) and cfg.clip_weights == str(clip_path)
    assert load_config("default").inception_weights == "" and load_config("default").clip_weights == ""
    assert to_run_config(cfg)["clip-weights"] == str(clip_path)
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(str(path)) == cfg
    for key in ("inception-weights", "clip-weights"):
        missing = tmp_path / f"no-{key}"
        with pytest.raises(ValueError, match=f"{key}=.*no-{key}"):
            load_config("smoke", [f"{key}={missing}"])
    with pytest.raises(ValueError, match="inception-weights=.*is not a TorchScript file"):
        load_config("smoke", [f"inception-weights={clip_path}"])
    with pytest.raises(ValueError, match="clip-weights=.*is not a Hugging Face CLIP folder"):
        load_config("smoke", [f"clip-weights={inception_path}"])


def test_reevaluate_accepts_the_weights_and_passes_them_on(tmp_path, monkeypatch, clip_path, inception_path):
    """`splitcontrol evaluate RUN --set clip-weights=PATH`: reevaluate may override both keys and gives them
    to every evaluate() call (sampling itself is stubbed out here)."""
    from diffusers import ControlNetModel

    import types

    from sim.core.config import load_config
    from sim.engine import runner
    from sim.engine.clientside import write_run_config

    run = tmp_path / "run"
    run.mkdir()
    write_run_config(run, load_config("smoke", ["schemes=nograd", "baseline=true", "client-seed=5"]))
    (run / "controlnet_nograd").mkdir()
    (run / "complete.json").write_text("{}")  # a finished run (evaluate refuses unfinished ones)
    calls = []
    monkeypatch.setattr(runner, "context_for", lambda cfg: types.SimpleNamespace(base=None, eval_set=None))
    monkeypatch.setattr(ControlNetModel, "from_pretrained", staticmethod(lambda path: torch.nn.Identity()))
    monkeypatch.setattr(runner, "evaluate", lambda *a, **kw: (calls.append(kw) or {"x": 1.0}, None))
    rows = runner.reevaluate(run, [f"clip-weights={clip_path}", f"inception_weights={inception_path}"])
    assert [r["scheme"] for r in rows] == ["base (no control)", "nograd"]
    assert len(calls) == 2
    assert all(kw["clip_weights"] == str(clip_path) and kw["inception_weights"] == str(inception_path)
               for kw in calls)
    calls.clear()
    runner.reevaluate(run)
    assert len(calls) == 2
    assert all(kw["clip_weights"] is None and kw["inception_weights"] is None for kw in calls)
    with pytest.raises(ValueError, match="evaluation keys"):
        runner.reevaluate(run, ["steps=3"])
