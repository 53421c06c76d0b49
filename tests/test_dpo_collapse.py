"""``experiments.dpo_collapse`` rebuilds a recorded round's pairs under the paper's rule beside
the demo's own; the training runs themselves are the experiment (docs/results-tiny.md)."""

from __future__ import annotations

from hs_star_pl.core.artifacts import read_jsonl, write_round
from hs_star_pl.core.difficulty import DifficultyConfig
from hs_star_pl.core.rounds import RoundConfig
from hs_star_pl.core.selection import SelectionConfig
from hs_star_pl.experiments.dpo_collapse import write_pairs
from tests.helpers.round_fakes import run


def test_the_paper_rule_keeps_whole_rejected_responses_and_the_demo_pairs_are_the_rounds(tmp_path):
    demo_rule = SelectionConfig(min_chosen_prm=0.5, truncate_rejected_below=0.95)  # cuts every wrong response
    result = run(config=RoundConfig(difficulty=DifficultyConfig(tau_low=0.3, tau_high=0.6), selection=demo_rule))
    round_dir = tmp_path / "round_000"
    write_round(round_dir, result)
    paths = write_pairs(round_dir, tmp_path)
    demo, paper = read_jsonl(paths["demo"]), read_jsonl(paths["paper"])
    recorded = read_jsonl(round_dir / "pairs.jsonl")
    assert demo == [{k: v for k, v in row.items() if not k.startswith("ref_")} for row in recorded]
    assert paper and all(not row["rejected_cut"] for row in paper)
    wrong_texts = {(r.problem_id, r.text) for r in result.rollouts if r.correct is False}
    assert all((row["problem_id"], row["rejected"]) in wrong_texts for row in paper)  # whole responses
    assert any(row["rejected_cut"] for row in demo)
    assert all(row["prompt"].startswith("Question: ") for row in paper)  # the demo's plain template
