"""Check the vLLM API the engine uses against a vLLM GPU wheel's source, without importing it.

    python scripts/vllm_contract.py --version 0.33.0 [--version 0.32.0 ...]   # pip download, check, delete
    python scripts/vllm_contract.py --wheel path/to/vllm-0.33.0-...whl      # a wheel already here
    python scripts/vllm_contract.py --installed                             # the imported vllm (as the test)

The uses are read from the engine's source (``hs_star_pl/engines/vllm_contract.py``); the
wheel's ``.py`` files are parsed with ``ast``, so a CUDA wheel is checked on a CPU machine.
``--version`` runs ``pip download --no-deps vllm==<version>`` into a temporary folder (about
300 MB per wheel) and deletes it afterwards. Prints one line per use and exits 1 when any
use fails. Results for the versions the ``vllm`` extra allows: docs/engines.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hs_star_pl.engines.vllm_contract import InstalledVLLM, VLLMReader, WheelVLLM, check, report  # noqa: E402


def run(reader: VLLMReader) -> bool:
    findings = check(reader)
    for line in report(reader, findings):
        print(line)
    return all(f.ok for f in findings)


def download(version: str, folder: str) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                    f"vllm=={version}", "-d", folder], check=True)
    wheels = sorted(Path(folder).glob("vllm-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download left no vllm wheel for {version} in {folder}")
    return wheels[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="append", default=[], help="a vllm version to download and check")
    parser.add_argument("--wheel", action="append", default=[], type=Path, help="a vllm wheel file to check")
    parser.add_argument("--installed", action="store_true", help="check the installed (imported) vllm")
    args = parser.parse_args(argv)
    if not (args.version or args.wheel or args.installed):
        parser.error("give --version, --wheel or --installed")
    ok = True
    if args.installed:
        ok &= run(InstalledVLLM())
    for wheel in args.wheel:
        ok &= run(WheelVLLM(wheel))
    for version in args.version:
        with tempfile.TemporaryDirectory(prefix="vllm_wheel_") as folder:
            ok &= run(WheelVLLM(download(version, folder)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
