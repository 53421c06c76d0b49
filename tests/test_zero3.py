"""DeepSpeed ZeRO-3 on 2 CPU processes (gloo): the code that touches the whole policy.

``tests/helpers/zero3_worker.py`` runs under ``torchrun``: it partitions the tiny policy with
ZeRO-3 and, with uneven work per rank, gathers the state dict, streams it as the engine weight
sync does, computes reference log-probs and samples with ``HFEngine``; every result must equal
the unpartitioned model's. The whole self-training loop under ZeRO-2/3 (training, export,
checkpoint and resume) is in ``tests/test_self_training.py``.
Run: ``PYTHONPATH=$PWD python -m pytest tests/test_zero3.py -q``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers.self_training import env
from tests.helpers.tiny_setup import REPO
from tests.helpers.tolerances import sequence_logp_tolerance
from tests.helpers.trainers import cpu_trainer

pytest.importorskip("deepspeed", reason="deepspeed is not installed (extra [deepspeed])")
pytestmark = pytest.mark.deepspeed


def run_worker(out, device_type: str) -> tuple[dict, dict]:
    worker = REPO / "tests" / "helpers" / "zero3_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), str(out), device_type]
    # A collective that one rank skips hangs both: the timeout makes that a failure.
    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return tuple(json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))


def test_zero3_paths_that_touch_the_whole_model(tmp_path):
    r0, r1 = run_worker(tmp_path, "cpu")
    for r in (r0, r1):
        assert r["partitioned"] and r["local_numel"] == 0 < r["full_numel"]  # really ZeRO-3
        assert r["max_gathered_between_entries"] == 0  # one parameter at a time, released at once
        assert r["state_dict_names_match"]
        # the weight sync's chunks reach every rank, whole, tied lm_head sent once
        assert r["sync_keys_match"] and r["sync_chunks"] > 1 and r["sync_max_abs_diff"] == 0.0
        # ... holding one chunk, one tensor and the tied one at a time, not a copy of the model
        memory = r["sync_host_memory"]
        assert memory["live_after"] == 0 and memory["tied"] > 0
        assert memory["peak"] <= memory["chunk"] + memory["largest"] + memory["tied"] < memory["total"], memory
    # gathered export weights: rank 0 holds the exact unpartitioned values, rank 1 nothing
    assert r0["gathered_keys_match"] and r0["gathered_max_abs_diff"] == 0.0
    assert r1["gathered_is_empty"]
    # reference log-probs: rank 0 scored 5 pairs while rank 1 had none (padding passes)
    assert len(r0["ref"]) == 5 and r1["ref"] == []
    # equal to the rounding of a 64-token log-prob over the 257-id vocabulary
    for ours, plain in zip(r0["ref"], r0["plain_ref"]):
        for a, b in zip(ours, plain):
            assert abs(a - b) <= sequence_logp_tolerance(64, 257, b), (ours, plain)
    assert r0["routes_plain_zero3_zero3_grad"] == r1["routes_plain_zero3_zero3_grad"] == ["head", "gathered head", "logits"]
    assert r0["zero3_reference_full_logits"] == r1["zero3_reference_full_logits"] == 0  # only the decoder, then the head
    # HFEngine: rank 0 sampled 8 sequences in 4 batches, rank 1 ran dummy batches alongside
    assert r0["samples"] == r0["plain_samples"] and sum(map(len, r0["samples"].values())) == 8
    assert r1["samples"] == {}


def test_batches_keep_fp32_reference_logps_under_deepspeed_bf16(tmp_path):
    """Lightning's DeepSpeed precision casts every float in a batch to bf16 (-150.3 -> -150.0),
    which would swamp DPO's policy/reference gap; ours passes batches through."""
    from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy

    from hs_star_pl.training.strategies import BatchKeepingDeepSpeedPrecision, DeepSpeedStrategy

    batch = {"input_ids": torch.tensor([[1, 2]]), "ref_chosen_logps": torch.tensor([-150.3])}
    theirs = cpu_trainer(tmp_path, strategy=LightningDeepSpeedStrategy(stage=2), precision="bf16-mixed")
    theirs = theirs.precision_plugin.convert_input(batch)
    assert theirs["ref_chosen_logps"].dtype == torch.bfloat16 and float(theirs["ref_chosen_logps"]) == -150.0
    trainer = cpu_trainer(tmp_path, strategy=DeepSpeedStrategy(stage=2), precision="bf16-mixed")
    assert isinstance(trainer.precision_plugin, BatchKeepingDeepSpeedPrecision)
    assert trainer.precision_plugin.precision == "bf16-mixed"
    ours = trainer.precision_plugin.convert_input(batch)
    assert ours["ref_chosen_logps"].dtype == torch.float32 and float(ours["ref_chosen_logps"]) == pytest.approx(-150.3)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_zero3_paths_on_two_gpus_over_nccl(tmp_path):
    """The same worker on 2 GPUs with NCCL: gathering, the sync stream, lockstep reference
    log-probs and sampling with partitioned parameters on CUDA."""
    r0, r1 = run_worker(tmp_path, "cuda")
    for r in (r0, r1):
        assert r["partitioned"] and r["max_gathered_between_entries"] == 0
        assert r["sync_keys_match"] and r["sync_max_abs_diff"] == 0.0
    assert r0["gathered_keys_match"] and r0["gathered_max_abs_diff"] == 0.0 and r1["gathered_is_empty"]
    torch.testing.assert_close(torch.tensor(r0["ref"]), torch.tensor(r0["plain_ref"]), rtol=0, atol=1e-3)
    assert r0["samples"] == r0["plain_samples"] and r1["samples"] == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stage", [2, 3])
def test_gpu_validation_script_runs_on_cuda(stage, tmp_path):
    """benchmarks/gpu_validation.py on the GPUs here, shortened: every phase reports and the
    reloaded export gives the sharded policy's logits."""
    script = REPO / "benchmarks" / "gpu_validation.py"
    devices = min(torch.cuda.device_count(), 2)
    cmd = [sys.executable, str(script), "--stage", str(stage), "--devices", str(devices), "--steps", "4",
           "--batch-size", "1", "--length", "256", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["phase"]: r for r in (json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines() if line.startswith("RESULT "))}
    assert {"train", "reference_logps", "export", "export_reload", "hf_generate"} <= set(results)
    assert results["export_reload"]["max_logit_gap_vs_policy"] < 0.1


@pytest.mark.parametrize("stage", [2, 3])
def test_optimizer_state_reset_reaches_deepspeeds_wrapped_optimizer(stage, tmp_path):
    """``self_training.reset_optimizer_state`` clears the torch AdamW that DeepSpeed's ZeRO
    optimizer wraps: after clearing at the second epoch's start, its step count is that epoch's
    3 steps, not 6, and training goes on (the state is rebuilt on the next step)."""
    import lightning as L

    from hs_star_pl.tensors.schedules import clear_optimizer_state
    from hs_star_pl.training.strategies import DeepSpeedStrategy

    class Linear(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(6, 4), batch_size=2)

    seen = {}

    class ResetAtSecondEpoch(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                seen["before"] = [int(s["step"]) for s in trainer.optimizers[0].optimizer.state.values()]
                clear_optimizer_state(trainer.optimizers[0])
                seen["cleared"] = len(trainer.optimizers[0].optimizer.state)

        def on_train_end(self, trainer, module):
            seen["after"] = [int(s["step"]) for s in trainer.optimizers[0].optimizer.state.values()]

    trainer = cpu_trainer(tmp_path, strategy=DeepSpeedStrategy(stage=stage), max_epochs=2, callbacks=[ResetAtSecondEpoch()])
    trainer.fit(Linear())
    assert type(trainer.optimizers[0].optimizer) is torch.optim.AdamW  # really wrapped by ZeRO
    assert seen == {"before": [3], "cleared": 0, "after": [3]}
