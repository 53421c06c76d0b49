"""Exporting the policy as a plain Hugging Face checkpoint (``save_pretrained``).

``<root>/hf/policy_NNN/`` holds M_NNN, the policy after NNN iterations (the name ``results.md``
and the evaluation use: ``M_NNN``, ``eval/<benchmark>/policy_NNN.json``), and ``config.json``, the weights and the tokenizer, loadable by
``AutoModelForCausalLM.from_pretrained`` and so by vLLM and the evaluation scripts. Under
DeepSpeed ZeRO-3 the parameters are gathered one at a time (``zero.full_state_dict``: every
rank takes part, rank 0 keeps a CPU copy) and rank 0 writes them; the folder is the same as
from an unsharded run.

A LoRA policy (``model.peft``) is exported merged: the folder is a plain HF model that loads
without peft (vLLM, ``hs-star test --model.model_path``, stepwise init), its weights
``base + delta`` computed layer by layer into new tensors (``lora.iter_policy_weights``) so
the training state is left bit for bit as it was. ``adapter=True`` also saves the adapter
alone in ``policy_NNN/adapter/`` (``adapter_model.safetensors``, ``adapter_config.json``;
load it with ``peft.PeftModel.from_pretrained`` on the base). It is a sub-folder, not files
beside ``config.json``: transformers would take an ``adapter_config.json`` at the top of the
folder as an adapter to load onto the base it names.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from hs_star_pl.infra import faults
from hs_star_pl.core.iterations import IterationClock
from hs_star_pl.infra.errors import ConfigError
from hs_star_pl.tensors.lora import ADAPTER_DIRNAME, has_lora, policy_state_dict
from hs_star_pl.infra.storage import storage_error
from hs_star_pl.tensors.zero import full_state_dict, is_zero3_partitioned


class _DropCpuFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Setting accelerator to CPU")


_CPU_FALLBACK = _DropCpuFallback()


def quiet_deepspeed_probe() -> None:
    """``save_pretrained`` imports DeepSpeed when it is installed (transformers' ``unwrap_model`` ->
    accelerate's ``extract_model_from_parallel``); on a machine without a GPU that import logs
    "Setting accelerator to CPU. If you have GPU ... we were unable to detect it". A run without
    DeepSpeed (not imported yet) has nothing to act on: that one line is dropped, DeepSpeed's
    other messages are kept. A DeepSpeed run imported it long before and keeps it."""
    if "deepspeed" not in sys.modules:
        logging.getLogger("DeepSpeed").addFilter(_CPU_FALLBACK)  # the same object: added once


def export_hf(module: L.LightningModule, directory: str | Path, *, adapter: bool = False) -> Path:
    """Save ``module.model`` and ``module.tokenizer`` to ``directory`` (rank 0 writes); LoRA merged.

    Written to a temporary sibling first and renamed, so a crash never leaves a half
    checkpoint under the final name; an existing export of the same name is replaced. All
    ranks wait for the write when a trainer is attached. Under ZeRO-3 every rank must call
    this (the parameters are gathered collectively); rank 0 holds the full weights on CPU.

    Args:
        module: holds ``model`` and ``tokenizer`` (and ``peft_model`` with LoRA).
        directory: the export folder.
        adapter: also save the LoRA adapter alone in ``<directory>/adapter/``.

    Returns:
        ``directory`` as a ``Path``.
    """
    directory = Path(directory)
    faults.begin("exporting", name=directory.name)
    trainer = module._trainer
    writes = trainer is None or trainer.is_global_zero
    lora = has_lora(module.model)
    # None: save_pretrained takes the model's own state dict (no partitioned parameters).
    if lora:
        state_dict = policy_state_dict(module.model) if writes else None
    else:
        state_dict = full_state_dict(module.model) if is_zero3_partitioned(module.model) else None
    if writes:
        tmp = directory.with_name(directory.name + ".tmp")
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            quiet_deepspeed_probe()
            module.model.save_pretrained(tmp, state_dict=state_dict)
            module.tokenizer.save_pretrained(tmp)
            if adapter and lora:
                module.peft_model.save_pretrained(tmp / ADAPTER_DIRNAME)
        except Exception as err:  # safetensors reports a full disk as its own error type
            shutil.rmtree(tmp, ignore_errors=True)
            if (failed := storage_error(err, tmp)) is not None:
                raise failed from err
            raise
        with faults.persisting("export", name=directory.name):
            if directory.exists():
                shutil.rmtree(directory)
            tmp.rename(directory)
        rank_zero_info(f"exported the policy to {directory}")
    if trainer is not None:
        trainer.strategy.barrier("export_hf")
    return directory


def policy_name(policy: int) -> str:
    """``policy_NNN``: the folder of M_policy's export (and its evaluation label)."""
    return f"policy_{policy:03d}"


_LEGACY = re.compile(r"^iteration_(\d{3,})$")  # before policy_NNN: iteration_NNN held M_{NNN+1}
_POLICY = re.compile(r"^policy_(\d{3,})$")


def find_export(hf_dir: str | Path, policy: int) -> Path | None:
    """The export of M_policy under ``hf_dir``: ``policy_NNN``, or in a run folder written before
    that name ``iteration_{policy-1:03d}``; ``None`` when neither is there."""
    for name in (policy_name(policy), f"iteration_{policy - 1:03d}" if policy >= 1 else None):
        if name is not None and (Path(hf_dir) / name).is_dir():
            return Path(hf_dir) / name
    return None


def latest_export(hf_dir: str | Path) -> Path | None:
    """The export of the latest policy under ``hf_dir`` (either name), or ``None``."""
    found = {}
    for path in Path(hf_dir).glob("*") if Path(hf_dir).is_dir() else []:
        m = _POLICY.match(path.name) or _LEGACY.match(path.name)
        if m and path.is_dir() and not path.name.endswith(".tmp"):
            found[int(m.group(1)) + (m.re is _LEGACY)] = path
    return found[max(found)] if found else None


class HFExportCallback(L.Callback):
    """Export the policy to ``<trainer.default_root_dir>/<dirname>/policy_NNN/`` after each iteration:
    the end of iteration t writes M_{t+1} to ``policy_{t+1:03d}``.

    Args:
        epochs_per_iteration: training epochs that make one self-training iteration; the
            export happens after the last epoch of each.
        dirname: sub-folder of the run directory.
        enabled: turn exporting off.
        adapter: with a LoRA policy (``model.peft``), also save the adapter alone in
            ``policy_NNN/adapter/``; the export itself is always the merged model.
    """

    def __init__(self, epochs_per_iteration: int = 1, dirname: str = "hf", enabled: bool = True,
                 adapter: bool = False) -> None:
        self.clock = IterationClock(epochs_per_iteration)
        self.dirname = dirname
        self.enabled = enabled
        self.adapter = adapter

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.enabled and self.adapter and getattr(pl_module, "peft_model", None) is None:
            raise ConfigError("export.adapter: true saves a LoRA adapter, but the policy has none (set model.peft)")

    def policy_dir(self, trainer: L.Trainer, policy: int) -> Path:
        """Where M_policy is exported (written at the end of iteration ``policy - 1``)."""
        return Path(trainer.default_root_dir) / self.dirname / policy_name(policy)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        if self.clock.ends_iteration(trainer.current_epoch):
            export_hf(pl_module, self.policy_dir(trainer, self.clock.iteration_of(trainer.current_epoch) + 1),
                      adapter=self.adapter)
