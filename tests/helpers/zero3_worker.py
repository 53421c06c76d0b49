"""One rank of a 2-process DeepSpeed ZeRO-3 run on CPU (gloo), started by ``torchrun``.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/helpers/zero3_worker.py OUT_DIR [cuda]

Builds the tiny policy, records what the *unpartitioned* model gives (reference log-probs,
HF samples, state dict), partitions it with ``deepspeed.initialize`` (ZeRO-3), then runs
each code path that touches the whole model with deliberately uneven work per rank (rank 1
has nothing to do) and writes ``OUT_DIR/rank<k>.json`` for ``tests/test_zero3.py`` to check.
A path that loses lockstep hangs; the test's timeout turns that into a failure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: Path, device_type: str) -> None:
    import os

    import torch

    if device_type == "cpu":
        from hs_star_pl.training.strategies import use_deepspeed_cpu_accelerator

        use_deepspeed_cpu_accelerator()
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from safetensors.torch import load

    from hs_star_pl.core.protocols import GenerationRequest, SamplingParams
    from hs_star_pl.core.records import PreferencePair
    from hs_star_pl.engines import HFEngine
    from hs_star_pl.engines.vllm import _chunks, _dedupe_shared
    from hs_star_pl.tensors.zero import full_state_dict, is_zero3_partitioned, iter_full_state_dict
    from tests.helpers.host_memory import LiveBytes
    from tests.helpers.tiny_setup import tiny_module

    deepspeed.init_distributed(dist_backend="gloo" if device_type == "cpu" else "nccl")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    module = tiny_module()  # same seed on every rank: the same weights
    if device_type == "cuda":
        module.to(torch.device("cuda", torch.cuda.current_device()))
    module.model.eval()
    pairs = [PreferencePair(f"p{i}", f"{i} + {i} =", f" {2 * i}", f" {2 * i + 1}" * (i + 1), f"c{i}", f"r{i}") for i in range(5)]
    requests = [GenerationRequest("a", "12+7=", 3), GenerationRequest("b", "a longer prompt: 5*6=", 5)]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=3)
    plain_state = {k: v.clone() for k, v in module.model.state_dict().items()}
    plain_unique = [name for name, _ in _dedupe_shared(module.model.state_dict().items())]  # tied lm_head dropped
    plain_ref = module.compute_reference_logps(pairs, max_length=64, batch_size=2)
    plain_route = module.logp_route()
    engine = HFEngine(batch_size=2, progress=False, seed_scope="request").bind(module.model, module.tokenizer)
    plain_samples = engine.generate(requests, params)

    deepspeed.initialize(
        model=module,
        model_parameters=[p for p in module.parameters() if p.requires_grad],
        optimizer=torch.optim.AdamW(module.parameters(), lr=1e-3),
        config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                "zero_allow_untested_optimizer": True},
    )
    result: dict = {"rank": rank, "partitioned": is_zero3_partitioned(module.model)}
    result["local_numel"] = sum(p.numel() for p in module.model.parameters())
    result["full_numel"] = sum(p.ds_numel for p in module.model.parameters())

    # 1. gathered one parameter at a time: nothing stays gathered between entries
    still_gathered = 0
    names = []
    for name, _ in iter_full_state_dict(module.model):
        names.append(name)
        still_gathered = max(still_gathered, sum(p.ds_status == ZeroParamStatus.AVAILABLE for p in module.model.parameters()))
    result["max_gathered_between_entries"] = still_gathered
    result["state_dict_names_match"] = names == list(plain_state)
    gathered = full_state_dict(module.model)
    if rank == 0:
        result["gathered_max_abs_diff"] = max(float((gathered[k] - plain_state[k]).abs().max()) for k in plain_state)
        result["gathered_keys_match"] = sorted(gathered) == sorted(plain_state)
    else:
        result["gathered_is_empty"] = gathered == {}

    # 2. the engine weight sync's sender: chunks of the streamed state dict, every rank
    received: dict = {}
    n_chunks = 0
    for payload, _ in _chunks(_dedupe_shared(iter_full_state_dict(module.model)), max_bytes=4096):
        received.update(load(payload))
        n_chunks += 1
    result["sync_chunks"] = n_chunks
    result["sync_keys_match"] = sorted(received) == sorted(plain_unique) and len(plain_unique) < len(plain_state)
    result["sync_max_abs_diff"] = max(float((received[k] - plain_state[k]).abs().max()) for k in received)

    # 2b. the host memory the sender holds: live bytes of the gathered CPU copies (LiveBytes),
    # against one chunk, the largest tensor and the tied ones (kept until their last name)
    live = LiveBytes()
    for payload, _ in _chunks(_dedupe_shared(live.watch(iter_full_state_dict(module.model))), max_bytes=4096):
        del payload
    size = {name: t.numel() * t.element_size() for name, t in plain_state.items()}
    result["sync_host_memory"] = {
        "peak": live.peak, "live_after": live.live, "chunk": 4096, "largest": max(size.values()),
        "tied": sum(n for name, n in size.items() if name not in plain_unique),  # the second names' tensors
        "total": sum(size[name] for name in plain_unique),
    }

    # 3. reference log-probs: rank 0 scores all pairs, rank 1 none (padding passes keep step)
    mine = pairs if rank == 0 else []
    full_logits = []  # forward passes of the whole model (logits of every position)
    hook = module.model.register_forward_pre_hook(lambda *_: full_logits.append(1))
    zero3_ref = module.compute_reference_logps(mine, max_length=64, batch_size=2)
    hook.remove()
    result["zero3_reference_full_logits"] = len(full_logits)
    result["ref"] = [(p.ref_chosen_logp, p.ref_rejected_logp) for p in zero3_ref]
    result["plain_ref"] = [(p.ref_chosen_logp, p.ref_rejected_logp) for p in plain_ref] if rank == 0 else []
    # the plain pass above chose the LM head per chunk; partitioned, the head is gathered once per
    # pass without grad, and with grad the model's own logits are used (a head gathered per chunk
    # would gather a data-dependent number of times per rank)
    with torch.no_grad():
        no_grad_route = module.logp_route()
    result["routes_plain_zero3_zero3_grad"] = [plain_route, no_grad_route, module.logp_route()]

    # 4. HFEngine sampling: rank 0 has two requests in several batches, rank 1 none
    engine.bind(module.model, module.tokenizer)
    samples = engine.generate(requests if rank == 0 else [], params)
    result["samples"] = {k: [c.text for c in v] for k, v in samples.items()}
    result["plain_samples"] = {k: [c.text for c in v] for k, v in plain_samples.items()} if rank == 0 else {}

    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cpu")
