"""Our DPO epoch against TRL's ``DPOTrainer`` on CPU: the same model, pairs, batch size and steps.

Run: ``python benchmarks/dpo_vs_trl.py [--lengths tiny|paper] [--quick]`` (needs ``pip install
trl``, the ``bench`` extra).

The trainers, timed alternately in one process (``--repeats`` rounds, medians reported):

* **ours, packing sequences**: ``Trainer.fit`` with ``HSStarModule`` (``model.packing:
  sequences``, the default) + ``MathDataModule``; the reference log-probs are computed once,
  by the policy itself, when the dataloader is built; every forward pass (reference and
  training) lays the batch's sequences end to end (``hs_star_pl.tensors.packing``);
* **ours, packing shared_prompts**: the same with each pair's prompt laid down once for both
  responses;
* **ours, padded (before)**: ``packing: off``, every batch padded to its longest sequence,
  as before packing existed;
* **TRL**: ``DPOTrainer(...).train()`` with a reference model that runs a forward pass at
  every step (TRL's default);
* **TRL, precomputed**: the same with ``precompute_ref_log_probs=True``.

TRL's ``padding_free=True`` is tried too: TRL 1.16's ``DPOTrainer`` warns that it is
"temporarily unavailable" and pads instead, so it gets a note and no row (a row appears if a
TRL version keeps it on).

All of them: the same tiny Qwen2 model (byte tokenizer) and weights, fp32, the same pairs,
batch size, number of steps (one epoch), AdamW with a constant learning rate and no weight
decay, gradient clipping at 1.0, ``--threads`` torch threads. "whole call" times everything the
user waits for (tokenising, reference log-probs, the steps); "steps" times the first step's
start to the last step's end. The ratio columns divide by the faster TRL row (by whole call).

Two length distributions (``--lengths``):

* ``tiny``: the tiny demo's arithmetic chains (the reference solution against one with a wrong
  last step): prompts ~130 tokens, responses ~60-100, pairs of similar length;
* ``paper``: lengths like a 7B run's, scaled to this CPU: prompts 40-100 tokens, responses
  log-normal (median 120, sigma 0.9) cut to 12-600 tokens, 0.4 times the 30-1500 of a paper
  run, chosen and rejected drawn independently (arithmetic steps as text).

Before timing, the script checks that both frameworks compute the *same loss* on the same
batch. The reference there is a perturbed copy of the policy (with reference == policy every
DPO loss is exactly ln 2, which would hide any difference): TRL's ``compute_loss`` on a batch
from its own collator against ``HSStarModule.response_logps`` (packed, and padded) +
``losses.dpo_loss`` with our precomputed reference log-probs, on the same pairs in the same
order. It also checks that both tokenise to identical ids and masks.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import re
import sys
import tempfile
import warnings
from functools import partial

from bench_common import REPO, common_parser, emit, interleaved, median, setup_torch

DEFAULTS = {
    "tiny": dict(n_steps=32, batch_size=16, repeats=2, hidden_size=128, num_hidden_layers=4, max_length=384),
    "paper": dict(n_steps=8, batch_size=16, repeats=2, hidden_size=128, num_hidden_layers=4, max_length=1024),
}
QUICK = dict(n_steps=2, batch_size=4, repeats=1, hidden_size=32, num_hidden_layers=1)
PAPER_PROMPT = (40, 100)
"""Prompt lengths of ``--lengths paper``, tokens (uniform)."""
PAPER_RESPONSE = dict(median=120, sigma=0.9, low=12, high=600)
"""Response lengths of ``--lengths paper``: log-normal, cut to [low, high] tokens."""
LAYOUTS = ("sequences", "shared_prompts", "off")
"""``model.packing``'s layouts, each checked against TRL's loss."""
MAX_LENGTH = DEFAULTS["tiny"]["max_length"]  # set from --lengths in main()


def make_pairs(n: int, lengths: str = "tiny"):
    """``n`` preference pairs with the ``lengths`` distribution (see the module docstring)."""
    return tiny_pairs(n) if lengths == "tiny" else paper_pairs(n)


def _steps_text(rng: random.Random, n_tokens: int, answer: int) -> str:
    """Arithmetic steps, then a boxed answer: ``n_tokens`` bytes (one token each, byte tokenizer)."""
    end = f"The answer is \\boxed{{{answer}}}."
    parts, k = [], 1
    while sum(map(len, parts)) < n_tokens - len(end):
        a, b = rng.randint(0, 99), rng.randint(1, 30)
        parts.append(f"Step {k}: {a} + {b} = {a + b}\n\n")
        k += 1
    return "".join(parts)[: max(0, n_tokens - len(end))] + end


def paper_pairs(n: int):
    """Pairs whose lengths vary like a paper run's (scaled down): short prompts, log-normal responses."""
    from hs_star_pl.core.records import PreferencePair

    rng = random.Random(0)

    def response_length() -> int:
        length = math.exp(math.log(PAPER_RESPONSE["median"]) + PAPER_RESPONSE["sigma"] * rng.gauss(0, 1))
        return int(min(PAPER_RESPONSE["high"], max(PAPER_RESPONSE["low"], length)))

    pairs = []
    for i in range(n):
        question = f"Problem {i}: start at {rng.randint(0, 30)}, then " + ", ".join(
            f"add {rng.randint(1, 30)}" for _ in range(40))
        prompt = question[: rng.randint(*PAPER_PROMPT) - 8] + "\nAnswer:"
        answer = rng.randint(0, 99)
        pairs.append(PreferencePair(
            problem_id=f"p{i}", prompt=prompt,
            chosen=_steps_text(rng, response_length(), answer),
            rejected=_steps_text(rng, response_length(), answer + 1 + i % 7),
            chosen_key=f"p{i}#chosen", rejected_key=f"p{i}#rejected",
        ))
    return pairs


def tiny_pairs(n: int):
    """``n`` preference pairs from the shipped task data: right solution vs a wrong last step."""
    from hs_star_pl.core.records import PreferencePair
    from hs_star_pl.core.templates import render_prompt

    pairs = []
    with open(REPO / "data" / "tiny" / "pool.jsonl", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            steps = row["solution"].split("\n\n")
            # steps[-2] is the last "Step k: a op b = c", steps[-1] the boxed answer
            wrong = int(row["answer"]) + 1 + len(pairs) % 7
            steps[-2] = re.sub(r"= \d+$", f"= {wrong}", steps[-2])
            steps[-1] = f"The answer is \\boxed{{{wrong}}}."
            pairs.append(
                PreferencePair(
                    problem_id=row["id"],
                    prompt=render_prompt("plain", row["question"]),
                    chosen=row["solution"],
                    rejected="\n\n".join(steps),
                    chosen_key=f"{row['id']}#chosen",
                    rejected_key=f"{row['id']}#rejected",
                )
            )
            if len(pairs) == n:
                return pairs
    raise ValueError(f"data/tiny/pool.jsonl has fewer than {n} problems")


def tiny_config(size: dict):
    from hs_star_pl.training.module import TinyModelConfig

    return TinyModelConfig(hidden_size=size["hidden_size"], num_hidden_layers=size["num_hidden_layers"], num_attention_heads=4)


def ours_module(size: dict, lr: float, beta: float, packing: str = "sequences"):
    import torch

    from hs_star_pl.training.module import HSStarModule

    return HSStarModule(
        tiny=tiny_config(size), objective="dpo", beta=beta, packing=packing,
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.0),
    )


# ---------------------------------------------------------------------------- TRL side


def trl_dataset(pairs):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])


def trl_trainer(model, ref_model, tokenizer, pairs, *, batch_size, n_steps, lr, beta, precompute, out_dir, callbacks=(),
                padding_free=False):
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=batch_size,
        max_steps=n_steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        beta=beta,
        loss_type=["sigmoid"],
        max_length=MAX_LENGTH,
        precompute_ref_log_probs=precompute,
        padding_free=padding_free,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=trl_dataset(pairs),
        processing_class=tokenizer, callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # it prints the metrics dict at the end of train()
    return trainer


# ---------------------------------------------------------------------------- the loss check


def loss_check(pairs, size: dict, beta: float, dtype: str = "float32") -> dict:
    """Both frameworks' DPO loss on one batch, against a perturbed-copy reference, with weights in ``dtype``.

    float32 shows the rounding both sides live with: summed log-probs of long responses differ in
    their last digits with the order of the sums (and a packed row's matmul shapes). float64
    takes that rounding away, so what remains is any difference in what is computed.
    """
    import torch

    from hs_star_pl.tensors.collate import collate_pairs, encode_pair
    from hs_star_pl.tensors.losses import dpo_loss

    policy = ours_module(size, 1e-5, beta)
    reference = ours_module(size, 1e-5, beta)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in reference.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    policy.model.to(getattr(torch, dtype))
    reference.model.to(getattr(torch, dtype))
    batch_pairs = list(pairs)
    # ours: reference log-probs precomputed once, then one forward of the policy
    with_ref = reference.compute_reference_logps(batch_pairs, max_length=MAX_LENGTH, batch_size=len(batch_pairs))
    tok = policy.tokenizer
    encoded = [encode_pair(tok, p, MAX_LENGTH) for p in with_ref]
    ours_batch = collate_pairs(encoded, tok.pad_token_id, "right", [(p.ref_chosen_logp, p.ref_rejected_logp) for p in with_ref])
    n = len(batch_pairs)
    for key, values in (("ref_chosen_logps", [p.ref_chosen_logp for p in with_ref]),
                        ("ref_rejected_logps", [p.ref_rejected_logp for p in with_ref])):
        ours_batch[key] = torch.tensor(values, dtype=torch.float64)  # not collate's float32
    losses = {}
    for packing in LAYOUTS:
        policy.packing = packing
        with torch.no_grad():
            logps = policy.response_logps(ours_batch, n_pairs=n)
            losses[packing], _, _ = dpo_loss(
                logps[:n], logps[n:], ours_batch["ref_chosen_logps"], ours_batch["ref_rejected_logps"], beta)

    # TRL: its own tokenisation and collator, its reference model forward, its loss
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trl_trainer(
            copy.deepcopy(policy.model), copy.deepcopy(reference.model), tok, batch_pairs,
            batch_size=n, n_steps=1, lr=1e-5, beta=beta, precompute=False, out_dir=tmp,
        )
        trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
        with torch.no_grad():
            trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    same_ids = torch.equal(trl_batch["input_ids"], ours_batch["input_ids"]) and torch.equal(
        trl_batch["completion_mask"], ours_batch["response_mask"]
    )
    return {"ours": {layout: float(loss) for layout, loss in losses.items()}, "trl": float(trl_loss),
            "same_tokens": same_ids, "n_pairs": n}


def trl_keeps_padding_free(pairs, size: dict) -> bool:
    """Whether this TRL's ``DPOTrainer`` keeps ``padding_free=True`` (1.16 turns it off with a warning)."""
    source = ours_module(size, 1e-5, 0.1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trl_trainer(source.model, None, source.tokenizer, pairs[:2], batch_size=2, n_steps=1, lr=1e-5,
                              beta=0.1, precompute=True, out_dir=tmp, padding_free=True)
    return bool(getattr(trainer, "padding_free", True))


# ---------------------------------------------------------------------------- timed runs


def run_ours(pairs, size, *, batch_size, n_steps, lr, beta, out_dir, packing: str = "sequences") -> dict:
    """``packing``: ``model.packing``'s layout: ``sequences``, ``shared_prompts`` or ``off`` (padded)."""
    import lightning as L

    from hs_star_pl.training.data import MathDataModule

    module = ours_module(size, lr, beta, packing=packing)
    data = MathDataModule(template="plain", max_length=MAX_LENGTH, batch_size=batch_size, ref_batch_size=batch_size)
    data.set_train_examples(pairs)
    steps = _StepClock()

    class LightningClock(L.Callback):
        def on_train_batch_start(self, *args):
            steps.start()

        def on_train_batch_end(self, *args):
            steps.stop()

    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=n_steps, max_epochs=1, gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=out_dir, callbacks=[LightningClock()],
    )
    trainer.fit(module, datamodule=data)
    if trainer.global_step != n_steps:
        raise RuntimeError(f"ours ran {trainer.global_step} steps, expected {n_steps}")
    return {"steps_s": steps.seconds(), "n_steps": trainer.global_step}


def run_trl(pairs, size, *, batch_size, n_steps, lr, beta, precompute, out_dir, padding_free=False) -> dict:
    from transformers import TrainerCallback

    steps = _StepClock()

    class TRLClock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            steps.start()

        def on_step_end(self, *args, **kwargs):
            steps.stop()

    # the same initial weights as ours (HSStarModule builds them from the same config and seed)
    source = ours_module(size, lr, beta)
    ref = None if precompute else copy.deepcopy(source.model)
    trainer = trl_trainer(
        source.model, ref, source.tokenizer, pairs, batch_size=batch_size, n_steps=n_steps, lr=lr, beta=beta,
        precompute=precompute, out_dir=out_dir, callbacks=[TRLClock()], padding_free=padding_free,
    )
    trainer.train()
    if trainer.state.global_step != n_steps:
        raise RuntimeError(f"TRL ran {trainer.state.global_step} steps, expected {n_steps}")
    return {"steps_s": steps.seconds(), "n_steps": trainer.state.global_step}


class _StepClock:
    """First step's start to last step's end."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None

    def start(self) -> None:
        import time

        if self.first is None:
            self.first = time.perf_counter()

    def stop(self) -> None:
        import time

        self.last = time.perf_counter()

    def seconds(self) -> float:
        if self.first is None or self.last is None:
            raise RuntimeError("no training step ran")
        return self.last - self.first


def main() -> None:
    global MAX_LENGTH
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--lengths", choices=sorted(DEFAULTS), default="tiny",
                        help="length distribution of the pairs (see the module docstring; default tiny)")
    parser.add_argument("--steps", type=int, help="optimizer steps = one epoch (default 32 tiny, 8 paper)")
    parser.add_argument("--batch-size", type=int, help="pairs per step (default 16)")
    parser.add_argument("--repeats", type=int, help="timed rounds of the trainers (default 2)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()
    size = dict(DEFAULTS[args.lengths])
    if args.quick:
        size.update(QUICK)
    for key, value in (("n_steps", args.steps), ("batch_size", args.batch_size), ("repeats", args.repeats)):
        if value is not None:
            size[key] = value
    MAX_LENGTH = size["max_length"]
    setup_torch(args.threads)
    try:
        import trl
    except ImportError:
        sys.exit("dpo_vs_trl.py needs TRL: pip install trl (the 'bench' extra)")
    import datasets

    datasets.disable_progress_bars()
    os.environ["TQDM_DISABLE"] = "1"  # TRL's reference log-prob pass has its own bar
    warnings.filterwarnings("ignore", module="lightning")  # "no validation set", "few workers": expected here
    import lightning  # noqa: F401  (its import sets its loggers to INFO; quieten them after)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("trl").setLevel(logging.ERROR)  # the padding_free fallback warning: reported below
    n_pairs = size["n_steps"] * size["batch_size"]
    pairs = make_pairs(n_pairs, args.lengths)
    n_params = sum(p.numel() for p in ours_module(size, args.lr, args.beta).model.parameters())

    check = loss_check(pairs[: size["batch_size"]], size, args.beta)
    check64 = loss_check(pairs[: size["batch_size"]], size, args.beta, "float64")
    diff = max(abs(loss - check["trl"]) for loss in check["ours"].values())
    diff64 = max(abs(loss - check64["trl"]) for loss in check64["ours"].values())
    padding_free = trl_keeps_padding_free(pairs, size)

    common = dict(batch_size=size["batch_size"], n_steps=size["n_steps"], lr=args.lr, beta=args.beta)
    trainers = {
        "ours, packing sequences": lambda: run_ours(pairs, size, out_dir=f"{tmp}/ours", **common),
        "ours, packing shared_prompts": lambda: run_ours(pairs, size, out_dir=f"{tmp}/ours_shared",
                                                         packing="shared_prompts", **common),
        "ours, padded (before)": lambda: run_ours(pairs, size, out_dir=f"{tmp}/ours_padded", packing="off", **common),
        "TRL": lambda: run_trl(pairs, size, precompute=False, out_dir=f"{tmp}/trl", **common),
        "TRL, precomputed": lambda: run_trl(pairs, size, precompute=True, out_dir=f"{tmp}/trl_pre", **common),
    }
    if padding_free:
        trainers["TRL, precomputed, padding_free"] = lambda: run_trl(
            pairs, size, precompute=True, padding_free=True, out_dir=f"{tmp}/trl_pf", **common)
    with tempfile.TemporaryDirectory() as tmp:
        runs = interleaved(trainers, size["repeats"])

    whole = {name: median([t for t, _ in results]) for name, results in runs.items()}
    steps = {name: median([r["steps_s"] for _, r in results]) for name, results in runs.items()}
    best = min((name for name in runs if name.startswith("TRL")), key=whole.__getitem__)
    rows = [(name, whole[name], steps[name], steps[name] / size["n_steps"], whole[name] / whole[best],
             steps[name] / steps[best]) for name in runs]
    tokens = token_counts(pairs, size)
    notes = [
        f"TRL {trl.__version__}, transformers {__import__('transformers').__version__}; model: tiny Qwen2 "
        f"({n_params / 1e6:.2f}M parameters, fp32); {n_pairs} pairs ({args.lengths} lengths), batch "
        f"{size['batch_size']}, {size['n_steps']} steps (one epoch), beta {args.beta}; medians of {size['repeats']} "
        f"interleaved runs",
        f"first-batch loss ({check['n_pairs']} pairs, reference = perturbed policy): ours "
        + ", ".join(f"{layout} {loss:.7f}" for layout, loss in check["ours"].items())
        + f", TRL {check['trl']:.7f}, largest |ours - TRL| {diff:.1e} "
        f"(ln 2 = {math.log(2):.7f}); identical token ids and masks: {'yes' if check['same_tokens'] else 'NO'}; "
        "in float64: ours " + ", ".join(f"{layout} {loss:.9f}" for layout, loss in check64["ours"].items())
        + f", TRL {check64['trl']:.9f}, largest |ours - TRL| {diff64:.1e}",
        f"tokens per epoch: {tokens['real']:,} in the pairs; padded batches {tokens['padded']:,}, packed rows "
        f"{tokens['packed']:,} (in the module's row groups {tokens['packed_groups']:,}), packed rows with shared "
        f"prompts {tokens['shared']:,} (in row groups {tokens['shared_groups']:,})",
        "TRL padding_free=True: " + ("kept on (row above)" if padding_free else
                                     f"TRL {trl.__version__}'s DPOTrainer turns it off with a warning "
                                     f"(\"temporarily unavailable\") and pads; no row"),
        f"ratio columns: against {best!r}, the faster TRL row",
    ]
    emit("DPO training: ours vs TRL DPOTrainer", notes,
         ["trainer", "whole call s", "steps s", "s/step", "whole vs TRL best", "steps vs TRL best"], rows, args.json)
    if diff64 > 1e-5 or not check["same_tokens"]:  # float32 rounding alone can exceed 1e-5 on long responses
        sys.exit("the two frameworks disagree on the first batch (see above)")


def token_counts(pairs, size: dict) -> dict[str, int]:
    """Tokens one epoch's training batches hold: in the pairs, padded, packed, packed with shared prompts;
    the packed ones in rows of one width and in the module's row groups (``packing.pack_batch_groups``).

    The batches in input order (training shuffles, so these are a typical draw, not the exact one).
    """
    from hs_star_pl.tensors.collate import collate_pairs, encode_pair
    from hs_star_pl.tensors.packing import attention_pair_cost, pack_batch, pack_batch_groups

    module = ours_module(size, 1e-5, 0.1)
    tok, pair_cost = module.tokenizer, attention_pair_cost(module.model)
    counts = dict.fromkeys(("real", "padded", "packed", "shared", "packed_groups", "shared_groups"), 0)
    for start in range(0, len(pairs), size["batch_size"]):
        chunk = [encode_pair(tok, p, MAX_LENGTH) for p in pairs[start : start + size["batch_size"]]]
        batch = collate_pairs(chunk, tok.pad_token_id)
        counts["real"] += int(batch["attention_mask"].sum())
        counts["padded"] += batch["input_ids"].numel()
        args = (batch["input_ids"], batch["attention_mask"], batch["response_mask"], tok.pad_token_id)
        counts["packed"] += pack_batch(*args).n_tokens
        counts["shared"] += pack_batch(*args, n_pairs=len(chunk)).n_tokens
        counts["packed_groups"] += sum(g.n_tokens for g in pack_batch_groups(*args, pair_cost=pair_cost))
        counts["shared_groups"] += sum(g.n_tokens for g in pack_batch_groups(*args, n_pairs=len(chunk),
                                                                             pair_cost=pair_cost))
    return counts


if __name__ == "__main__":
    main()
