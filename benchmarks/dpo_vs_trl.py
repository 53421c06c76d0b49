"""Our DPO epoch against TRL's ``DPOTrainer`` on CPU: the same model, pairs, batch size and steps.

Run: ``python benchmarks/dpo_vs_trl.py [--quick]`` (needs ``pip install trl``, the ``bench`` extra).

Four trainers, timed alternately in one process (``--repeats`` rounds, medians reported):

* **ours**: ``Trainer.fit`` with ``HSStarModule`` + ``MathDataModule``; the reference
  log-probs are computed once, by the policy itself, when the dataloader is built, in
  batches of pairs sorted by length;
* **ours, reference pass in input order (before)**: the same with
  ``compute_reference_logps(sort_by_length=False)``, as it was before the pass sorted;
* **TRL**: ``DPOTrainer(...).train()`` with a reference model that runs a forward pass at
  every step (TRL's default);
* **TRL, precomputed**: the same with ``precompute_ref_log_probs=True``.

All three: the same tiny Qwen2 model (byte tokenizer) and weights, fp32, the same pairs
(arithmetic chains: the reference solution against one with a wrong last step), batch size,
number of steps (one epoch), AdamW with a constant learning rate and no weight decay,
gradient clipping at 1.0, ``--threads`` torch threads. "whole call" times everything the
user waits for (tokenising, reference log-probs, the steps); "steps" times the first step's
start to the last step's end.

Before timing, the script checks that both frameworks compute the *same loss* on the same
batch. The reference there is a perturbed copy of the policy (with reference == policy every
DPO loss is exactly ln 2, which would hide any difference): TRL's ``compute_loss`` on a batch
from its own collator against ``HSStarModule.response_logps`` + ``losses.dpo_loss`` with our
precomputed reference log-probs, on the same pairs in the same order. It also checks that
both tokenise to identical ids and masks.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from functools import partial

from bench_common import REPO, common_parser, emit, interleaved, median, setup_torch

DEFAULTS = dict(n_steps=32, batch_size=16, repeats=2, hidden_size=128, num_hidden_layers=4)
QUICK = dict(n_steps=2, batch_size=4, repeats=1, hidden_size=32, num_hidden_layers=1)
MAX_LENGTH = 384


def make_pairs(n: int):
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
    from hs_star_pl.module import TinyModelConfig

    return TinyModelConfig(hidden_size=size["hidden_size"], num_hidden_layers=size["num_hidden_layers"], num_attention_heads=4)


def ours_module(size: dict, lr: float, beta: float):
    import torch

    from hs_star_pl.module import HSStarModule

    return HSStarModule(
        tiny=tiny_config(size), objective="dpo", beta=beta,
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.0),
    )


# ---------------------------------------------------------------------------- TRL side


def trl_dataset(pairs):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])


def trl_trainer(model, ref_model, tokenizer, pairs, *, batch_size, n_steps, lr, beta, precompute, out_dir, callbacks=()):
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


def loss_check(pairs, size: dict, beta: float) -> dict:
    """Both frameworks' DPO loss on one batch, against a perturbed-copy reference."""
    import torch

    from hs_star_pl.collate import collate_pairs, encode_pair
    from hs_star_pl.losses import dpo_loss

    policy = ours_module(size, 1e-5, beta)
    reference = ours_module(size, 1e-5, beta)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in reference.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch_pairs = list(pairs)
    # ours: reference log-probs precomputed once, then one forward of the policy
    with_ref = reference.compute_reference_logps(batch_pairs, max_length=MAX_LENGTH, batch_size=len(batch_pairs))
    tok = policy.tokenizer
    encoded = [encode_pair(tok, p, MAX_LENGTH) for p in with_ref]
    ours_batch = collate_pairs(encoded, tok.pad_token_id, "right", [(p.ref_chosen_logp, p.ref_rejected_logp) for p in with_ref])
    with torch.no_grad():
        _, logps = policy.response_logps(ours_batch)
        n = len(batch_pairs)
        ours_loss, _, _ = dpo_loss(logps[:n], logps[n:], ours_batch["ref_chosen_logps"], ours_batch["ref_rejected_logps"], beta)

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
    return {"ours": float(ours_loss), "trl": float(trl_loss), "same_tokens": same_ids, "n_pairs": n}


# ---------------------------------------------------------------------------- timed runs


def run_ours(pairs, size, *, batch_size, n_steps, lr, beta, out_dir, sort_ref: bool = True) -> dict:
    import lightning as L

    from hs_star_pl.data import MathDataModule

    module = ours_module(size, lr, beta)
    if not sort_ref:  # the reference pass as it was: batches in input order
        compute = module.compute_reference_logps
        module.compute_reference_logps = lambda pairs, **kw: compute(pairs, sort_by_length=False, **kw)
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


def run_trl(pairs, size, *, batch_size, n_steps, lr, beta, precompute, out_dir) -> dict:
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
        precompute=precompute, out_dir=out_dir, callbacks=[TRLClock()],
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
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help=f"optimizer steps = one epoch (default {DEFAULTS['n_steps']})")
    parser.add_argument("--batch-size", type=int, help=f"pairs per step (default {DEFAULTS['batch_size']})")
    parser.add_argument("--repeats", type=int, help=f"timed rounds of the four trainers (default {DEFAULTS['repeats']})")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()
    size = dict(QUICK if args.quick else DEFAULTS)
    for key, value in (("n_steps", args.steps), ("batch_size", args.batch_size), ("repeats", args.repeats)):
        if value is not None:
            size[key] = value
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
    n_pairs = size["n_steps"] * size["batch_size"]
    pairs = make_pairs(n_pairs)
    n_params = sum(p.numel() for p in ours_module(size, args.lr, args.beta).model.parameters())

    check = loss_check(pairs[: size["batch_size"]], size, args.beta)
    diff = abs(check["ours"] - check["trl"])

    common = dict(batch_size=size["batch_size"], n_steps=size["n_steps"], lr=args.lr, beta=args.beta)
    with tempfile.TemporaryDirectory() as tmp:
        runs = interleaved(
            {
                "ours": lambda: run_ours(pairs, size, out_dir=f"{tmp}/ours", **common),
                "ours, reference pass in input order (before)": lambda: run_ours(
                    pairs, size, out_dir=f"{tmp}/ours_unsorted", sort_ref=False, **common),
                "TRL": lambda: run_trl(pairs, size, precompute=False, out_dir=f"{tmp}/trl", **common),
                "TRL, precomputed": lambda: run_trl(pairs, size, precompute=True, out_dir=f"{tmp}/trl_pre", **common),
            },
            size["repeats"],
        )

    base_whole = median([t for t, _ in runs["TRL"]])
    base_steps = median([r["steps_s"] for _, r in runs["TRL"]])
    rows = []
    for name, results in runs.items():
        whole = median([t for t, _ in results])
        steps = median([r["steps_s"] for _, r in results])
        rows.append((name, whole, steps, steps / size["n_steps"], whole / base_whole, steps / base_steps))
    notes = [
        f"TRL {trl.__version__}, transformers {__import__('transformers').__version__}; model: tiny Qwen2 "
        f"({n_params / 1e6:.2f}M parameters, fp32); {n_pairs} pairs, batch {size['batch_size']}, {size['n_steps']} steps "
        f"(one epoch), beta {args.beta}; medians of {size['repeats']} interleaved runs",
        f"first-batch loss ({check['n_pairs']} pairs, reference = perturbed policy): ours {check['ours']:.7f}, "
        f"TRL {check['trl']:.7f}, |difference| {diff:.1e} (ln 2 = {math.log(2):.7f}); "
        f"identical token ids and masks: {'yes' if check['same_tokens'] else 'NO'}",
    ]
    emit("DPO training: ours vs TRL DPOTrainer", notes,
         ["trainer", "whole call s", "steps s", "s/step", "whole vs TRL", "steps vs TRL"], rows, args.json)
    if diff > 1e-5 or not check["same_tokens"]:
        sys.exit("the two frameworks disagree on the first batch (see above)")


if __name__ == "__main__":
    main()
