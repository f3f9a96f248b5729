"""Figures a paper could print: every variant drawn, one blind line per quantity, error bars where
the sweep has standard errors, numbered labels inside the canvas and apart, and the client-cost panel
that keeps small non-zero counts visible. Small synthetic sweep rows; nothing is trained."""
import json

import numpy as np
import pytest
from matplotlib.text import Text

from sim.core import plots


def _rows(n_cluster: int = 12) -> list[dict]:
    """A defense sweep in miniature: a dozen split rows at (almost) the same leakage, a few private
    ones, vanilla rows without a hint score, FedAvg rows whose attacks were N/A, and colour ties."""
    rows = []
    for i in range(n_cluster):  # the cluster at SSIM ~1 that used to pile up labels
        rows.append({"variant": f"nograd-v{i}", "scheme": "nograd", "outline_iou": 0.6 + 0.004 * i,
                     "outline_iou_se": 0.03, "colour_acc": 0.75 if i % 2 else 0.6875,
                     "image:noise-target": 1.0, "hint:noise-target": 1.0 - 0.001 * i,
                     "attack:noise-target": 1.0, "blind_image": 0.31, "blind_hint": 0.57})
    rows += [{"variant": "pp-protected", "scheme": "nograd", "outline_iou": 0.27, "colour_acc": 0.8125,
              "image:noise-target": 0.002, "hint:noise-target": 0.32, "attack:noise-target": 0.32,
              "best_image": 0.002, "best_image_se": 0.01, "best_hint": 0.32, "best_hint_se": 0.02},
             {"variant": "vanilla-none", "scheme": "vanilla", "outline_iou": 0.61, "colour_acc": 0.75,
              "image:noise-target": 1.0, "attack:noise-target": 1.0, "paired": {"vs": "none"}},
             {"variant": "fedavg-none", "scheme": "fedavg", "outline_iou": 0.58, "colour_acc": 0.8125,
              "colour_acc_se": 0.05, "attack:noise-target": "N/A"},
             {"variant": "fedavg-dp-sgd", "scheme": "fedavg", "outline_iou": 0.26, "colour_acc": 0.8125,
              "attack:noise-target": "N/A"}]
    return rows


def _labels(fig):
    return [t for ax in fig.axes for t in ax.texts if t.get_gid() == plots.LABEL_GID]


def _scatter_points(ax) -> int:
    return sum(len(c.get_offsets()) for c in ax.collections if c.__class__.__name__ == "PathCollection")


@pytest.mark.parametrize("utility", ["outline_iou", "colour_acc"])
def test_every_row_gets_a_numbered_marker_and_a_key_entry(utility):
    rows = _rows()
    fig = plots.privacy_figure(rows, utility)
    try:
        # two targets; each: its scored rows in the panel, the rest (vanilla's hint, FedAvg's N/A) in a strip
        panels = [ax for ax in fig.axes if ax.get_title() in ("images", "hints")]
        strips = [ax for ax in fig.axes if ax.get_title().startswith("no ")]
        assert [ax.get_title() for ax in panels] == ["images", "hints"]
        for panel, strip in zip(panels, strips):
            assert _scatter_points(panel) + _scatter_points(strip) == len(rows)
        assert {ax.get_title() for ax in strips} == {"no image score", "no hint score"}
        numbers = [t.get_text() for t in _labels(fig)]
        assert sorted(numbers, key=int) == sorted([str(i + 1) for i in range(len(rows))] * 2, key=int)
        key = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        for i, r in enumerate(rows):
            assert any(k.startswith(f"{i + 1}  {r['variant']}") for k in key), r["variant"]
    finally:
        plots._plt().close(fig)


def test_one_blind_line_per_target_and_error_bars_from_se_keys():
    fig = plots.privacy_figure(_rows(), "outline_iou")
    try:
        panels = {ax.get_title(): ax for ax in fig.axes}
        for title, blind in (("images", 0.31), ("hints", 0.57)):
            ax = panels[title]
            vlines = [ln for ln in ax.get_lines() if len(set(np.asarray(ln.get_xdata(), float))) == 1
                      and ln.get_linestyle() == ":"]
            assert [float(ln.get_xdata()[0]) for ln in vlines] == [pytest.approx(blind)]  # its own, only
            # error bars: outline_iou_se on the cluster, best_<target>_se on pp-protected
            assert any(c.__class__.__name__ == "LineCollection" for c in ax.collections)
        key = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        assert any("blind guess of the images" in k and "0.31" in k for k in key)
        assert any("blind guess of the hints" in k and "0.57" in k for k in key)
    finally:
        plots._plt().close(fig)
    # colour_acc_se (one FedAvg row) gives that strip its error bar; no SE anywhere: no bars
    fig = plots.privacy_figure(_rows(), "colour_acc")
    try:
        strip = next(ax for ax in fig.axes if ax.get_title() == "no image score")
        assert any(c.__class__.__name__ == "LineCollection" for c in strip.collections)
    finally:
        plots._plt().close(fig)
    bare = [{k: v for k, v in r.items() if not k.endswith("_se")} for r in _rows()]
    fig = plots.privacy_figure(bare, "outline_iou")
    try:
        assert not any(c.__class__.__name__ == "LineCollection" for ax in fig.axes for c in ax.collections)
    finally:
        plots._plt().close(fig)


@pytest.mark.parametrize("utility", ["outline_iou", "colour_acc"])
def test_labels_inside_the_canvas_and_apart(utility):
    fig = plots.privacy_figure(_rows(), utility)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        canvas = fig.bbox
        # the text's own box (an Annotation's extent also spans its leader line)
        boxes = [Text.get_window_extent(t, renderer) for t in _labels(fig)]
        assert len(boxes) == 2 * len(_rows())
        for b in boxes:
            assert canvas.x0 <= b.x0 and b.x1 <= canvas.x1 and canvas.y0 <= b.y0 and b.y1 <= canvas.y1
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert not a.overlaps(b), (a, b)
        # the Pareto front is drawn even when colour ties leave it a single point
        assert all(any(ln.get_linestyle() == "--" for ln in ax.get_lines())
                   for ax in fig.axes if ax.get_title() in ("images", "hints"))
    finally:
        plots._plt().close(fig)


def test_plot_files_from_sweep_json(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps(_rows(4)))
    for out in (plots.plot_privacy_utility(tmp_path / "sweep.json", utility="colour_acc"),
                plots.plot_frontier(tmp_path / "sweep.json", "hint")):
        assert out.parent == tmp_path and out.stat().st_size > 10_000
    with pytest.raises(TypeError, match="blind must map"):
        plots.plot_privacy_utility(tmp_path / "sweep.json", blind=0.5)


def test_rows_with_only_a_best_score_per_attack_still_plot():
    """Older sweeps recorded one score per attack (image or hint): one panel, no blind line mixed in."""
    rows = [{"variant": f"v{i}", "scheme": "nograd", "outline_iou": 0.1 * i, "attack:noise-target": 0.2 * i}
            for i in range(1, 5)]
    fig = plots.privacy_figure(rows, "outline_iou")
    try:
        panels = [ax for ax in fig.axes if ax.get_xlabel().startswith("leakage")]
        assert len(panels) == 1 and _scatter_points(panels[0]) == 4
        assert not [ln for ln in panels[0].get_lines() if ln.get_linestyle() == ":"]
    finally:
        plots._plt().close(fig)


def test_client_cost_keeps_a_small_parameter_count_visible(tmp_path):
    rows = [{"scheme": s, "bytes_up_per_step": 1e6, "bytes_down_per_step": d, "client_s_per_step": c,
             "client_model_mb": m, "client_trainable_params": p}
            for s, d, c, m, p in (("fedavg", 1e6, 0.6, 120.0, 1_447_616), ("vanilla", 1e6, 0.05, 86.8, 5984),
                                  ("nograd", 0.8, 0.007, 86.7, 0))]
    (tmp_path / "summary.json").write_text(json.dumps({"rows": rows}))
    plt = plots._plt()
    shown = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, path, *a, **kw):  # read the panels before the figure is closed
        shown[str(path).rsplit("/", 1)[-1]] = [(ax.get_yscale(), [t.get_text() for t in ax.texts]) for ax in fig.axes]
        return real_savefig(fig, path, *a, **kw)

    plt.Figure.savefig = spy
    try:
        plots.plot_run(tmp_path)
    finally:
        plt.Figure.savefig = real_savefig
    scale, texts = shown["client_cost.png"][2]
    assert scale == "log" and "5,984" in texts and "1,447,616" in texts and "0 (none)" in texts


def test_rows_grid_is_wide_enough_for_its_title(tmp_path):
    from PIL import Image

    img = np.zeros((1, 8, 8, 3), np.uint8)
    title = "grad-inversion on fedavg: private | reconstructed"
    path = plots.save_rows_grid({"private": img, "reconstructed hint": img}, tmp_path / "g.png", title=title)
    width_in = Image.open(path).size[0] / 120
    assert width_in >= 4.0  # one image per row: the title and the row labels still fit
