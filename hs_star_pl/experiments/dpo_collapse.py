"""Why plain DPO lowers the tiny M_0's accuracy: one round's pairs, trained one factor at a time.

``python -m hs_star_pl.experiments.dpo_collapse --round checkpoints/tiny/studies/hs_star/seed_0/rounds/round_000``

Takes a recorded round of the tiny demo (its scored rollouts and classes), rebuilds its pairs
under the paper's pair rule (no clean-chosen rule, rejected responses whole) beside the demo's
own (``pairs.jsonl``: clean chosen, rejected cut after the first wrong step), and trains M_0 on
them for one epoch (``hs-star fit -c configs/tiny/hs_star.yaml`` with ``data.train_file``,
reference log-probs from M_0) under each variant: plain DPO at the demo's lr and beta, a 10x
smaller lr, beta 1.0, the demo's pairs with plain DPO, and each pair rule with the NLL term.
For every trained policy it reports greedy accuracy on the dev split and the mean summed
log-prob (nats) of the paper-rule pairs' chosen and rejected responses and of the dev
split's gold solutions, against M_0's. Settings come from the demo's config; nothing reads
the test set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from hs_star_pl.core.artifacts import read_jsonl, read_round
from hs_star_pl.core.selection import SelectionConfig, select_training_data
from hs_star_pl.core.templates import render_prompt

VARIANTS = {  # name: (pair rule, extra CLI arguments)
    "paper pairs, plain DPO": ("paper", ["--model.sft_weight=0"]),
    "paper pairs, plain DPO, lr 1e-6": ("paper", ["--model.sft_weight=0", "--model.optimizer.init_args.lr=1e-6"]),
    "paper pairs, plain DPO, beta 1.0": ("paper", ["--model.sft_weight=0", "--model.beta=1.0"]),
    "demo pairs, plain DPO": ("demo", ["--model.sft_weight=0"]),
    "paper pairs, DPO + NLL 5": ("paper", []),
    "demo pairs, DPO + NLL 5 (the demo)": ("demo", []),
}


def write_pairs(round_dir: Path, out: Path) -> dict[str, Path]:
    """The round's pairs under the paper's rule and the demo's, without reference log-probs."""
    result = read_round(round_dir)
    paper = select_training_data(
        result.problems, result.rollouts, result.difficulties,
        SelectionConfig(train_classes=["boundary"], min_chosen_prm=None, truncate_rejected_below=None),
        lambda p: render_prompt("plain", p.question), seed=0,
    )
    paths = {"paper": out / "paper_pairs.jsonl", "demo": out / "demo_pairs.jsonl"}
    paths["paper"].write_text("".join(json.dumps(p.to_dict()) + "\n" for p in paper))
    demo = [{k: v for k, v in row.items() if not k.startswith("ref_")} for row in read_jsonl(round_dir / "pairs.jsonl")]
    paths["demo"].write_text("".join(json.dumps(row) + "\n" for row in demo))
    return paths


def train(name: str, pairs: Path, extra: list[str], run: Path, dev: str, dev_limit: int) -> float:
    args = [sys.executable, "-m", "hs_star_pl", "fit", "-c", "configs/tiny/hs_star.yaml", "--self_training.problems_file=null",
            f"--data.train_file={pairs}", "--trainer.max_epochs=1", f"--evaluation.problems_file={dev}",
            f"--evaluation.max_problems={dev_limit}", f"--trainer.default_root_dir={run}", *extra]
    if not (run / "eval" / "test" / "policy_001.json").is_file():
        print(f"[dpo_collapse] {name}: {' '.join(args)}", flush=True)
        with (run.parent / f"{run.name}.log").open("w") as log:
            subprocess.run(args, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads((run / "eval" / "test" / "policy_001.json").read_text())["summary"]["accuracy"]


def mean_logps(model_dir: Path, pairs: list[dict], gold: list[dict]) -> tuple[float, float, float]:
    """Mean summed response log-prob of chosen, rejected and gold dev solutions (EOS included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def logp(prompt: str, response: str) -> float:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        token_logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
        return float(token_logps[len(p) - 1 :].sum())

    chosen = statistics.mean(logp(x["prompt"], x["chosen"]) for x in pairs)
    rejected = statistics.mean(logp(x["prompt"], x["rejected"]) for x in pairs)
    solutions = statistics.mean(logp(render_prompt("plain", x["question"]), x["solution"]) for x in gold)
    return chosen, rejected, solutions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round", required=True, type=Path, help="a recorded round folder of the tiny demo")
    parser.add_argument("--m0", default="data/tiny/m0")
    parser.add_argument("--dev", default="data/tiny/dev.jsonl")
    parser.add_argument("--dev-limit", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("checkpoints/tiny/dpo_collapse"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = write_pairs(args.round, args.out)
    paper_pairs = read_jsonl(pairs["paper"])
    gold = read_jsonl(args.dev)[: args.dev_limit]
    base = mean_logps(Path(args.m0), paper_pairs, gold)
    rows = []
    m0_accuracy = None
    for i, (name, (rule, extra)) in enumerate(VARIANTS.items()):
        run = args.out / f"variant_{i}"
        accuracy = train(name, pairs[rule], extra, run, args.dev, args.dev_limit)
        m0_accuracy = json.loads((run / "eval" / "test" / "policy_000.json").read_text())["summary"]["accuracy"]
        shifted = mean_logps(run / "hf" / "policy_001", paper_pairs, gold)
        rows.append([name, f"{accuracy:.3f}"] + [f"{a - b:+.2f}" for a, b in zip(shifted, base)])
    print(f"round {args.round}: {len(paper_pairs)} paper-rule pairs, {len(read_jsonl(pairs['demo']))} demo pairs; "
          f"M_0 dev accuracy {m0_accuracy:.3f} (first {args.dev_limit}); M_0 mean log-probs: chosen {base[0]:.2f}, "
          f"rejected {base[1]:.2f}, gold dev solutions {base[2]:.2f}\n")
    print("| variant | dev acc. M_1 | Δ chosen log-prob | Δ rejected log-prob | Δ gold dev log-prob |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
