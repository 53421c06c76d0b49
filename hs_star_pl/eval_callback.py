"""``EvaluationCallback``: held-out accuracy of M_0 and of the policy after every iteration.

M_0 is evaluated when training starts and M_{t+1} at the end of iteration t's last epoch
(before the checkpoint is written, since Lightning runs ``ModelCheckpoint`` last). Results
live on disk, ``<default_root_dir>/eval/<name>/policy_NNN.json`` with every response and
verdict, and ``<default_root_dir>/results.md`` tabulates them; a file already there is not
recomputed, so a resumed run neither repeats nor loses an evaluation. Ranks evaluate their
share of the problems and rank 0 writes the gathered result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from hs_star_pl.artifacts import atomic_write_text, round_dir, write_json
from hs_star_pl.distributed import all_gather_objects
from hs_star_pl.evaluation import EvalResult, evaluate, results_table
from hs_star_pl.problems import load_problems
from hs_star_pl.protocols import AnswerVerifier, SamplingParams
from hs_star_pl.templates import render_prompt


class EvaluationCallback(L.Callback):
    """Greedy held-out evaluation of M_0 and after every self-training iteration.

    Inactive while ``problems_file`` is unset.

    Args:
        problems_file: held-out problems (JSONL, ``problems.load_problems`` format).
        name: label of this evaluation (folder under ``eval/``, metric ``eval/<name>_accuracy``).
        max_problems: evaluate only the first ``max_problems`` problems.
        verifier: answer verifier (``class_path``); default ``MathVerifyVerifier()``.
        max_new_tokens: generation cap per response.
        batch_size: sequences per ``generate`` call.
        epochs_per_iteration: training epochs per iteration (linked to
            ``self_training.epochs_per_iteration``).
    """

    def __init__(
        self,
        problems_file: str | None = None,
        name: str = "test",
        max_problems: int | None = None,
        verifier: AnswerVerifier | None = None,
        max_new_tokens: int = 512,
        batch_size: int = 128,
        epochs_per_iteration: int = 1,
    ) -> None:
        if max_problems is not None and max_problems < 1:
            raise ValueError(f"evaluation.max_problems must be >= 1, got {max_problems}")
        if epochs_per_iteration < 1:
            raise ValueError(f"evaluation.epochs_per_iteration must be >= 1, got {epochs_per_iteration}")
        self.problems_file = problems_file
        self.name = name
        self.max_problems = max_problems
        self.verifier = verifier
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.epochs_per_iteration = epochs_per_iteration
        self._problems = None

    @property
    def state_key(self) -> str:
        return f"EvaluationCallback[{self.name}]"

    def directory(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / "eval" / self.name

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.problems_file is None:
            return
        problems = load_problems(self.problems_file)
        self._problems = problems[: self.max_problems] if self.max_problems else problems
        if self.verifier is None:
            from hs_star_pl.verifiers import MathVerifyVerifier

            self.verifier = MathVerifyVerifier()

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._problems is not None:
            self.evaluate_policy(trainer, pl_module, trainer.current_epoch // self.epochs_per_iteration)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._problems is not None and (trainer.current_epoch + 1) % self.epochs_per_iteration == 0:
            self.evaluate_policy(trainer, pl_module, (trainer.current_epoch + 1) // self.epochs_per_iteration)

    def evaluate_policy(self, trainer: L.Trainer, pl_module: L.LightningModule, policy: int) -> dict[str, Any]:
        """Evaluate the current policy as ``M_policy`` unless its result is already on disk."""
        path = self.directory(trainer) / f"policy_{policy:03d}.json"
        if path.is_file():
            return json.loads(path.read_text())
        from hs_star_pl.engines import HFEngine

        template = trainer.datamodule.template
        rank, world = trainer.global_rank, trainer.world_size
        engine = HFEngine(batch_size=self.batch_size, progress=False).bind(pl_module.model, pl_module.tokenizer)
        mine = evaluate(
            self._problems[rank::world],
            engine=engine,
            verifier=self.verifier,
            render_prompt=lambda p: render_prompt(template, p.question),
            params=SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=self.max_new_tokens),
        )
        parts = all_gather_objects(world, mine)
        result = EvalResult.from_rows([r for part in parts for r in part.rows], mine.n_samples)
        entry = {"policy": policy, "name": self.name, "problems_file": self.problems_file, "summary": result.summary()}
        if trainer.is_global_zero:
            write_json(path, {**entry, "rows": result.rows})
            self._write_table(trainer)
            for logger in trainer.loggers:
                logger.log_metrics({f"eval/{self.name}_accuracy": result.accuracy, f"eval/{self.name}_policy": float(policy)}, step=trainer.global_step)
        trainer.strategy.barrier("hs_star_eval_written")
        rank_zero_info(f"eval/{self.name}: M_{policy} accuracy {result.accuracy:.3f} on {result.n_problems} problems")
        return entry

    def _write_table(self, trainer: L.Trainer) -> None:
        entries = []
        for f in sorted(self.directory(trainer).glob("policy_*.json")):
            e = json.loads(f.read_text())
            # M_{t+1} was trained on round t's pairs
            summary_file = round_dir(trainer.default_root_dir, e["policy"] - 1) / "summary.json"
            if e["policy"] > 0 and summary_file.is_file():
                e["n_pairs"] = json.loads(summary_file.read_text()).get("n_pairs")
            entries.append(e)
        text = f"# Results: {self.name} ({self.problems_file})\n\n" + results_table(entries)
        atomic_write_text(Path(trainer.default_root_dir) / "results.md", text)

