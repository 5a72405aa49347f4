"""The whole pipeline on the demo task, three times in a row in a fresh Dagster instance and artifact home:

    python bench/pipeline.py [--task ticket_triage] [--base-model PATH] [--keep]

1. a first run of `finetune_job` (`python -m ftpipe run TASK`), with the time of every step from the
   instance, grouped as data, base model, training, evaluation and merge, plus the orchestration overhead
   (the run's wall time minus the time inside its steps);
2. a second run with nothing changed: which steps really worked (training, generation, merge) and the
   ratio of its wall time to the first run's (target: under 10 %);
3. a third run after appending 1 % new, distinct rows to the task's raw data, with `retrain.warm_start` on: the
   adapter continues on the new rows and a replayed sample of the old ones;
4. the same split trained from step 0 (warm start off; the data steps are reused), and the two side by side: time,
   task score and forgetting with their intervals;
5. the versions of each output left on disk after the runs (the live one and those a reader may still read).

The task folder and the general-skills probe are copied into a temporary data dir, so the repository's
data is never touched; the base model file is shared with the repository's `.ftpipe/downloads`.
`--base-model PATH` writes another base model (e.g. a tiny local one) into the copied task.yaml, for a
quick check of this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import yaml

from ftpipe.core.layout import TaskLayout, downloads_dir
from ftpipe.core.storage import REPO_ROOT

GROUPS = {"teacher_examples": "data", "raw_examples": "data", "deduplicated_examples": "data", "review_sample": "data",
          "heldout_split": "data", "task_files": "data", "base_model": "base model", "lora_adapter": "training",
          "preference_adapter": "training", "eval_report": "evaluation", "human_review": "evaluation",
          "merged_model": "merge"}
WORK = {"lora_adapter": ("trained", "reused"), "eval_report": ("generated", "reused"), "merged_model": ("merged", "reused")}
TARGET = 0.10


def group_of(step: str) -> str:
    """The group of an asset's step or of a check on it (the check's name starts with the asset's)."""
    return next((group for asset, group in GROUPS.items() if step.startswith(asset)), "other")


def prepare(root: Path, task: str, base_model: str | None) -> dict[str, str]:
    """A data dir holding a copy of the task and the probe, an empty artifact home and Dagster home; their env."""
    from ftpipe.core.modeling import fetch_default_gguf

    data, home, dagster_home = root / "data", root / "home", root / "dagster"
    shutil.copytree(REPO_ROOT / "data" / "tasks" / task, data / "tasks" / task)
    shutil.copytree(REPO_ROOT / "data" / "general", data / "general")
    gguf = fetch_default_gguf(downloads_dir())  # the repository's copy; downloaded only when it is missing
    local_downloads = under(home, downloads_dir)
    local_downloads.mkdir(parents=True)
    (local_downloads / gguf.name).symlink_to(gguf)
    instance = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    for key in ("storage", "local_artifact_storage", "compute_logs"):  # the defaults keep them in DAGSTER_HOME
        instance.pop(key, None)
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(instance))
    if base_model:
        task_yaml = data / "tasks" / task / "task.yaml"
        config = yaml.safe_load(task_yaml.read_text())
        task_yaml.write_text(yaml.safe_dump({**config, "base_model": str(Path(base_model).resolve())}))
    env = {**os.environ, "FTPIPE_DATA_DIR": str(data), "FTPIPE_HOME": str(home), "DAGSTER_HOME": str(dagster_home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    if base_model:  # a local model outside the data dir must be allowed explicitly
        env["FTPIPE_MODEL_DIRS"] = str(Path(base_model).resolve().parent)
    return env


def run_pipeline(env: dict[str, str], task: str, log: Path, settings: str = "") -> tuple[float, int]:
    """(wall seconds, exit code) of `python -m ftpipe run TASK [--set settings]`; its output goes to `log`."""
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "ftpipe", "run", task, *(["--set", settings] if settings else [])],
                              cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - start, done.returncode


def run_facts(dagster_home: str) -> dict:
    """Step times, run wall time and materialization metadata of the instance's latest run."""
    with dg.DagsterInstance.from_config(dagster_home) as instance:
        run = instance.get_runs(limit=1)[0]
        record = instance.get_run_record_by_id(run.run_id)
        steps = {s.step_key: s.end_time - s.start_time for s in instance.get_run_step_stats(run.run_id)
                 if s.start_time and s.end_time}
        events = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        metadata = {e.dagster_event.asset_key.to_user_string(): {k: v.value for k, v in e.asset_materialization.metadata.items()}
                    for e in events}
    return {"run_id": run.run_id, "status": run.status.value, "run_wall": record.end_time - record.start_time,
            "steps": steps, "metadata": metadata}


def work_done(facts: dict, step: str) -> str:
    """What the step did: trained / reused, generated / reused, merged / reused, or not built."""
    if step not in WORK:
        return ""
    if step not in facts["metadata"]:
        return "not built"
    did, reused = WORK[step]
    meta = facts["metadata"][step]
    if meta.get("reused") is True:  # a missing flag counts as not reused
        return reused
    if step == "eval_report" and meta.get("base_cached"):
        return "generated (fine-tuned only; base cached)"
    return did


def print_run(title: str, facts: dict, wall: float, code: int) -> None:
    steps = facts["steps"]
    inside = sum(steps.values())
    print(f"\n{title}: {wall:.1f} s for `python -m ftpipe run` (exit {code}), Dagster run {facts['status']} "
          f"in {facts['run_wall']:.1f} s")
    print(f"  {'step':<40}{'group':<12}{'seconds':>9}  work")
    for step, seconds in sorted(steps.items(), key=lambda item: -item[1]):
        print(f"  {step:<40}{group_of(step):<12}{seconds:9.1f}  {work_done(facts, step)}")
    totals: dict[str, float] = {}
    for step, seconds in steps.items():
        totals[group_of(step)] = totals.get(group_of(step), 0.0) + seconds
    print("  by group: " + ", ".join(f"{group} {seconds:.1f} s" for group, seconds in totals.items())
          + f", orchestration overhead {facts['run_wall'] - inside:.1f} s (run wall time - steps)"
          + f", process start and task sync {wall - facts['run_wall']:.1f} s")


def print_comparison(runs: dict[str, tuple[dict, float]], first_wall: float) -> None:
    """Warm start against training from step 0: run and training time, task score and forgetting with intervals."""
    print(f"  {'':<14}{'run':>9}{'training':>10}  {'delta (95% CI)':<24}{'forgetting (95% CI)':<24}")
    for name, (facts, wall) in runs.items():
        report, adapter = facts["metadata"]["eval_report"], facts["metadata"]["lora_adapter"]
        print(f"  {name:<14}{wall:8.1f}s{facts['steps'].get('lora_adapter', 0.0):9.1f}s  "
              f"{interval(report, 'delta', 'delta_ci'):<24}{interval(report, 'forgetting', 'forgetting_ci'):<24}"
              f"{adapter.get('steps')} steps, warm_started={adapter.get('warm_started')}, "
              f"{wall / first_wall:.1%} of the first run")


def interval(report: dict, value: str, bounds: str) -> str:
    return f"{report[value]:+.3f} [{report[bounds + '_low']:+.3f}, {report[bounds + '_high']:+.3f}]"


def under(home: Path, place):
    """What `place()` (a layout function) names in the artifact home `home`."""
    saved = os.environ.get("FTPIPE_HOME")
    os.environ["FTPIPE_HOME"] = str(home)
    try:
        return place()
    finally:
        os.environ.pop("FTPIPE_HOME") if saved is None else os.environ.update(FTPIPE_HOME=saved)


def versions_on_disk(home: Path, task: str) -> dict[str, int]:
    """How many published versions of each of the task's outputs are on disk (hidden `.NAME.PID.RANDOM.v` folders)."""
    root = under(home, lambda: TaskLayout(task).root)
    counts: dict[str, int] = {}
    for version in root.rglob(".*.v"):
        name = str(version.parent.relative_to(root) / version.name[1:].rsplit(".", 3)[0])
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def known_prompts(home: Path, task: str) -> list[str]:
    split_files = under(home, lambda: TaskLayout(task).split_files)
    frames = [pd.read_parquet(path, columns=["messages"]) for path in split_files]
    return [next(m["content"] for m in messages if m["role"] == "user")
            for frame in frames for messages in frame["messages"]]


def append_rows(data: Path, home: Path, task: str, count: int, seed: int = 2026) -> int:
    """Append `count` new demo tickets (chat JSONL, the demo's own format), none near any known prompt."""
    spec = importlib.util.spec_from_file_location("generate_demo", REPO_ROOT / "data" / "generate_demo.py")
    demo = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    rng = random.Random(seed)
    seen = [demo.shingles(prompt) for prompt in known_prompts(home, task)]
    lines = []
    while len(lines) < count:
        text, category, priority = demo.make_ticket(rng)
        grams = demo.shingles(text)
        if all(demo.jaccard(grams, other) < demo.MAX_BASE_SIMILARITY for other in seen):
            seen.append(grams)
            messages = [{"role": "user", "content": text},
                        {"role": "assistant", "content": demo.answer(category, priority)}]
            lines.append(json.dumps({"messages": messages}))
    path = data / "tasks" / task / "raw" / "tickets_chat.jsonl"  # the demo's chat file; another task gets its own
    path = path if path.exists() else path.with_name("bench_new_rows.jsonl")
    text = path.read_text() if path.exists() else ""
    path.write_text(text + ("\n" if text and not text.endswith("\n") else "") + "\n".join(lines) + "\n")
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="ticket_triage")
    parser.add_argument("--base-model", help="base model written into the copied task.yaml (e.g. a tiny local model)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, artifacts, instance)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ftpipe-bench-"))
    try:
        env = prepare(root, args.task, args.base_model)
        home, data = Path(env["FTPIPE_HOME"]), Path(env["FTPIPE_DATA_DIR"])
        print(f"task {args.task!r}, base model {args.base_model or 'from task.yaml'}; working in {root}")
        first_wall, code = run_pipeline(env, args.task, root / "run1.log")
        first = run_facts(env["DAGSTER_HOME"])
        print_run("1. first run (fresh artifact home)", first, first_wall, code)

        second_wall, code = run_pipeline(env, args.task, root / "run2.log")
        second = run_facts(env["DAGSTER_HOME"])
        print_run("2. second run, nothing changed", second, second_wall, code)
        ratio = second_wall / first_wall
        print(f"  second / first wall time: {ratio:.1%} -> {'PASS' if ratio < TARGET else 'FAIL'} (target < {TARGET:.0%})")

        valid = first["metadata"].get("raw_examples", {}).get("rows_valid", 0)
        added = append_rows(data, home, args.task, max(1, round(valid / 100)))
        third_wall, code = run_pipeline(env, args.task, root / "run3.log", "retrain.warm_start=true")
        warm = run_facts(env["DAGSTER_HOME"])
        print_run(f"3. after appending {added} new rows (1% of {valid} valid rows), warm start", warm, third_wall, code)
        print(f"  third / first wall time: {third_wall / first_wall:.1%}")
        scratch_wall, code = run_pipeline(env, args.task, root / "run4.log")
        scratch = run_facts(env["DAGSTER_HOME"])
        print_run("4. the same split, trained from step 0 (data steps reused)", scratch, scratch_wall, code)
        print_comparison({"warm start": (warm, third_wall), "from step 0": (scratch, scratch_wall)}, first_wall)
        kept = versions_on_disk(home, args.task)
        print(f"\n5. versions on disk after the runs ({sum(kept.values())} folders): "
              + ", ".join(f"{name} {count}" for name, count in kept.items()))
    finally:
        if args.keep:
            print(f"\nkept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
