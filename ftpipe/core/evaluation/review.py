"""Human review: a blind, randomised A/B sample of held-out rows (a baseline's answer against the new model's) for a
person to judge in a spreadsheet or on a self-contained web page, and the verdicts read back and un-blinded.

Hand the reviewer review.html (or review.csv), never review_key.json: the key says which side is the new model.
Filled CSVs go into the task's `reviews/` folder, one or more per reviewer; `read_verdicts` reads them all."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ftpipe.core.evaluation.review_page import review_page
from ftpipe.core.evaluation.statistics import pairwise_summary, seeded_rank
from ftpipe.core.storage import write_text

REVIEW_CSV, REVIEW_HTML, REVIEW_KEY = "review.csv", "review.html", "review_key.json"
COLUMNS = ["sample", "id", "prompt", "reference", "answer_a", "answer_b", "verdict", "reviewer"]
REQUIRED = ("sample", "id", "verdict")
VERDICTS = {"a": "A", "b": "B", "tie": "tie"}  # accepted (any case) -> as written
BASELINE, CANDIDATE = "base", "finetuned"  # the records' answer columns compared by default
REVIEW_ROWS = 50


def review_rows(records: list[dict], count: int, seed: int) -> list[dict]:
    """`count` records in a seeded pseudo-random order (the LLM judge takes the same rows with the same seed)."""
    return sorted(records, key=lambda record: seeded_rank(record["id"], seed))[:count]


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_review_sample(records: list[dict], out_dir: Path | str, *, rows: int = REVIEW_ROWS, seed: int = 0,
                        baseline: str = BASELINE, candidate: str = CANDIDATE) -> dict[str, Any]:
    """A blind A/B sample of `rows` records (prediction records: id, message, prompt, reference and the answer
    columns `<baseline>_answer` and `<candidate>_answer`), the sides shuffled per row, written into `out_dir`:

    - review.csv: sample, id, prompt (the user's message, after the earlier turns of a multi-turn row), reference,
      answer_a, answer_b, and an empty verdict (A, B or tie) and reviewer to fill in;
    - review.html: the same rows on a page that works offline in any browser and downloads the filled CSV;
    - review_key.json: which side is the new model on each row (keep it from the reviewer).

    Returns `review_sample` (the sample's id, written in every row, so verdicts on another sample are told apart),
    `review_rows` and the three paths."""
    chosen = review_rows(records, rows, seed)
    if not chosen:
        raise ValueError("no held-out rows to review")
    rng = random.Random(seed)
    shown, blinded = [], {}
    for record in chosen:
        old, new = record[f"{baseline}_answer"], record[f"{candidate}_answer"]
        new_side = rng.choice("AB")
        a, b = (old, new) if new_side == "B" else (new, old)
        shown.append({"id": record["id"], "prompt": record["message"], "context": record["prompt"],
                      "reference": record["reference"], "answer_a": a, "answer_b": b})
        blinded[record["id"]] = {"new": new_side, "answer": digest(new)}
    sample = digest(json.dumps([seed, shown]))[:12]
    out_dir = Path(out_dir)
    paths = {name: out_dir / file for name, file in
             (("review_csv", REVIEW_CSV), ("review_html", REVIEW_HTML), ("review_key", REVIEW_KEY))}
    write_text(paths["review_csv"], _csv_text([{**row, "sample": sample} for row in shown]))
    write_text(paths["review_html"], review_page(
        {"sample": sample, "columns": COLUMNS, "verdicts": list(VERDICTS.values()), "rows": shown}))
    write_text(paths["review_key"], json.dumps(
        {"sample": sample, "baseline": baseline, "candidate": candidate, "rows": blinded}, indent=1))
    return {"review_sample": sample, "review_rows": len(shown), **{name: str(path) for name, path in paths.items()}}


# ---------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Verdict:
    row: str  # held-out row id
    outcome: str  # for the new model: win | tie | loss
    answer: str  # digest of the new model's answer that was judged


@dataclass(frozen=True)
class Verdicts:
    """The human verdicts on one review sample, un-blinded."""

    sample: str
    baseline: str
    candidate: str
    verdicts: list[Verdict]
    files: list[str]  # the verdict files they came from

    def about(self, records: list[dict]) -> Verdicts:
        """Only the verdicts on answers the records' new model gives (not those on an older model's answers)."""
        answers = {record["id"]: digest(record.get(f"{self.candidate}_answer", "")) for record in records}
        return replace(self, verdicts=[v for v in self.verdicts if answers.get(v.row) == v.answer])

    def summary(self) -> dict[str, Any]:
        """`human_verdicts`, `human_wins`, `human_ties`, `human_losses`, `human_win_rate` (a tie counting half) and
        its 95% score interval (`human_win_rate_ci_low`, `human_win_rate_ci_high`; None without verdicts)."""
        outcomes = [verdict.outcome for verdict in self.verdicts]
        return {"human_verdicts": len(outcomes), **pairwise_summary("human", outcomes)}


def _outcome(verdict: str, new_side: str) -> str:
    return "tie" if verdict == "tie" else "win" if verdict == new_side else "loss"


def _file_verdicts(path: Path, key: dict, problems: list[str]) -> list[tuple[str, Verdict]]:
    """(reviewer, verdict) for each judged row of a verdict file on the key's sample (none for a file of another
    sample); what is wrong goes to `problems`, one line per file, row and field."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as exc:
        problems.append(f"{path.name}: not a UTF-8 CSV file ({exc})")
        return []
    missing = [column for column in REQUIRED if rows and column not in rows[0]]
    if missing:
        problems.append(f"{path.name}: missing column(s) {', '.join(missing)}")
        return []
    if key["sample"] not in {row["sample"] for row in rows}:
        return []
    found = []
    for number, row in enumerate(rows, start=2):  # row 1 is the header, as a spreadsheet counts
        verdict, where = (row["verdict"] or "").strip().lower(), f"{path.name}: row {number}"
        if row["sample"] != key["sample"]:
            problems.append(f"{where}: sample: {row['sample']!r} is another sample than the file's other rows")
        elif row["id"] not in key["rows"]:
            problems.append(f"{where}: id: {row['id']!r} is not in review sample {key['sample']}")
        elif verdict and verdict not in VERDICTS:
            problems.append(f"{where}: verdict: {row['verdict']!r} is not A, B or tie")
        elif verdict:
            blinded = key["rows"][row["id"]]
            outcome = _outcome(VERDICTS[verdict], blinded["new"])
            found.append(((row.get("reviewer") or "").strip() or path.name,
                          Verdict(row=row["id"], outcome=outcome, answer=blinded["answer"])))
    return found


def read_verdicts(reviews_dir: Path | str, key: Path | str) -> Verdicts:
    """Every verdict on the sample of `key` (review_key.json's path) in the CSV files of `reviews_dir`, un-blinded
    into a win, tie or loss for the new model. Files on other samples are skipped, rows without a verdict are not
    judged yet, and a reviewer (the `reviewer` column, else the file's name) judging a row again in a newer file
    replaces the older verdict. Anything unreadable raises one ValueError naming each file, row and field."""
    blinded = json.loads(Path(key).read_text(encoding="utf-8"))
    files = [p for p in Path(reviews_dir).glob("*.csv") if p.is_file()] if Path(reviews_dir).is_dir() else []
    latest: dict[tuple[str, str], Verdict] = {}
    problems: list[str] = []
    used, contents = [], set()
    for path in sorted(files, key=lambda p: (p.stat().st_mtime, p.name)):  # oldest first: newer verdicts replace
        content = hashlib.sha256(path.read_bytes()).hexdigest()  # the same file dropped twice counts once
        found = [] if content in contents else _file_verdicts(path, blinded, problems)
        contents.add(content)
        if found:
            used.append(path.name)
        latest.update({(reviewer, verdict.row): verdict for reviewer, verdict in found})
    if problems:
        raise ValueError(f"verdict files in {reviews_dir} cannot be read:\n" + "\n".join(problems))
    return Verdicts(sample=blinded["sample"], baseline=blinded["baseline"], candidate=blinded["candidate"],
                    verdicts=list(latest.values()), files=used)


def human_metrics(records: list[dict], verdicts: Verdicts | None) -> dict[str, Any]:
    """`Verdicts.summary` of the verdicts on the records' new model (all zero and None without any), and the LLM
    judge's agreement with them: `judge_human_agreement`, the share of `judge_human_pairs` human verdicts (on rows
    the judge compared against the same baseline) whose outcome the judge's equals; None without such rows."""
    current = verdicts.about(records) if verdicts else Verdicts("", BASELINE, CANDIDATE, [], [])
    judged = {r["id"]: r.get("judge_outcome") for r in records} if current.baseline == BASELINE else {}
    pairs = [(judged[v.row], v.outcome) for v in current.verdicts if judged.get(v.row)]
    agreement = sum(judge == human for judge, human in pairs) / len(pairs) if pairs else None
    return {**current.summary(), "judge_human_agreement": agreement, "judge_human_pairs": len(pairs)}


def sample_verdicts(predictions: Path | str, sample_dir: Path | str, reviews_dir: Path | str) -> Verdicts:
    """The verdicts in `reviews_dir` on the review sample written into `sample_dir`, on the answers of the evaluation
    whose predictions.parquet is `predictions` (verdicts on an older model's answers left out)."""
    import pyarrow.parquet as pq

    records = pq.read_table(predictions).to_pylist()
    return read_verdicts(reviews_dir, Path(sample_dir) / REVIEW_KEY).about(records)
