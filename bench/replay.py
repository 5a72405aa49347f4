"""Forgetting with and without `training.replay`, side by side, on the demo and on a generated intent task:

    python bench/replay.py [--task ticket_triage|intents] [--replay 0.2]

Runs the whole pipeline (`python -m ftpipe run TASK`) twice in fresh Dagster instances and artifact homes: once
with `training.replay` 0 and once with the given share; prints the task score's gain and forgetting, each with
its 95% interval, the gate's verdict and the wall time of each run. `intents` is the short-message classification
task of the tests (a long shared system prompt, 12 labels, skewed sizes), written as a CSV with mapped columns.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import yaml

from ftpipe.core.storage import REPO_ROOT
from pipeline import prepare, run_facts, run_pipeline

sys.path.insert(0, str(REPO_ROOT))  # the tests' generator writes the intent task

INTENTS_YAML = {
    "data": {"columns": {"prompt": "text", "completion": "category"}},
    "training": {"method": "auto", "lora": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                 "learning_rate": 0.0005, "max_steps": 28, "batch_size": 8, "max_length": 256, "eval_steps": 14},
    "evaluation": {"task_type": "classification", "max_new_tokens": 12},
}


def write_intents(data: Path) -> None:
    """The generated intent task as `tasks/intents/` (a CSV `text,category` and its task.yaml)."""
    from ftpipe_tests.intents import SYSTEM_PROMPT, intent_task

    folder = data / "tasks" / "intents"
    (folder / "raw").mkdir(parents=True)
    with (folder / "raw" / "intents.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "category"])
        writer.writerows([r["messages"][1]["content"], r["messages"][2]["content"]] for r in intent_task().rows)
    config = {**INTENTS_YAML, "data": {**INTENTS_YAML["data"], "system_prompt": SYSTEM_PROMPT}}
    (folder / "task.yaml").write_text(yaml.safe_dump(config))


def with_replay(data: Path, task: str, share: float) -> None:
    path = data / "tasks" / task / "task.yaml"
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**config, "training": {**config.get("training", {}), "replay": share}}))


def measure(task: str, share: float, root: Path) -> dict:
    """One fresh pipeline run of `task` with `training.replay` = `share`: its eval_report metadata and wall time."""
    env = prepare(root, "ticket_triage", None)
    data = Path(env["FTPIPE_DATA_DIR"])
    if task == "intents":
        write_intents(data)
    with_replay(data, task, share)
    wall, code = run_pipeline(env, task, root / "run.log")
    facts = run_facts(env["DAGSTER_HOME"])
    return {"replay": share, "wall": wall, "exit": code, **facts["metadata"].get("eval_report", {})}


def line(result: dict) -> str:
    if "delta" not in result:
        return f"  replay {result['replay']:.2f}: no evaluation (exit code {result['exit']}; see run.log)"
    return (f"  replay {result['replay']:.2f}: {result['primary_metric']} {result['base_score']:.3f} -> "
            f"{result['finetuned_score']:.3f} (gain {result['delta']:+.3f}, 95% CI {result['delta_ci_low']:+.3f} … "
            f"{result['delta_ci_high']:+.3f}); forgetting {result['forgetting']:.3f} (95% CI "
            f"{result['forgetting_ci_low']:.3f} … {result['forgetting_ci_high']:.3f}); few-shot "
            f"{result['fewshot_score']:.3f} (fine-tuned vs few-shot 95% CI low {result['delta_vs_fewshot_ci_low']:+.3f}); gate "
            f"{'passed' if result['passed'] else 'FAILED'}; {result['wall']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["ticket_triage", "intents"], default="ticket_triage")
    parser.add_argument("--replay", type=float, default=0.2)
    args = parser.parse_args()
    print(f"replay benchmark: task {args.task}")
    for share in (0.0, args.replay):
        with tempfile.TemporaryDirectory(prefix="ftpipe-replay-") as tmp:
            print(line(measure(args.task, share, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
