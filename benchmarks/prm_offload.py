"""What a learned PRM's ``offload`` costs per round: its weights off the device and back.

Run: ``python benchmarks/prm_offload.py [--quick] [--sizes tiny,0.36b] [--rollouts 32] [--repeats 3]``.

``prm.init_args.offload`` decides where a ``SkyworkPRM``/``QwenMathPRM`` waits between rounds:
``none`` (on its device), ``cpu`` (host memory) or ``reload`` (dropped, read again from its
folder). For each size, a random PRM in the Skywork layout is saved as safetensors in a
temporary folder (no downloads), and the script times, alternately:

* *a round's scoring*: ``--rollouts`` synthetic responses of 2-8 steps, batched;
* *sleep* then *wake* for each mode: what the loop pays after a round and before the next
  round's first score; for ``reload`` once with the weight files in the page cache (a
  re-read from memory) and once evicted from it first (``posix_fadvise(DONTNEED)``: a read
  from disk, as on a node whose page cache the training run has filled);
* *load*: building the PRM from its folder as ``load_prm_model`` does (without random
  initialisation), against building it with the random initialisation it used to run
  before reading the weights (the before-row).

On a CPU-only machine ``cpu`` moves nothing (the PRM is already in host memory), so its
rows are zero; ``--device cuda`` runs the PRMs on a GPU, where ``cpu`` copies the weights to
host memory and back, and the table adds the GPU memory each sleep gives back
(docs/gpu-validation.md). Not a test: the numbers depend on the machine and disk.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench_common import common_parser, emit, interleaved, median, setup_torch, timed
from prm_throughput import make_items

SIZES = {  # Qwen2 bodies with the byte tokenizer's vocabulary
    "tiny": dict(hidden_size=128, num_hidden_layers=4),
    "0.36b": dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                  num_key_value_heads=2),  # Qwen2.5-0.5B's body
    "quick": dict(hidden_size=64, num_hidden_layers=2),
}


def evict(folder: Path) -> None:
    """Drop ``folder``'s weight files from the page cache, so the next read comes from disk."""
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_with_random_init(path: Path):
    """The PRM's model built as before: randomly initialised, then overwritten by the weights."""
    from transformers import AutoConfig

    from hs_star_pl.prm.hf import Qwen2ValueHeadModel, _read_state_dict

    model = Qwen2ValueHeadModel(AutoConfig.from_pretrained(str(path)))
    model.load_state_dict(_read_state_dict(path), strict=True)
    return model.eval()


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,0.36b", help=f"comma-separated, of {sorted(SIZES)} (default tiny,0.36b)")
    parser.add_argument("--rollouts", type=int, default=32, help="responses in a round's scoring (default 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="PRM batch size (default 8, the paper config's)")
    parser.add_argument("--repeats", type=int, help="timed rounds of every variant (default 3)")
    parser.add_argument("--device", default="cpu", help="where the PRMs score: cpu (default) or cuda[:N]")
    args = parser.parse_args()
    sizes = ["quick"] if args.quick else args.sizes.split(",")
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        parser.error(f"--sizes: unknown {unknown}; choose from {sorted(SIZES)}")
    repeats = args.repeats or (1 if args.quick else 3)
    n = 4 if args.quick else args.rollouts
    setup_torch(args.threads)
    from hs_star_pl.core.protocols import StepScoringRequest
    from hs_star_pl.prm import SkyworkPRM
    import torch

    from hs_star_pl.prm.hf import Qwen2ValueHeadModel, build_tiny_prm_dir, load_prm_model

    requests = [StepScoringRequest(q, tuple(steps)) for q, steps, _ in make_items(n)]
    cpu = torch.device("cpu")
    gpu = args.device.startswith("cuda")

    def gpu_bytes() -> int:
        return torch.cuda.memory_allocated() if gpu else 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            path = build_tiny_prm_dir(Path(tmp) / size, "skywork", **SIZES[size])
            megabytes = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
            prms = {mode: SkyworkPRM(str(path), device=args.device, dtype="float32", batch_size=args.batch_size,
                                     progress=False, input_mode="steps", offload=mode)
                    for mode in ("none", "cpu", "reload")}
            n_params = sum(p.numel() for p in prms["none"].model.parameters())
            label = f"{size} ({n_params / 1e6:,.2f}M params, {megabytes:,.0f} MB)"
            for prm in prms.values():
                prm.score(requests[:2])  # warm-up

            def cycle(mode: str, cold: bool = False):
                def run() -> tuple[float, float, float]:
                    prm = prms[mode]
                    held = gpu_bytes()
                    started = time.perf_counter()
                    prm.sleep()
                    if gpu:
                        torch.cuda.synchronize()
                    slept = time.perf_counter() - started
                    freed = held - gpu_bytes()
                    if cold:
                        evict(path)
                    before = prm.seconds_waking
                    prm.wake_up()
                    if gpu:
                        torch.cuda.synchronize()
                    return slept, prm.seconds_waking - before, freed
                return run

            runs = interleaved({
                "round": lambda: prms["none"].score(requests),
                "none": cycle("none"), "cpu": cycle("cpu"),
                "reload, page cache": cycle("reload"), "reload, from disk": cycle("reload", cold=True),
            }, repeats)
            del prms
            loads: dict[str, list[float]] = {"load": [], "load, random init (before)": []}
            for _ in range(repeats):  # each model freed outside the timing, as a wake frees nothing
                for what, load in (("load", lambda: load_prm_model(Qwen2ValueHeadModel, path, cpu, torch.float32)),
                                   ("load, random init (before)", lambda: load_with_random_init(path))):
                    seconds, model = timed(load)
                    loads[what].append(seconds)
                    del model
            round_s = median([t for t, _ in runs["round"]])
            rows.append((label, f"a round's scoring ({n} responses)", "", "", round_s, "", "", 1.0))
            for mode in ("none", "cpu", "reload, page cache", "reload, from disk"):
                sleep_s = median([s for _, (s, _, _) in runs[mode]])
                wake_s = median([w for _, (_, w, _) in runs[mode]])
                freed = median([f for _, (_, _, f) in runs[mode]]) / 2**20
                speed = f"{megabytes / wake_s:,.0f} MB/s" if wake_s > 0 and mode != "none" else ""
                rows.append((label, f"offload {mode}", sleep_s, wake_s, sleep_s + wake_s, speed,
                             f"{freed:,.0f}" if gpu else "", (sleep_s + wake_s) / round_s))
            for what, times in loads.items():
                seconds = median(times)
                rows.append((label, what, "", "", seconds, f"{megabytes / seconds:,.0f} MB/s", "", seconds / round_s))

    emit("PRM offload between rounds: what sleep and wake cost",
         [f"SkyworkPRM layout, random weights in float32 on {args.device}, batch {args.batch_size}; medians of "
          f"{repeats} interleaved runs; the last column is against a round's scoring of {n} responses here; "
          f"loads are to the CPU",
          "offload cpu on the CPU moves nothing (the PRM already runs in host memory)" if not gpu else
          "GPU MiB freed: torch.cuda.memory_allocated before minus after the sleep"],
         ["PRM", "what", "sleep s", "wake s", "seconds", "speed", "GPU MiB freed", "vs a round's scoring"],
         rows, args.json)


if __name__ == "__main__":
    main()
