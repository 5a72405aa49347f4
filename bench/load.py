"""Code location load time: `import ftpipe.definitions` and `dagster definitions validate` against a bare
`import dagster`, each in a fresh interpreter, side by side in the same run.

    python bench/load.py [--repeats 5]

Prints the median of each and the differences (target: under one second), and which heavy libraries the
code location imported (there should be none).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ftpipe.core.storage import REPO_ROOT

HEAVY = ("torch", "transformers", "trl", "peft", "mlflow", "kubernetes")
PROBE = "import sys, json; {statement}; print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"


def seconds(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, check=True)
    return time.perf_counter() - start, done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def median_seconds(command: list[str], env: dict[str, str], repeats: int) -> tuple[float, str]:
    runs = [seconds(command, env) for _ in range(repeats)]
    return statistics.median(t for t, _ in runs), runs[-1][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "DAGSTER_HOME": home}
        python = [sys.executable, "-c"]
        bare, _ = median_seconds([*python, PROBE.format(statement="import dagster", heavy=HEAVY)], env, args.repeats)
        ours, heavy = median_seconds([*python, PROBE.format(statement="import ftpipe.definitions", heavy=HEAVY)], env,
                                     args.repeats)
        dagster_cli = str(Path(sys.executable).parent / "dagster")
        validate, _ = median_seconds([dagster_cli, "definitions", "validate", "-w", str(REPO_ROOT / "workspace.yaml")],
                                     env, args.repeats)
    print(f"import dagster                      {bare:6.2f} s (median of {args.repeats})")
    print(f"import ftpipe.definitions           {ours:6.2f} s  (+{ours - bare:.2f} s; target < 1 s)")
    print(f"dagster definitions validate        {validate:6.2f} s  (+{validate - bare:.2f} s over import dagster)")
    print(f"heavy libraries imported at load:   {', '.join(json.loads(heavy)) or 'none'}")


if __name__ == "__main__":
    main()
