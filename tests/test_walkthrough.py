"""docs/own-model-and-data.md, run as written: its bash blocks, on tiny stand-ins.

The model is a copy of the demo's M_0 in an offline hub cache (``tiny-org/tiny-m0``), the pool
the demo's problems with their fields renamed (``q``, ``a``), the held-out file a few of the
demo's test problems; the sizes are small. ``hs-star`` is this checkout's ``python -m hs_star_pl``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

from tests.helpers.tiny_setup import REPO

DOC = REPO / "docs" / "own-model-and-data.md"
COMMIT = "feedface" * 5


def _blocks() -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", DOC.read_text(encoding="utf-8"), flags=re.M | re.S)


def test_the_walkthrough_runs_as_written(tmp_path):
    blocks = _blocks()
    assert len(blocks) == 5 and any(b.lstrip().startswith("hs-star fit") for b in blocks)
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-m0" / "snapshots" / COMMIT
    shutil.copytree(REPO / "data" / "tiny" / "m0", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
    rows = [json.loads(line) for line in (REPO / "data" / "tiny" / "pool.jsonl").read_text().splitlines()[:60]]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps({"q": r["question"], "a": r["answer"]}) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text("".join((REPO / "data" / "tiny" / "test.jsonl").read_text().splitlines(True)[:8]))
    run = tmp_path / "run"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path),
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "MODEL": "tiny-org/tiny-m0", "TEMPLATE": "plain", "POOL": str(tmp_path / "pool.jsonl"),
           "TEST": str(tmp_path / "test.jsonl"), "QUESTION_KEY": "q", "ANSWER_KEY": "a", "PER_ITERATION": "12",
           "ITERATIONS": "1", "EVAL_PROBLEMS": "6", "RUN": str(run)}
    script = f'hs-star() {{ "{sys.executable}" -m hs_star_pl "$@"; }}\n' + "\n".join(blocks)
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.splitlines()[0] == json.dumps({"q": rows[0]["question"], "a": rows[0]["answer"]})  # step 1
    assert re.search(r"^\| tiny-m0 \| test \| 6 \| 1 \| acc \|", out.stdout + out.stderr, flags=re.M)  # step 2
    assert (run / "m0" / "results.md").is_file()
    assert re.search(r"^round 0: 12 problems, ", out.stdout + out.stderr, flags=re.M)  # step 3
    assert "| M_0 |" in out.stdout and "| M_1 |" in out.stdout  # step 4: cat results.md
    assert (run / "results.png").is_file() and (run / "hf" / "policy_001" / "config.json").is_file()
    summary = json.loads((run / "rounds" / "round_000" / "summary.json").read_text())
    assert summary["n_problems"] == 12
