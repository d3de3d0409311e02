"""The log-depth scaling fit recovers known α, β; families; a two-depth fit has no R²; the figure draws
only the groups with data; the PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from loopreg.evals import DepthPoint, alpha_ratios, families, fit_log_depth, fit_scaling, plot_scaling
from loopreg.evals.scaling import NON_LOOPED, plotted_groups, scaling_figure

DEPTHS = (4, 8, 12, 24, 36, 48)
ALPHA_LOOP, ALPHA_BASE, BETA_LOOP = 0.06, 0.05, 0.02
# both lines pass through the shared (4⊗1) point, which belongs to both families
BETA_BASE = BETA_LOOP + (ALPHA_LOOP - ALPHA_BASE) * math.log(4)


def synthetic_points() -> list[DepthPoint]:
    looped = [DepthPoint(f"loop-4x{d // 4}", 4, d, {"g": ALPHA_LOOP * math.log(d) + BETA_LOOP}) for d in DEPTHS[1:]]
    plain = [DepthPoint(f"base-{d}x1", d, d, {"g": ALPHA_BASE * math.log(d) + BETA_BASE}) for d in DEPTHS]
    return plain + looped


def test_fit_recovers_alpha_and_beta_with_natural_log() -> None:
    fit = fit_log_depth(DEPTHS, [0.07 * math.log(d) - 0.01 for d in DEPTHS])
    assert (fit.alpha, fit.beta, fit.r2, fit.n) == (pytest.approx(0.07), pytest.approx(-0.01), pytest.approx(1.0), 6)
    assert fit.predict(math.e ** 2) == pytest.approx(0.13)


def test_fit_with_noise_has_r2_below_one() -> None:
    rng = np.random.default_rng(0)
    scores = [0.05 * math.log(d) + 0.1 + rng.normal(0, 0.005) for d in DEPTHS]
    fit = fit_log_depth(DEPTHS, scores)
    assert fit.alpha == pytest.approx(0.05, abs=0.01) and 0.8 < fit.r2 < 1.0


def test_fit_from_two_depths_is_exact_and_has_no_r2() -> None:
    fit = fit_log_depth([8, 16, 16], [0.1, 0.2, 0.3])  # three points, two depths
    assert (fit.alpha, fit.beta) == (pytest.approx(0.15 / math.log(2)), pytest.approx(0.1 - 0.45))
    assert (fit.r2, fit.n, fit.depths, fit.exact) == (None, 3, 2, True)
    assert fit.r2_label == "n=2 depths: exact fit, R² not meaningful"
    three = fit_log_depth([4, 8, 16], [0.1, 0.3, 0.2])
    assert not three.exact and three.r2 == pytest.approx(0.25) and three.r2_label == "R²=0.25"


def test_fit_needs_two_depths() -> None:
    with pytest.raises(ValueError, match="two distinct depths"):
        fit_log_depth([8, 8], [0.1, 0.2])


def test_families_put_the_k_layer_model_in_both() -> None:
    grouped = families(synthetic_points())
    assert list(grouped) == [NON_LOOPED, "looped (4⊗L)"]
    assert [p.depth for p in grouped["looped (4⊗L)"]] == list(DEPTHS)
    assert [p.depth for p in grouped[NON_LOOPED]] == list(DEPTHS)


def test_fit_scaling_recovers_both_families_and_their_alpha_ratio() -> None:
    fits = fit_scaling(synthetic_points(), ["g", "absent_group"])
    looped, base = fits["g"]["looped (4⊗L)"], fits["g"][NON_LOOPED]
    assert (looped.alpha, looped.beta) == (pytest.approx(ALPHA_LOOP), pytest.approx(BETA_LOOP))
    assert (base.alpha, base.beta) == (pytest.approx(ALPHA_BASE), pytest.approx(BETA_BASE))
    assert alpha_ratios(fits["g"]) == {"looped (4⊗L)": pytest.approx(1.2)}
    assert fits["absent_group"] == {}


def test_plot_writes_a_png(tmp_path: Path) -> None:
    points = synthetic_points()
    path = plot_scaling(points, fit_scaling(points, ["g"]), tmp_path / "scaling.png", {"g": "Some group"})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def sparse_points() -> list[DepthPoint]:
    """Scores in "g" (three base depths, two looped) and "h" (two base depths) only."""
    return [DepthPoint("base-4x1", 4, 4, {"g": 0.10, "h": 0.3}), DepthPoint("base-8x1", 8, 8, {"g": 0.15, "h": 0.4}),
            DepthPoint("base-16x1", 16, 16, {"g": 0.22}), DepthPoint("loop-4x2", 4, 8, {"g": 0.20})]


def panel_legends(figure) -> dict[str, list[str]]:
    return {axis.get_title(): [text.get_text() for text in axis.get_legend().get_texts()] for axis in figure.axes}


def test_figure_draws_only_the_groups_with_data() -> None:
    points = sparse_points()
    groups = ["empty_a", "g", "empty_b", "h", "empty_c"]
    assert plotted_groups(points, groups) == ["g", "h"]
    figure = scaling_figure(points, fit_scaling(points, groups), {"g": "Group G"})
    legends = panel_legends(figure)
    assert list(legends) == ["Group G", "h"] and len(figure.axes) == 2
    assert tuple(figure.get_size_inches()) == pytest.approx((9.0, 3.6))  # one row of two panels
    base_g, loop_g = legends["Group G"]
    assert base_g.startswith(NON_LOOPED) and "R²=0." in base_g
    assert loop_g.startswith("looped (4⊗L)") and loop_g.endswith("n=2 depths: exact fit, R² not meaningful")
    assert legends["h"] == [f"{NON_LOOPED}: α=14.43, β=10.0, n=2 depths: exact fit, R² not meaningful"]


def test_figure_grid_fits_four_groups_and_refuses_no_data() -> None:
    points = [DepthPoint(f"base-{d}x1", d, d, {g: 0.01 * d for g in "abcd"}) for d in (2, 4, 8)]
    figure = scaling_figure(points, fit_scaling(points, list("abcde")))
    assert len(figure.axes) == 4 and tuple(figure.get_size_inches()) == pytest.approx((13.5, 7.2))  # 2 rows of 3
    with pytest.raises(ValueError, match="no model has a score in any of the groups x, y"):
        scaling_figure(points, fit_scaling(points, ["x", "y"]))
