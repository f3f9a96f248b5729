"""Datasets from a local folder in diffusers' layout (save_to_disk and imagefolder + metadata.jsonl),
their public splits, their errors, and the metrics for any data. Every dataset is built in tmp_path."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from sim.core import local_data
from sim.core.condition_metrics import binarize_conditions, infer_condition_kind, target_similarity
from sim.core.config import load_config
from sim.core.data import disc_masks, make_fill50k, outline_masks
from sim.core.splits import aux_set, client_partitions, eval_set, local_split

N_ROWS = 24
W, H = 40, 48  # not square: Resize + CenterCrop have work to do


def synthetic_rows(n: int = N_ROWS, seed: int = 0) -> dict:
    """``n`` rows as diffusers' train_controlnet.py reads them: image, conditioning_image (a white
    circle outline on black), text (unique per row), label (two classes, for a Dirichlet split)."""
    rng = np.random.default_rng(seed)
    images, conds, texts = [], [], []
    for k in range(n):
        r = rng.uniform(6, 12)
        cx, cy = rng.uniform(r + 2, W - r - 3), rng.uniform(r + 2, H - r - 3)
        disc = disc_masks(np.array([cx]), np.array([cy]), np.array([r]), max(W, H))[0][:H, :W]
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        images.append(Image.fromarray(np.where(disc[..., None], fg, bg).astype(np.uint8)))
        outline = outline_masks(disc[None], 1)[0]
        conds.append(Image.fromarray((np.repeat(outline[..., None], 3, -1) * 255).astype(np.uint8)))
        texts.append(f"sample {k}: a circle")
    return {"image": images, "conditioning_image": conds, "text": texts, "label": [f"c{k % 2}" for k in range(n)]}


def save_to_disk_dataset(folder: Path, n: int = N_ROWS) -> Path:
    features = datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                  "text": datasets.Value("string"), "label": datasets.Value("string")})
    datasets.Dataset.from_dict(synthetic_rows(n), features=features).save_to_disk(str(folder))
    return folder


def imagefolder_dataset(folder: Path, n: int = N_ROWS) -> Path:
    rows = synthetic_rows(n)
    (folder / "images").mkdir(parents=True)
    (folder / "conditioning").mkdir()
    lines = []
    for k in range(n):
        rows["image"][k].save(folder / "images" / f"{k}.png")
        rows["conditioning_image"][k].save(folder / "conditioning" / f"{k}.png")
        lines.append(json.dumps({"file_name": f"images/{k}.png", "conditioning_image_file_name":
                                 f"conditioning/{k}.png", "text": rows["text"][k], "label": rows["label"][k]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(params=["save_to_disk", "imagefolder"])
def local(request, tmp_path) -> Path:
    make = save_to_disk_dataset if request.param == "save_to_disk" else imagefolder_dataset
    return make(tmp_path / request.param)


def _cfg(path, *overrides):
    return load_config("smoke", [f"dataset={path}", "resolution=32", "num-samples=12", "eval-samples=4",
                                 *overrides])


# --- reading ------------------------------------------------------------------------------


def test_both_layouts_read_the_same_rows(tmp_path):
    a = save_to_disk_dataset(tmp_path / "disk")
    b = imagefolder_dataset(tmp_path / "folder")
    assert local_data.layout(a) == "save_to_disk" and local_data.layout(b) == "imagefolder"
    idx = [3, 0, 17]
    ra, rb = local_data.load_rows(a, idx, 32), local_data.load_rows(b, idx, 32)
    assert ra["target"].shape == (3, 32, 32, 3) and ra["target"].dtype == np.uint8
    assert np.array_equal(ra["target"], rb["target"]) and np.array_equal(ra["condition"], rb["condition"])
    assert ra["prompt"] == rb["prompt"] == ["sample 3: a circle", "sample 0: a circle", "sample 17: a circle"]


def test_imagefolder_reads_as_datasets_imagefolder_does(tmp_path):
    """The same columns as datasets' own ImageFolder builder (file_name -> image, x_file_name -> x)."""
    folder = imagefolder_dataset(tmp_path / "folder", n=4)
    ours = local_data.open_local(folder)
    theirs = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
    assert set(ours.column_names) == set(theirs.column_names) == {"image", "conditioning_image", "text", "label"}
    assert sorted(ours["text"]) == sorted(theirs["text"])


def test_resize_and_centre_crop_as_train_controlnet():
    """Resize(shorter side) then CenterCrop: a 32 x 40 image keeps its middle 32 rows (offset 4)."""
    arr = np.arange(40 * 32 * 3, dtype=np.uint32).reshape(40, 32, 3).astype(np.uint8)
    out = local_data.resize_center_crop(Image.fromarray(arr), 32)
    assert np.array_equal(out, arr[4:36])
    wide = np.zeros((20, 50, 3), np.uint8)
    wide[:, 25:] = 255  # left half black, right half white
    out = local_data.resize_center_crop(Image.fromarray(wide), 10)  # -> 10 x 25, then the middle 10 columns
    assert out.shape == (10, 10, 3) and out[:, 0].max() == 0 and out[:, -1].min() == 255
    grey = local_data.resize_center_crop(Image.fromarray(np.full((48, 40), 7, np.uint8)), 32)
    assert grey.shape == (32, 32, 3) and (grey == 7).all()


# --- splits --------------------------------------------------------------------------------


def test_eval_pool_and_aux_are_disjoint_and_seeded(local):
    cfg = _cfg(local)
    split = local_split(cfg)
    eval_rows, pool, aux = (set(split[k].tolist()) for k in ("eval", "pool", "aux"))
    assert len(eval_rows) == 4 and len(pool) == 12 and len(aux) == N_ROWS - 16
    assert not (eval_rows & pool) and not (eval_rows & aux) and not (pool & aux)
    clients = client_partitions(cfg, 32)
    client_prompts = {p for c in clients for p in c.prompts}
    assert len(client_prompts) == 12 and sum(len(c) for c in clients) == 12
    ev, ax = eval_set(cfg, 32), aux_set(cfg, 32)
    assert ev["target"].shape == (4, 3, 32, 32) and ev["target"].min() >= -1 and ev["target"].max() <= 1
    assert ev["condition"].min() >= 0 and ev["condition"].max() <= 1
    assert not set(ev["prompt"]) & client_prompts and not set(ax["prompt"]) & client_prompts
    assert not set(ev["prompt"]) & set(ax["prompt"]) and len(ax["prompt"]) == N_ROWS - 16
    assert ev["condition_kind"] == "canny"  # binary white-on-black outlines look like edge maps
    # the eval set does not move with num-samples; another eval-seed draws another split
    assert eval_set(_cfg(local, "num-samples=8"), 32)["prompt"] == ev["prompt"]
    assert eval_set(_cfg(local, "eval-seed=2"), 32)["prompt"] != ev["prompt"]
    # the client-side data-seed moves rows between clients, never out of the pool
    other = client_partitions(_cfg(local, "data-seed=5"), 32)
    assert {p for c in other for p in c.prompts} == client_prompts
    assert [c.prompts for c in other] != [c.prompts for c in clients]


def test_dirichlet_over_a_chosen_column(local):
    clients = client_partitions(_cfg(local, "partition=dirichlet", "partition-by=label", "dirichlet-alpha=0.1"), 32)
    assert sum(len(c) for c in clients) == 12 and all(len(c) for c in clients)
    with pytest.raises(ValueError, match=r"partition-by=COLUMN.*columns found: .*'label'"):
        _cfg(local, "partition=dirichlet")
    with pytest.raises(ValueError, match=r"no column 'colour' \(partition-by\)"):
        _cfg(local, "partition=dirichlet", "partition-by=colour")


def test_condition_kind_key(local):
    assert eval_set(_cfg(local, "condition-kind=outline"), 32)["condition_kind"] == "outline"
    with pytest.raises(ValueError, match="condition-kind='depth' is not allowed"):
        _cfg(local, "condition-kind=depth")


# --- errors ---------------------------------------------------------------------------------


def test_errors_name_the_bad_input(tmp_path):
    folder = imagefolder_dataset(tmp_path / "folder")
    with pytest.raises(ValueError, match=r"dataset='.*missing': no such folder"):
        _cfg(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a folder written by datasets' save_to_disk"):
        _cfg(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"no column 'img' \(image-column\); columns found: "
                                         r"\['conditioning_image', 'image', 'label', 'text'\]"):
        _cfg(folder, "image-column=img")
    with pytest.raises(ValueError, match=r"no column 'prompt' \(caption-column\)"):
        _cfg(folder, "caption-column=prompt")
    with pytest.raises(ValueError, match=r"has 24 rows.*num-samples=30 must be <= 24"):
        _cfg(folder, "num-samples=30")
    with pytest.raises(ValueError, match="resolution=64 is not supported by model='tiny'"):
        _cfg(folder, "resolution=64")
    other = imagefolder_dataset(tmp_path / "other")
    (other / "images" / "7.png").unlink()
    with pytest.raises(ValueError, match=r"row 7, column 'image': no image file '.*images/7.png'"):
        _cfg(other)  # a missing file is found at config time, before any work
    broken = imagefolder_dataset(tmp_path / "broken")
    first_eval = int(local_split(_cfg(folder))["eval"][0])
    (broken / "conditioning" / f"{first_eval}.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=rf"row {first_eval}, column 'conditioning_image'.*cannot read the image"):
        _cfg(broken)  # an eval row is read only after training: its images are decoded at config time
    (folder / "conditioning" / "5.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"row 5, column 'conditioning_image', file '.*conditioning/5.png': "
                                         r"cannot read the image"):
        local_data.load_rows(folder, [5], 32)
    (folder / "metadata.jsonl").write_text('{"file_name": "../x.png", "conditioning_image_file_name": "c.png", '
                                           '"text": "t"}\n')
    with pytest.raises(ValueError, match="leaves the dataset folder"):
        local_data.load_rows(folder, [0], 32)


def test_cli_refuses_a_missing_column_with_exit_2(tmp_path, capsys):
    from sim.commands.cli import main

    folder = save_to_disk_dataset(tmp_path / "disk", n=8)
    with pytest.raises(SystemExit) as e:
        main(["compare", "--preset", "smoke", "--set", f"dataset={folder}", "--set", "conditioning-image-column=hint",
              "--set", "num-samples=4", "--set", "eval-samples=2", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "no column 'hint' (conditioning-image-column); columns found:" in err
    assert not (tmp_path / "run" / "summary.json").exists()


# --- metrics for any data -------------------------------------------------------------------


def test_score_by_kind_and_circle_metrics_only_on_circles():
    from sim.engine.evaluate import score

    fill = make_fill50k(8, seed=3, max_radius=0.25)
    t, c = fill["target"], fill["condition"]
    circles = score(t, c, fill["fg"], fill["bg"], targets_uint8=t)
    assert {"outline_iou", "colour_acc", "edge_ssim", "edge_f1", "psnr", "ssim", "fid_project"} <= set(circles)
    assert circles["edge_f1"] > 0.9 and circles["ssim"] == pytest.approx(1.0) and circles["psnr"] == 100.0
    other = score(t, c, targets_uint8=t[::-1])  # no prompt colours: not circle data
    assert "outline_iou" not in other and "colour_acc" not in other
    assert {"edge_ssim", "edge_f1", "psnr", "ssim", "fid_project"} <= set(other) and other["psnr"] < 100
    assert score(t, c, targets_uint8=t, condition_kind="outline")["edge_f1"] > \
        score(t, c, targets_uint8=t, condition_kind="canny")["edge_f1"]  # the 1 px tolerance of outlines
    plain = score(t, c, targets_uint8=t, condition_kind="none")
    assert "edge_ssim" not in plain and "edge_f1" not in plain and "psnr" in plain


def test_condition_kind_inference_and_binarisation():
    fill = make_fill50k(4, seed=1)
    assert infer_condition_kind(fill["condition"]) == "canny"
    assert infer_condition_kind(fill["target"]) == "none"  # colour images are no edge maps
    grey = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
    assert infer_condition_kind(np.repeat(grey[..., :1], 3, -1)) == "none"  # a grey depth-like map
    faint = (fill["condition"] // 4)  # an outline resizing made grey still counts
    assert np.array_equal(binarize_conditions(faint), fill["condition"])
    sim = target_similarity(fill["target"], fill["target"][::-1])
    assert 0 < sim["psnr"] < 100 and sim["ssim"] < 1


# --- end to end -----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [pytest.param(save_to_disk_dataset, marks=pytest.mark.slow), imagefolder_dataset],
                         ids=["save_to_disk", "imagefolder"])  # both layouts read the same rows (test above)
def test_compare_trains_every_scheme_on_a_local_dataset(make, tmp_path, monkeypatch):
    """`compare --set dataset=PATH --set resolution=32`: all four schemes train on the folder's rows and are
    scored with the metrics for any data (no circle metrics: the prompts name no palette colours)."""
    from sim.commands.cli import main

    monkeypatch.setenv("SPLITCONTROL_CACHE", str(tmp_path / "cache"))
    folder = make(tmp_path / "data", n=12)
    out = tmp_path / "run"
    assert main(["compare", "--preset", "smoke", "--set", f"dataset={folder}", "--set", "resolution=32",
                 "--set", "steps=2", "--set", "local-steps=1", "--set", "batch-size=2", "--set", "num-samples=8",
                 "--set", "eval-samples=2", "--set", "ddim-steps=1", "--set", "baseline=false",
                 "--set", 'schemes=["fedavg", "vanilla", "nograd", "splitfed"]', "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["scheme"]: r for r in summary["rows"]}
    assert set(rows) == {"fedavg", "vanilla", "nograd", "splitfed"}
    for r in rows.values():
        assert r["steps"] == 2 and np.isfinite(r["final_loss"])
        assert {"edge_ssim", "edge_f1", "psnr", "ssim", "fid_project"} <= set(r)
        assert "outline_iou" not in r and "colour_acc" not in r
    assert f'dataset = "{folder.resolve()}"' in (out / "config.toml").read_text()
    assert "edge_f1" in (out / "summary.md").read_text().splitlines()[0]  # the table shows the any-data metrics


def test_original_fill50k_index_via_column_keys(tmp_path):
    """ControlNet's original Fill50K index (source = outline, target = image, prompt) as metadata.jsonl:
    string columns named as image columns are paths; the three column keys select them."""
    folder = imagefolder_dataset(tmp_path / "folder", n=6)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"source": r["conditioning_image_file_name"],
                                                               "target": r["file_name"], "prompt": r["text"]}) + "\n"
                                                   for r in rows))
    cfg = load_config("smoke", [f"dataset={folder}", "image-column=target", "conditioning-image-column=source",
                                "caption-column=prompt", "num-samples=2", "eval-samples=2"])
    got = local_data.load_rows(folder, [1, 4], 32, cfg.image_column, cfg.conditioning_image_column,
                               cfg.caption_column)
    want = local_data.load_rows(imagefolder_dataset(tmp_path / "again", n=6), [1, 4], 32)
    assert np.array_equal(got["target"], want["target"]) and np.array_equal(got["condition"], want["condition"])
    assert got["prompt"] == want["prompt"]


def test_target_similarity_per_image_means_to_the_summary():
    from sim.core.condition_metrics import target_similarity_per_image

    fill = make_fill50k(5, seed=2)
    per = target_similarity_per_image(fill["target"], fill["target"][::-1])
    assert per["psnr"].shape == (5,) and per["psnr"][2] == 100.0  # the middle image is its own target
    assert target_similarity(fill["target"], fill["target"][::-1]) == {k: float(v.mean()) for k, v in per.items()}
