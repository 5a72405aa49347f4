"""Production monitoring of a task's served traffic (the request log of `ftpipe serve`) over a time window: volume,
errors and latency; whether outputs have the form of the task's answers; the predicted labels against the training
labels; and how far production prompts drift from the training prompts (prompts with no near neighbour among them,
found with the cleaning's MinHash code, and shifts of length and vocabulary)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ftpipe.config import MonitoringConfig, TaskConfig
from ftpipe.core import readable, similarity
from ftpipe.core.evaluation.metrics import label_reader, task_metrics
from ftpipe.core.feedback import apply_dropped_feedback, confirms, corrections, feedback_dir, same_answer
from ftpipe.core.plots import markdown_image, plot_panels
from ftpipe.core.records import read_examples, user_message
from ftpipe.core.server.request_log import read_records, segments
from ftpipe.core.storage import atomic_dir
from ftpipe.core.text import loose_words, markdown_table

REPORT, FIGURES, OVER_TIME = "report.md", "metrics.json", "over_time.png"
TIME_BINS = 12
NOVEL_EXAMPLES = 5
MIN_JUDGED = 20  # answers the validity limit needs before it judges
NOT_A_LABEL = "(not a training label)"
REFUSED_SHOWN = 20


def requests_version(task: str) -> str:
    """Changes when a segment of the task's request log appears, grows or is finished, or a correction file is
    dropped in its `feedback/` folder."""
    folder = feedback_dir(task)
    dropped = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    found = [(p.name, p.stat().st_size) for p in segments(task) + dropped]
    return hashlib.sha256(json.dumps(found).encode()).hexdigest()[:16]


def _seconds(record: dict[str, Any], field: str = "time") -> float:
    return datetime.fromisoformat(record[field]).timestamp()


def in_window(records: list[dict[str, Any]], hours: float, now: float) -> list[dict[str, Any]]:
    return [r for r in records if now - hours * 3600 <= _seconds(r) <= now]


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def health(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Volume; the shares of requests the server failed (5xx: errors) and that ended on the client's side (4xx: too
    long for the model, invalid, a stream closed early); latency percentiles of the answered ones."""
    latencies = [r["latency_ms"] for r in records if r["status"] == 200]
    share = lambda keep: sum(map(keep, records)) / len(records) if records else 0.0  # noqa: E731
    return {"requests": len(records), "error_rate": share(lambda r: r["status"] >= 500),
            "refused_rate": share(lambda r: 400 <= r["status"] < 500),
            **{f"latency_p{q}_ms": _percentile(latencies, q) for q in (50, 95, 99)}}


def _with_content(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The answered records that kept their messages and output (not only hashes)."""
    return [r for r in records if r["status"] == 200 and isinstance(r["output"], str)]


def novel(prompts: list[str], known: list[str], threshold: float) -> list[bool]:
    """Per prompt, whether no `known` prompt is a near neighbour (word Jaccard at least `threshold`)."""
    rows = [[("user", text)] for text in known + prompts]
    pairs = similarity.similar_pairs(similarity.shingles(rows, 1), similarity.Settings(threshold, 128, 1))
    near = {b - len(known) for a, b, _ in pairs if a < len(known) <= b}
    return [index not in near for index in range(len(prompts))]


def length_shift(prompts: list[str], known: list[str]) -> float:
    """The Kolmogorov-Smirnov distance between the prompts' and the known prompts' lengths in words (0 to 1)."""
    ours, theirs = (np.sort([len(loose_words(t)) for t in texts]) for texts in (prompts, known))
    if not len(ours) or not len(theirs):
        return 0.0
    grid = np.union1d(ours, theirs)
    cdf = lambda values: np.searchsorted(values, grid, side="right") / len(values)  # noqa: E731
    return float(np.abs(cdf(ours) - cdf(theirs)).max())


def vocabulary_shift(prompts: list[str], known: list[str]) -> float:
    """The mean over the prompts of the share of a prompt's words that no known prompt uses: each request counts
    once, so one very long prompt does not decide it."""
    vocabulary = {word for text in known for word in loose_words(text)}
    shares = [sum(word not in vocabulary for word in words) / len(words)
              for words in map(loose_words, prompts) if words]
    return sum(shares) / len(shares) if shares else 0.0


def drift(prompts: list[str], known: list[str], heldout: list[str], threshold: float) -> dict[str, Any]:
    """How far `prompts` are from the `known` (training) prompts, and the share of novel prompts among the `heldout`
    ones (what traffic like the training data shows); None for every figure without prompts."""
    if not prompts:
        return dict.fromkeys(("novel_input_share", "heldout_novel_share", "length_shift", "vocabulary_shift",
                              "drift_score")) | {"novel": []}
    flags = novel(prompts, known, threshold)
    expected = novel(heldout, known, threshold)
    shifts = {"length_shift": length_shift(prompts, known), "vocabulary_shift": vocabulary_shift(prompts, known)}
    return {"novel_input_share": sum(flags) / len(flags),
            "heldout_novel_share": sum(expected) / len(expected) if expected else 0.0, **shifts,
            "drift_score": max(shifts.values()), "novel": flags}


def foreign_system_prompts(answered: list[dict[str, Any]], train: list[dict[str, Any]]) -> list[str | None]:
    """Per answered request, its system message where no training row has that one (the client replaced the task's
    instruction, and the model answered under one it was not trained with); None where it did not."""
    known = {m["content"] for row in train for m in row["messages"] if m["role"] == "system"}
    return [next((m["content"] for m in r["messages"] if m["role"] == "system" and m["content"] not in known), None)
            for r in answered]


def label_shares(outputs: list[str], train_answers: list[str], label_of) -> list[dict[str, Any]]:
    """Per label, its share of the training answers and of the production outputs (those with no training label
    counted together as NOT_A_LABEL)."""
    train = Counter(label_of(a) or "(none)" for a in train_answers)
    production = Counter(label if (label := label_of(o)) in train else NOT_A_LABEL for o in outputs)
    return [{"label": label, "training_share": train[label] / max(len(train_answers), 1),
             "production_share": production[label] / max(len(outputs), 1)}
            for label in sorted(set(train) | set(production), key=lambda name: (-train[name], name))]


def over_time(answered: list[dict[str, Any]], novel_flags: list[bool], target: Path) -> Path:
    """p95 latency and the share of novel prompts of the answered requests in equal time bins, as a PNG."""
    times = np.array([_seconds(r) for r in answered])
    latency, novelty = [], []
    if len(times):
        width = max(times.max() - times.min(), 1e-6) / TIME_BINS
        bins = np.minimum(((times - times.min()) / width).astype(int), TIME_BINS - 1)
        for index in np.unique(bins).tolist():
            members = np.flatnonzero(bins == index).tolist()
            minutes = index * width / 60
            latency.append((minutes, _percentile([answered[i]["latency_ms"] for i in members], 95)))
            novelty.append((minutes, sum(novel_flags[i] for i in members) / len(members)))
    return plot_panels({"p95 latency (ms)": {"p95 latency": latency}, "novel prompts (share)": {"novel": novelty}},
                       target, xlabel="minutes into the window")


def production_report(task: str, train_path: Path, config: TaskConfig, out_dir: Path, now: float | None = None,
                      heldout_path: Path | None = None) -> dict[str, Any]:
    """The report of the task's requests in the last `monitoring.window_hours` against the training split (and the
    held-out split's prompts, how novel traffic like the training data is; none without `heldout_path`), written
    to `out_dir` (report.md, metrics.json, over_time.png); returns the figures, the Markdown and the plot. Corrections
    dropped in the task's `feedback/` folder are added to its raw data first (`feedback_rows`, `feedback_refused`)."""
    watch: MonitoringConfig = config.monitoring
    feedback_rows, refused = apply_dropped_feedback(task)
    now = datetime.now(timezone.utc).timestamp() if now is None else now
    logged = in_window(read_records(task, since=now - watch.window_hours * 3600), watch.window_hours, now)
    records = [r for r in logged if not r.get("purpose")]  # ftpipe's own requests (a teacher's) are no production
    train = read_examples(train_path)
    answers = [row["messages"][-1]["content"] for row in train]
    answered = _with_content(records)
    outputs = [r["output"] for r in answered]
    valid = task_metrics(config.evaluation).valid_outputs(outputs, answers)
    heldout = read_examples(heldout_path) if heldout_path else []
    found = drift(*([user_message(r["messages"]) for r in rows] for rows in (answered, train, heldout)),
                  watch.neighbour_threshold)
    label_of = label_reader(config.evaluation)
    corrected = [r for r in corrections(task) if now - watch.window_hours * 3600 <= _seconds(r, "corrected_at") <= now]
    foreign = [prompt for prompt in foreign_system_prompts(answered, train) if prompt is not None]
    figures = {**health(records), "validity": sum(valid) / len(valid) if valid else None, "outputs_judged": len(valid),
               **{k: v for k, v in found.items() if k != "novel"},
               "foreign_system_prompt_share": len(foreign) / len(answered) if answered else None,
               "window_hours": watch.window_hours, "ftpipe_requests_left_out": len(logged) - len(records),
               **_corrections(corrected, config)}
    labels = label_shares(outputs, answers, label_of) if label_of else []
    novel_prompts = [user_message(r["messages"]) for r, flag in zip(answered, found["novel"]) if flag]
    with atomic_dir(out_dir) as tmp:
        over_time(answered, found["novel"], tmp / OVER_TIME)
        markdown = _markdown(task, figures, labels, novel_prompts, foreign, refused,
                             markdown_image(tmp / OVER_TIME, "over time"))
        (tmp / REPORT).write_text(markdown, encoding="utf-8")
        (tmp / FIGURES).write_text(json.dumps({**figures, "labels": labels}, indent=1), encoding="utf-8")
    return {**figures, "labels": labels, "report_markdown": markdown, "feedback_rows": feedback_rows,
            "feedback_refused": refused, "over_time": markdown_image(
        out_dir / OVER_TIME, "over time"), "report_path": str(out_dir / REPORT)}


def _corrections(rows: list[dict[str, Any]], config: TaskConfig) -> dict[str, int]:
    """The correction rows that changed the served answer (`corrections`) and those that gave it (`confirmations`)."""
    same = same_answer(config.evaluation)
    confirmed = sum(confirms(row, same) for row in rows)
    return {"corrections": len(rows) - confirmed, "confirmations": confirmed}


def health_problems(figures: dict[str, Any], watch: MonitoringConfig) -> list[str]:
    """Why the task's traffic is unhealthy (nothing: healthy), one line each."""
    problems = []
    if figures["error_rate"] > watch.max_error_rate:
        problems.append(f"error rate {figures['error_rate']:.1%} above {watch.max_error_rate:.1%}")
    p95 = figures["latency_p95_ms"]
    if p95 is not None and p95 > watch.max_latency_p95_ms:
        problems.append(f"p95 latency {p95:.0f} ms above {watch.max_latency_p95_ms:.0f} ms")
    validity, judged = figures["validity"], figures["outputs_judged"]
    if validity is not None and judged >= MIN_JUDGED and validity < watch.min_validity:
        problems.append(f"validity {validity:.1%} below {watch.min_validity:.1%} ({judged - round(validity * judged)} "
                        f"of {judged} answers are not of the task's form)")
    return problems


def drift_problems(figures: dict[str, Any], watch: MonitoringConfig) -> list[str]:
    """How production prompts drifted from the training prompts beyond the limits (nothing: they did not)."""
    problems = []
    if figures["drift_score"] is None:  # no prompt kept its content
        return problems
    if figures["drift_score"] > watch.max_drift:
        problems.append(f"drift score {figures['drift_score']:.2f} above {watch.max_drift:.2f} (length shift "
                        f"{figures['length_shift']:.2f}, vocabulary shift {figures['vocabulary_shift']:.2f})")
    novel_share, expected = figures["novel_input_share"], figures.get("heldout_novel_share") or 0.0
    if novel_share - expected > watch.max_novel_share:
        problems.append(f"{novel_share:.0%} of prompts have no near neighbour in the training data, against "
                        f"{expected:.0%} of the held-out prompts (limit {watch.max_novel_share:.0%} more)")
    return problems


def read_figures(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / FIGURES).read_text(encoding="utf-8"))


def _markdown(task: str, figures: dict[str, Any], labels: list[dict[str, Any]], novel_prompts: list[str],
              foreign: list[str], refused: list[str], image: str) -> str:
    shown = [[name, "n/a" if value is None else readable.rounded(value) if isinstance(value, float) else value]
             for name, value in figures.items()]
    parts = [f"# Production report: {task}\n", markdown_table(["figure", "value"], shown), "", image, ""]
    if labels:
        rows = [[row["label"], f"{row['training_share']:.1%}", f"{row['production_share']:.1%}"] for row in labels]
        parts += ["## Predicted labels against the training labels\n", markdown_table(
            ["label", "training", "production"], rows), ""]
    if novel_prompts:
        common = Counter(novel_prompts).most_common(NOVEL_EXAMPLES)
        parts += ["## Prompts with no near neighbour in the training data\n",
                  markdown_table(["prompt", "requests"], [list(entry) for entry in common]), ""]
    if foreign:
        common = Counter(foreign).most_common(NOVEL_EXAMPLES)
        parts += [f"## Requests with a system prompt of their own ({len(foreign)})\n",
                  "The model answered them under an instruction no training row has, instead of the task's.\n",
                  markdown_table(["system prompt", "requests"], [list(entry) for entry in common]), ""]
    if refused:
        parts += [f"## Corrections refused ({len(refused)})\n", "Fix these lines and drop them again.\n",
                  markdown_table(["file:line: reason"], [[line] for line in refused[:REFUSED_SHOWN]]), ""]
    return "\n".join(parts)
