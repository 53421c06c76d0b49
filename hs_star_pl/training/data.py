"""``MathDataModule``: the current iteration's training examples, and the evaluation problem sets.

Examples are ``PreferencePair`` (DPO) or ``SftExample`` (SFT) records. They come from one of:

* ``train_file``: JSONL of pairs (``chosen`` + ``rejected``) or SFT rows (``response``);
* ``problems_file``: problems with a ``solution`` (step-wise initialisation, SFT);
* an *example source* (``set_example_source``): a callable that ``train_dataloader`` asks
  for the examples of the epoch it is building. The self-training callback registers one in
  its ``setup``; it returns iteration ``epoch // epochs_per_iteration``'s round, running the
  round first when it is not on disk. The self-training problem pool is the callback's, not
  this module's;
* ``set_train_examples``: examples set directly (the benchmarks and tests use it); the next
  ``train_dataloader`` call uses them.

``test_dataloader`` serves the problem sets ``set_eval_sets`` was given (by the evaluation
callback, for ``hs-star test``), sharded over ranks without repeats.

Prompt contract: a record's ``prompt`` is the *rendered* prompt, the exact text the policy
was conditioned on when the response was sampled. File rows may give ``prompt`` (used
verbatim) or ``question`` (rendered here with ``data.template``). Every rendering goes through
``MathDataModule.render_prompt`` (the self-training round and evaluation call it too), which
calls ``hs_star_pl.core.templates.render_prompt`` with the template, ``data.system_prompt`` and,
for ``data.template: chat``, the policy tokenizer's chat template.

``train_dataloader`` is where the data are taken: with ``reload_dataloaders_every_n_epochs: 1``
Lightning calls it at the start of every epoch, *before* ``on_train_epoch_start`` (and
``configure_optimizers`` may call it even earlier), so the examples are pulled from the
source at that call rather than pushed at a hook, and the policy is then exactly M_t. A
source that returns the same object again keeps the encoded examples; one that returns no
examples gets one placeholder batch (``collate.empty_iteration_batch``, which ``HSStarModule``
skips), since an epoch with zero batches would end training. Pairs without reference log-probs
get them here (``reference.with_reference_logps``), from the policy as it is when the
dataloader is built (the start of the iteration), cached under
``<default_root_dir>/reference_logps/`` for file-sourced pairs so a resume does not recompute
them with already-trained weights.

The data module talks to the rest in one direction: it asks the attached module for its
tokenizer and for reference log-probs, and reports its example counts (``data/*``) to the
trainer's loggers itself; nothing calls back into it. ``global_batch_size`` is declared here
and turned into the trainer's gradient accumulation by whoever builds the trainer
(``accumulate_grad_batches``; ``HSStarCLI`` does it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from hs_star_pl.tensors.collate import (
    EncodedSequence,
    PaddingSide,
    collate_pairs,
    collate_sequences,
    empty_iteration_batch,
    encode_example,
    encode_pair,
)
from hs_star_pl.core.problem_sources import ProblemFileError
from hs_star_pl.core.problems import MAX_LINE_BYTES, FieldMap, load_problems
from hs_star_pl.core.records import PreferencePair, SftExample
from hs_star_pl.evaluation.protocol import EvalBatch
from hs_star_pl.tensors.chat import checked_chat_renderer
from hs_star_pl.core.templates import ChatRenderer, get_template, render_prompt
from hs_star_pl.infra.errors import InputFileError
from hs_star_pl.infra.jsonl import LineError, LongLineError, parse_json_line, read_lines, why_not_a_file
from hs_star_pl.training.policy import Policy
from hs_star_pl.training.reference import missing_reference, with_reference_logps
from hs_star_pl.training.tracking import log_to_loggers

Examples = Sequence[PreferencePair] | Sequence[SftExample]


class ExampleFileError(InputFileError):
    """A training-example file cannot be used; the message names the file and line."""


def _check_row_fields(row: dict[str, Any], kind: str, where: str) -> None:
    texts = ("chosen", "rejected") if kind == "pair" else ("response",)
    for key in texts:
        if not isinstance(row[key], str):
            raise ExampleFileError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
    numbers = ("ref_chosen_logp", "ref_rejected_logp", "chosen_score", "rejected_score") if kind == "pair" else ("score",)
    for key in numbers:
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ExampleFileError(f"{where}: field {key!r} must be a finite number or null, got {value!r}")


def _prompt_of(row: dict[str, Any], render: Callable[[str], str], where: str) -> str:
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    if isinstance(row.get("question"), str):
        return render(row["question"])
    raise ExampleFileError(f"{where}: needs a 'prompt' (rendered) or 'question' string")


def _bounded_lines(fh, path: Path):
    """``read_lines`` with a line over ``MAX_LINE_BYTES`` as an ``ExampleFileError`` naming ``file:line``."""
    lines = read_lines(fh, MAX_LINE_BYTES)
    while True:
        try:
            yield next(lines)
        except StopIteration:
            return
        except LongLineError as err:
            raise ExampleFileError(f"{path}:{err.lineno}: {err}") from None


def load_examples(path: str | Path, template: str | Callable[[str], str]) -> list[PreferencePair] | list[SftExample]:
    """Read pairs or SFT examples from JSONL (all rows must be of one kind).

    ``template`` renders the rows that give a ``question``: a template name, or a function
    from question to prompt (``MathDataModule.render_prompt``, needed for chat templates).

    Pair rows: ``prompt`` or ``question``, ``chosen``, ``rejected``, optional ``problem_id``,
    ``ref_chosen_logp``/``ref_rejected_logp`` and the other ``PreferencePair`` fields. SFT rows:
    ``prompt`` or ``question``, ``response``, optional ``problem_id``.

    Raises:
        ExampleFileError: missing/empty file, bad JSON or UTF-8, an over-long line, a row of
            neither or a different kind, a text that is not a string, a score or reference
            log-prob that is not a finite number.
    """
    path = Path(path)
    if not path.is_file():
        raise ExampleFileError(f"{path}: {why_not_a_file(path, 'example file')}")
    render = template if callable(template) else lambda question: render_prompt(template, question)
    out: list[Any] = []
    kind = None
    with path.open("rb") as fh:
        for lineno, raw in _bounded_lines(fh, path):
            where = f"{path}:{lineno}"
            try:
                row = parse_json_line(raw, lineno)
            except LineError as err:
                raise ExampleFileError(f"{where}: {err}") from None
            if row is None:
                continue
            if not isinstance(row, dict):
                raise ExampleFileError(f"{where}: expected a JSON object")
            row_kind = "pair" if "chosen" in row and "rejected" in row else "sft" if "response" in row else None
            if row_kind is None:
                raise ExampleFileError(f"{where}: a row needs 'chosen' + 'rejected' (pair) or 'response' (SFT)")
            if kind is not None and row_kind != kind:
                raise ExampleFileError(f"{where}: {row_kind} row in a file of {kind} rows")
            kind = row_kind
            _check_row_fields(row, kind, where)
            prompt = _prompt_of(row, render, where)
            pid = str(row.get("problem_id", row.get("id", lineno)))
            if kind == "pair":
                fields = {k: row.get(k) for k in PreferencePair.__dataclass_fields__}
                fields.update(
                    problem_id=pid,
                    prompt=prompt,
                    chosen_key=row.get("chosen_key") or f"{pid}#chosen",
                    rejected_key=row.get("rejected_key") or f"{pid}#rejected",
                )
                out.append(PreferencePair(**fields))
            else:
                out.append(SftExample(problem_id=pid, prompt=prompt, response=row["response"], score=row.get("score")))
    if not out:
        raise ExampleFileError(f"{path}: the file holds no examples")
    return out


def _check_examples(examples: Examples) -> type:
    kinds = {type(e) for e in examples}
    if not kinds <= {PreferencePair, SftExample} or len(kinds) > 1:
        names = sorted(k.__name__ for k in kinds)
        raise TypeError(f"examples must be all PreferencePair or all SftExample, got {names}")
    return kinds.pop() if kinds else type(None)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class EvalSet:
    """Items for ``test_dataloader``: a name, the items, chunk size and how a chunk becomes a batch."""

    name: str
    items: Sequence[Any]
    batch_size: int
    collate: Callable[[list], Any]


class MathDataModule(L.LightningDataModule):
    """Training data for one run or one self-training iteration: DPO pairs or SFT examples.

    Args:
        train_file: JSONL of preference pairs or SFT examples (see ``load_examples``).
            Exclusive with ``problems_file``.
        problems_file: problems JSONL with a ``solution`` per problem (the ``load_problems``
            format); trains SFT on (question, solution) for step-wise initialisation.
        problem_fields: which row fields of ``problems_file`` hold the question, answer, id
            and solution (e.g. ``solution_key: steps``); see ``problems.FieldMap``.
        val_file: optional JSONL of the same kind as the training data, for ``validate``
            and the validation loop.
        template: prompt template name (``hs_star_pl.core.templates``) used to render questions;
            ``chat`` renders them with the policy tokenizer's chat template.
        system_prompt: the system message of ``chat`` prompts; unset is
            ``core.templates.DEFAULT_CHAT_SYSTEM_PROMPT``, ``""`` sends none. Only with
            ``template: chat``.
        max_length: longest sequence in tokens; longer responses are cut from the right and
            counted, prompts that do not fit are dropped and counted.
        batch_size: examples (pairs, for DPO) per device per step.
        global_batch_size: examples per optimizer step over all devices. When set, it
            must be a multiple of ``batch_size * world_size``, and the trainer's gradient
            accumulation must be ``accumulate_grad_batches(world_size)`` (``hs-star`` sets it;
            a trainer built by hand passes it); leave unset to use the trainer's.
        padding_side: ``right`` or ``left`` padding of training batches.
        shuffle: shuffle training examples, seeded by ``seed`` and the epoch.
        seed: shuffling seed.
        num_workers: DataLoader worker processes.
        ref_batch_size: pairs per forward pass when computing reference log-probs.
    """

    def __init__(
        self,
        train_file: str | None = None,
        problems_file: str | None = None,
        problem_fields: FieldMap = FieldMap(),
        val_file: str | None = None,
        template: str = "qwen25-step-cot",
        system_prompt: str | None = None,
        max_length: int = 1024,
        batch_size: int = 8,
        global_batch_size: int | None = None,
        padding_side: PaddingSide = "right",
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        ref_batch_size: int = 16,
    ) -> None:
        super().__init__()
        try:
            chat = get_template(template).chat
        except ValueError as err:
            raise ValueError(f"data.template: {err}") from None
        if system_prompt is not None and not chat:
            raise ValueError(f"data.system_prompt is used only with data.template: chat, but data.template is {template!r}")
        if train_file is not None and problems_file is not None:
            raise ValueError("data.train_file and data.problems_file are exclusive; set one")
        if max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if global_batch_size is not None and global_batch_size % batch_size:
            raise ValueError(
                f"data.global_batch_size ({global_batch_size}) must be a multiple of data.batch_size ({batch_size})"
            )
        if padding_side not in ("right", "left"):
            raise ValueError(f"data.padding_side must be 'right' or 'left', got {padding_side!r}")
        self.train_file = train_file
        self.problems_file = problems_file
        self.problem_fields = problem_fields
        self.val_file = val_file
        self.template = template
        self.system_prompt = system_prompt
        self._chat: ChatRenderer | None = None  # the tokenizer's chat template, set in setup (chat templates)
        self.max_length = max_length
        self.batch_size = batch_size
        self.global_batch_size = global_batch_size
        self.padding_side = padding_side
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.ref_batch_size = ref_batch_size
        self.tokenizer = None
        self.train_examples: tuple = ()
        self.val_examples: tuple = ()
        self.last_stats: dict[str, int] = {}  # the counts of the last encoded split (logged as data/*)
        self._ref_cache_key: str | None = None
        self._val_reference_from_model = False  # ``validate`` scored the val pairs with model.*
        self._example_source: Callable[[int], Examples] | None = None
        self._source_examples: Examples | None = None
        self.eval_sets: tuple[EvalSet, ...] = ()

    # -- example sources -----------------------------------------------------------------

    def set_train_examples(self, examples: Examples) -> None:
        """Replace the training examples; the next ``train_dataloader`` call uses them.

        Pairs without ``ref_chosen_logp``/``ref_rejected_logp`` get them when the dataloader is
        built (not cached: the caller owns the round's artifacts). An empty sequence is
        allowed but Lightning ends training on an epoch with zero batches.
        """
        _check_examples(examples)
        if not examples:
            rank_zero_warn("set_train_examples got no examples: an epoch with zero batches ends training")
        self.train_examples = tuple(examples)
        self._ref_cache_key = None

    def set_example_source(self, source: Callable[[int], Examples] | None) -> None:
        """Ask ``source(epoch)`` for the training examples whenever the train dataloader is built.

        This is how the self-training callback serves each iteration's round: Lightning builds
        the dataloader before ``on_train_epoch_start`` (and possibly from
        ``configure_optimizers``), so the data are pulled at that moment rather than pushed at
        a hook. A source returning the same object again keeps the encoded examples.
        """
        self._example_source = source
        self._source_examples = None

    def load_train_examples(self) -> list:
        """Read the configured ``train_file`` or ``problems_file`` (empty when neither is set)."""
        if self.train_file is not None:
            return load_examples(self.train_file, self.render_prompt)
        if self.problems_file is not None:
            try:
                problems = load_problems(self.problems_file, **dataclasses.asdict(self.problem_fields))
            except ProblemFileError as err:
                raise err.naming("data.problem_fields") from None
            missing = [p.id for p in problems if not p.solution]
            if missing:
                field = self.problem_fields.solution_key or "solution"
                raise ValueError(
                    f"data.problems_file={self.problems_file}: {len(missing)} problems have no {field!r} field "
                    f"(first: {missing[0]!r}); step-wise initialisation needs one per problem "
                    "(data.problem_fields.solution_key names another field)"
                )
            return [SftExample(p.id, self.render_prompt(p.question), p.solution) for p in problems]
        return []

    def render_prompt(self, question: str) -> str:
        """``question`` as the prompt the policy sees, for training, sampling and evaluation alike.

        Raises:
            RuntimeError: a chat template before ``setup`` has taken the policy's tokenizer.
        """
        if get_template(self.template).chat and self._chat is None:
            raise RuntimeError("data.template: chat needs the policy's tokenizer: render prompts after MathDataModule.setup")
        return render_prompt(self.template, question, chat=self._chat, system_prompt=self.system_prompt)

    @property
    def objective(self) -> str | None:
        """``"dpo"`` for pairs, ``"sft"`` for SFT examples, ``None`` with no examples."""
        kind = _check_examples(self.train_examples)
        return {PreferencePair: "dpo", SftExample: "sft"}.get(kind)

    # -- Lightning hooks -----------------------------------------------------------------

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        policy = module if isinstance(module, Policy) else None
        if self.tokenizer is None:
            if policy is None:
                raise RuntimeError("MathDataModule needs the policy's tokenizer: use it with HSStarModule (the model.* "
                                   "group)")
            self.tokenizer = policy.tokenizer
        if get_template(self.template).chat and self._chat is None:
            # no chat template, one that fails or one that drops the question fails here (naming
            # data.template and the tokenizer's folder), before any work
            self._chat = checked_chat_renderer(self.tokenizer, self.template, self.system_prompt)
        if stage == "fit":
            if not self.train_examples:
                self.train_examples = tuple(self.load_train_examples())
                if self.train_file is not None and self.objective == "dpo":
                    self._ref_cache_key = self._file_cache_key(self.train_file, policy)
            if trainer is not None and self.global_batch_size is not None:
                wanted = self.accumulate_grad_batches(trainer.world_size)
                if trainer.accumulate_grad_batches != wanted:
                    raise ValueError(
                        f"data.global_batch_size ({self.global_batch_size}) needs gradient accumulation {wanted} "
                        f"(data.batch_size {self.batch_size} x devices {trainer.world_size}), but the trainer "
                        f"accumulates {trainer.accumulate_grad_batches}: build it with accumulate_grad_batches={wanted}"
                    )
            if policy is not None and self.objective is not None and policy.objective != self.objective:
                raise ValueError(
                    f"model.objective is {policy.objective!r} but the training data are "
                    f"{'preference pairs' if self.objective == 'dpo' else 'SFT examples'}: "
                    f"set model.objective: {self.objective}"
                )
        if self.val_file is not None and not self.val_examples:
            self.val_examples = tuple(load_examples(self.val_file, self.render_prompt))
        if stage == "validate":
            self._reference_val_pairs_before_restore()

    def accumulate_grad_batches(self, world_size: int, configured: int = 1) -> int:
        """The gradient accumulation that makes ``global_batch_size`` examples per optimizer step.

        ``configured`` is the trainer's own setting: without ``global_batch_size`` it is kept,
        with one it must be 1 (unset) or agree.

        Raises:
            ValueError: ``global_batch_size`` is not a multiple of ``batch_size x world_size``,
                or ``configured`` contradicts it (naming the keys).
        """
        if self.global_batch_size is None:
            return configured
        per_step = self.batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"data.global_batch_size ({self.global_batch_size}) must be a multiple of data.batch_size "
                f"({self.batch_size}) x devices ({world_size})"
            )
        accumulate = self.global_batch_size // per_step
        if configured not in (1, accumulate):
            raise ValueError(
                f"trainer.accumulate_grad_batches ({configured}) contradicts data.global_batch_size "
                f"({self.global_batch_size}) / (data.batch_size x devices = {per_step}) = {accumulate}; "
                f"set only one of them"
            )
        return accumulate

    def train_dataloader(self) -> DataLoader:
        if self._example_source is not None:
            epoch = self.trainer.current_epoch if self.trainer is not None else 0
            examples = self._example_source(epoch)
            if not examples:
                # An iteration without examples (the source warned why). Zero batches would end
                # training, so one placeholder batch keeps the epoch; HSStarModule skips it.
                self._report({"n_examples": 0, "n_truncated": 0, "n_dropped": 0})
                self._source_examples = examples
                return DataLoader([None], batch_size=1, collate_fn=lambda items: empty_iteration_batch())
            if examples is not self._source_examples:
                self.set_train_examples(examples)
                self._source_examples = examples
        # Validation pairs need the same reference as training (the policy at the start of
        # the iteration), but Lightning builds the val dataloader only after some training;
        # so their missing reference log-probs are filled now, too.
        if self.val_examples and isinstance(self.val_examples[0], PreferencePair):
            self._encode(self.val_examples, "val")
        items = self._encode(self.train_examples, "train")
        # The epoch's order is drawn here, once, not by a RandomSampler when Lightning iterates:
        # a run resumed from a checkpoint creates the iterator a different number of times, so a
        # shared generator shuffled differently and the resumed run did not reproduce the
        # uninterrupted one. Under DDP, Lightning splits this fixed order across the ranks.
        epoch = self.trainer.current_epoch if self.trainer else 0
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(items), generator=generator).tolist() if self.shuffle else list(range(len(items)))
        return DataLoader(
            items,
            batch_size=self.batch_size,
            sampler=order,
            num_workers=self.num_workers,
            collate_fn=self.collate,
        )

    def set_eval_sets(self, sets: Sequence[EvalSet]) -> None:
        """The problem sets ``test_dataloader`` serves, one dataloader each, in order.

        ``hs-star test`` gets them from the ``evaluation`` group (``EvaluationCallback``
        hands them over in its ``setup``, before Lightning asks for the dataloaders).
        """
        self.eval_sets = tuple(sets)

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per test set, chunks of ``set.batch_size`` items in file order.

        Over several processes rank ``r`` gets items ``r, r + world, ...`` with no padding:
        Lightning's default sampler for testing would repeat items to even out the ranks
        and count them twice.
        """
        if not self.eval_sets:
            raise RuntimeError(
                "nothing to test: `hs-star test` evaluates the benchmarks of the evaluation group; "
                "set evaluation.benchmarks (see configs/eval/) or evaluation.problems_file"
            )
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        loaders = []
        for eval_set in self.eval_sets:
            items = list(eval_set.items)
            sampler = None
            if world > 1:
                from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

                sampler = UnrepeatedDistributedSampler(items, num_replicas=world, rank=rank, shuffle=False)
            loaders.append(DataLoader(items, batch_size=eval_set.batch_size, shuffle=False, sampler=sampler,
                                      num_workers=0, collate_fn=eval_set.collate))
        return loaders

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Evaluation batches (hs-star test) are text; Lightning's collection walk would also
        # refuse their frozen dataclasses. Here, not in the module: the data module makes them,
        # and Lightning warns when the module overrides this hook while a data module is given.
        if isinstance(batch, EvalBatch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_examples:
            # no data.val_file: no validation, on purpose; Lightning warns about the empty list
            warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
            return []
        trainer = self.trainer
        if self._val_reference_from_model and trainer is not None and trainer.ckpt_path is None:
            rank_zero_warn(
                "validate: the val pairs have no reference log-probs and no --ckpt_path was given, so the "
                "policy is its own reference and val/loss is log 2 by construction. Pass --ckpt_path (the "
                "checkpoint is scored against the model that model.* names) or put "
                "ref_chosen_logp/ref_rejected_logp in data.val_file"
            )
        items = self._encode(self.val_examples, "val")
        return DataLoader(items, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, collate_fn=self.collate)

    # -- encoding ------------------------------------------------------------------------

    def _encode(self, examples: tuple, split: str) -> list:
        if self.tokenizer is None:
            raise RuntimeError("MathDataModule.setup has not run: no tokenizer")
        encoded: list = []
        kept: list = []
        n_truncated = n_dropped = 0
        for ex in examples:
            if isinstance(ex, PreferencePair):
                pair = encode_pair(self.tokenizer, ex, self.max_length)
                if pair is None:
                    n_dropped += 1
                    continue
                n_truncated += int(pair[0].truncated) + int(pair[1].truncated)
                encoded.append(pair)
            else:
                s = encode_example(self.tokenizer, ex.prompt, ex.response, self.max_length)
                if s is None:
                    n_dropped += 1
                    continue
                n_truncated += int(s.truncated)
                encoded.append(s)
            kept.append(ex)
        stats = {"n_examples": len(kept), "n_truncated": n_truncated, "n_dropped": n_dropped}
        if split == "train":
            self._report(stats)
        else:
            self.last_stats = stats
        if n_truncated or n_dropped:
            rank_zero_warn(
                f"{split}: {n_truncated} responses cut to data.max_length={self.max_length}, "
                f"{n_dropped} examples dropped (prompt longer than data.max_length)"
            )
        kind = "pairs" if kept and isinstance(kept[0], PreferencePair) else "SFT examples"
        rank_zero_info(f"{split}: {len(kept)} {kind}")
        if kept and isinstance(kept[0], PreferencePair):
            kept = self._with_reference_logps(kept, split)
            return [(c, r, (p.ref_chosen_logp, p.ref_rejected_logp)) for (c, r), p in zip(encoded, kept, strict=True)]
        return encoded

    def _report(self, stats: dict[str, int]) -> None:
        """Keep the training split's counts and log them as ``data/*`` (rank 0, at the current step)."""
        self.last_stats = stats
        if self.trainer is not None:
            log_to_loggers(self.trainer, {f"data/{k}": float(v) for k, v in stats.items()})

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if isinstance(items[0], EncodedSequence):
            return collate_sequences(items, pad_id, self.padding_side)
        return collate_pairs([(c, r) for c, r, _ in items], pad_id, self.padding_side, [ref for _, _, ref in items])

    # -- reference log-probs -------------------------------------------------------------

    def _file_cache_key(self, path: str, policy: Policy | None) -> str:
        tag = policy.model_source_tag() if policy is not None else ""
        text = f"{file_sha256(path)}|{self.template}|{self.max_length}|{tag}"
        if self.system_prompt is not None:  # chat prompts only; other keys stay as they were
            text += f"|{self.system_prompt}"
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def _cache_path(self) -> Path | None:
        if self._ref_cache_key is None or self.trainer is None:
            return None
        return Path(self.trainer.default_root_dir) / "reference_logps" / f"{self._ref_cache_key}.jsonl"

    def _reference_val_pairs_before_restore(self) -> None:
        """``hs-star validate --ckpt_path``: score the val pairs' reference with the configured model.

        ``setup`` runs while the module still holds the weights that ``model.model_path``/
        ``model.tiny`` name, before a checkpoint's replace them. The reference of a DPO
        validation is then the configured model and the policy is the checkpoint; computed
        after the restore, they would be the same model and ``val/loss`` would be log 2 whatever
        was trained. The module is moved to the strategy's device first (Lightning moves it
        only after restoring). Pairs that already carry reference log-probs (from
        ``data.val_file``) are left alone.

        Under strategies that load checkpoint weights only after setting up (DeepSpeed), a
        warning says that a checkpoint will be scored against itself.
        """
        trainer = self.trainer
        pairs = [p for p in self.val_examples if isinstance(p, PreferencePair)]
        if trainer is None or not pairs or not missing_reference(pairs):
            return
        if trainer.strategy.restore_checkpoint_after_setup:
            rank_zero_warn(
                "validate: this strategy loads a checkpoint's weights before the val pairs' reference "
                "log-probs can be computed, so a checkpoint is scored against itself (val/loss = log 2); "
                "put ref_chosen_logp/ref_rejected_logp in data.val_file to validate a DPO checkpoint here"
            )
            return
        trainer.lightning_module.to(trainer.strategy.root_device)
        self._with_reference_logps(pairs, "val")
        self._val_reference_from_model = True

    def _with_reference_logps(self, pairs: list[PreferencePair], split: str) -> list[PreferencePair]:
        if not missing_reference(pairs):
            return pairs
        trainer = self.trainer
        if trainer is None or trainer.lightning_module is None:
            raise RuntimeError("pairs have no reference log-probs and no HSStarModule is attached to compute them")
        pairs = with_reference_logps(trainer, pairs, max_length=self.max_length, batch_size=self.ref_batch_size,
                                     cache=self._cache_path() if split == "train" else None)
        self._store(pairs, split)
        return pairs

    def _store(self, pairs: list[PreferencePair], split: str) -> None:
        # Keep the filled-in values so later epochs on the same examples do not recompute
        # (with a policy that is no longer the iteration's starting point). Dropped examples
        # never reach here, so the stored tuple is the kept examples only.
        if split == "train":
            self.train_examples = tuple(pairs)
        else:
            self.val_examples = tuple(pairs)
