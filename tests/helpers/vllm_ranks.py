"""One rank of a two-process ``VLLMEngine`` run on CPU (gloo), with the GPU stand-in for ``vllm.LLM``.

    python tests/helpers/vllm_ranks.py SCENARIO RANK WORLD_SIZE PORT OUT_DIR

Started by ``tests/test_vllm_gpu_paths.py`` with no ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` or
``MASTER_*`` in the environment: the process group is joined by address, as under SLURM (or
Lightning's DDP launcher, which sets no ``RANK``). Writes ``OUT_DIR/rank<k>.json``.

- ``placement``: start the engine as configs/engine/vllm.yaml does (no executor set) and
  record what the stand-in ``LLM`` saw; then try ``distributed_executor_backend: mp``.
- ``canary``: the engines start on an older model and the trainer syncs its own; rank 1's
  engine silently drops the sync. Then the ranks meet in the next collective.

Every rank holds its connections open until all ranks have written their result (or 60 s
pass), as NCCL ranks effectively do: gloo would otherwise notice a failed peer's exit at once,
and a rank waiting in a collective would not show here as the hang it is on GPUs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path


def main(scenario: str, rank: int, world_size: int, port: int, out: Path) -> int:
    import torch
    import torch.distributed as dist

    from hs_star_pl.engines import VLLMEngine
    from hs_star_pl.tensors.tiny import build_byte_tokenizer, build_tiny_causal_lm, save_checkpoint_dir
    from tests.helpers import stand_in_vllm
    from tests.helpers.stand_in_vllm import StandInLLM

    torch.set_num_threads(1)
    tokenizer = build_byte_tokenizer()
    tiny = dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=2)
    policy = build_tiny_causal_lm(tokenizer, seed=0, **tiny)
    # the engine's folder: an older model in the canary scenario (saved before the process
    # group exists: transformers saves on rank 0 only once it does)
    served = build_tiny_causal_lm(tokenizer, seed=1, **tiny) if scenario == "canary" else policy
    folder = save_checkpoint_dir(out / f"served{rank}", served, tokenizer)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=300))
    stand_in_vllm.install()
    result: dict = {"rank": rank}
    status = 0
    try:
        if scenario == "placement":
            from hs_star_pl.core.protocols import GenerationRequest, SamplingParams

            with VLLMEngine(model_path=str(folder), dtype="bfloat16", progress=False) as engine:
                engine.start()
                llm = engine.llm
                result.update(kwargs={k: v for k, v in llm.kwargs.items() if isinstance(v, (str, int, float, bool))},
                              env=llm.env, device=llm.device,
                              env_after={key: os.environ.get(key) for key in stand_in_vllm.ENV_KEYS})
                out_q = engine.generate([GenerationRequest("q", "1+1=", 2)], SamplingParams(max_new_tokens=3))
                result["samples"] = len(out_q["q"])
            try:
                VLLMEngine(model_path=str(folder), distributed_executor_backend="mp").start()
            except ValueError as err:
                result["refused"] = str(err)
        elif scenario == "canary":
            StandInLLM.drop_syncs_default = rank == 1
            engine = VLLMEngine(model_path=str(folder), dtype="bfloat16", canary_samples=2, canary_max_tokens=4,
                                progress=False)
            engine.sync_weights(policy)
            dist.barrier()  # the next collective: the training step's first all-reduce
            result["synced"] = True
        else:
            raise ValueError(f"unknown scenario {scenario!r}")
    except Exception as err:  # recorded for the test, then the rank fails
        result["error"] = f"{type(err).__name__}: {err}"
        status = 1
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all((out / f"rank{r}.json").exists() for r in range(world_size)):
        time.sleep(0.2)
    if status:
        print(result["error"], file=sys.stderr)
        os._exit(status)  # no process-group teardown: a failed rank leaves as it is
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    scenario, rank, world, port, out = sys.argv[1:6]
    sys.exit(main(scenario, int(rank), int(world), int(port), Path(out)))
