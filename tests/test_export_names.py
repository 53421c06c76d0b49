"""One name for a policy: ``hf/policy_NNN`` holds M_NNN, as ``results.md`` (``M_NNN``) and the
evaluation (``eval/<benchmark>/policy_NNN.json``) call it; run folders written before that
name (``hf/iteration_NNN``, which held M_{NNN+1}) are still found."""

from __future__ import annotations

from hs_star_pl.training.export import find_export, latest_export, policy_name


def test_policy_exports_and_the_earlier_iteration_names_are_found(tmp_path):
    hf = tmp_path / "hf"
    assert latest_export(hf) is None and find_export(hf, 1) is None
    for name in ("iteration_000", "iteration_001", "policy_003", "policy_004.tmp"):
        (hf / name).mkdir(parents=True)
    assert policy_name(3) == "policy_003"
    assert find_export(hf, 1) == hf / "iteration_000"  # an earlier run folder: M_1 was iteration_000
    assert find_export(hf, 2) == hf / "iteration_001"
    assert find_export(hf, 3) == hf / "policy_003"
    assert find_export(hf, 0) is None and find_export(hf, 5) is None
    assert latest_export(hf) == hf / "policy_003"  # a half-written .tmp is not an export
    (hf / "iteration_009").mkdir()
    assert latest_export(hf) == hf / "iteration_009"  # M_10 under the earlier name
