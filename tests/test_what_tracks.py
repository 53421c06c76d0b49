"""``experiments.what_tracks``: the least-squares fit of final accuracy over kept runs."""

from __future__ import annotations

import pytest

from hs_star_pl.experiments import compare
from hs_star_pl.experiments.what_tracks import fit, load_runs, main


def keep(folder, method, seed, accuracy, problems, pairs, paired=None, rounds=None):
    """A kept summary as ``compare --keep`` writes it (``rounds``: per-round (problems, pairs, accuracy))."""
    rounds = rounds or [(problems, pairs, accuracy)]
    compare.keep(compare.RunResult(method, seed, [0.5, *[a for _, _, a in rounds]], [b for _, b, _ in rounds],
                                   [2400] * len(rounds), problems_with_pairs=[a for a, _, _ in rounds],
                                   paired=paired or []), folder / method / f"seed_{seed}")


def test_a_run_kept_in_two_studies_counts_once_and_rounds_are_summed(tmp_path):
    keep(tmp_path / "a", "uniform", 0, 0.61, 170, 400)
    keep(tmp_path / "b", "uniform", 0, 0.61, 170, 400)  # the same run, kept again
    keep(tmp_path / "b", "hs_star", 0, 0.60, 120, 560)
    keep(tmp_path / "b", "same_counts", 0, 0.60, 120, 560, paired=[{"p1": 3}])  # other problems paired: another run
    keep(tmp_path / "c", "two_rounds", 1, None, None, None, rounds=[(100, 300, 0.55), (90, 250, 0.62)])
    runs = load_runs([tmp_path / "a", tmp_path / "b", tmp_path / "c"])
    assert [(r.method, r.seed, r.accuracy, r.problems_with_pairs, r.pairs) for r in runs] == [
        ("uniform", 0, 0.61, 170, 400), ("hs_star", 0, 0.60, 120, 560), ("same_counts", 0, 0.60, 120, 560),
        ("two_rounds", 1, 0.62, 190, 550)]


def test_the_fit_recovers_known_slopes_and_its_interval_widens_with_noise():
    # accuracy = 0.3 + 0.02 per 100 problems - 0.01 per 100 pairs, exactly
    problems = [0.8, 1.2, 1.6, 1.8, 1.2, 0.9, 1.7]
    pairs = [5.8, 5.6, 4.9, 2.9, 4.1, 3.0, 5.2]
    exact = [0.3 + 0.02 * a - 0.01 * b for a, b in zip(problems, pairs)]
    f = fit(exact, {"problems": problems, "pairs": pairs})
    assert f.coef == pytest.approx((0.3, 0.02, -0.01)) and f.r2 == pytest.approx(1.0)
    assert f.high[1] - f.low[1] == pytest.approx(0.0, abs=1e-9)
    noisy = [y + e for y, e in zip(exact, [0.004, -0.003, 0.002, -0.004, 0.003, -0.002, 0.001])]
    g = fit(noisy, {"problems": problems, "pairs": pairs})
    assert g.low[1] < g.coef[1] < g.high[1] and g.high[1] - g.low[1] > 0.001 and g.r2 < 1.0
    with pytest.raises(SystemExit, match="2 runs cannot fit 3 coefficients"):
        fit([0.1, 0.2], {"problems": [1, 2], "pairs": [3, 4]})


def test_the_command_prints_the_means_and_fits_and_names_an_empty_folder(tmp_path, capsys):
    for seed, (acc, problems, pairs) in enumerate([(0.66, 120, 560), (0.67, 125, 540), (0.665, 118, 570)]):
        keep(tmp_path / "s", "hs_star", seed, acc, problems, pairs)
    for seed, (acc, problems, pairs) in enumerate([(0.68, 177, 400), (0.685, 180, 410), (0.675, 170, 395)]):
        keep(tmp_path / "s", "uniform", seed, acc, problems, pairs)
    main([str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert "| hs_star | 3 | 0.665 | 121.0 | 556.7 |" in out and "| uniform | 3 | 0.680 | 175.7 | 401.7 |" in out
    assert out.count("| both |") == 1 and "| 6 |" in out
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty holds no <method>/seed_<s>/run.json"):
        main([str(tmp_path / "empty")])
