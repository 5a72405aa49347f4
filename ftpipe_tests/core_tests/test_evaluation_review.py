"""Human review on plain records (no model): the blind sample, the page a reviewer fills in (run in Node with a
minimal DOM), verdict files read back and un-blinded, and what counts as a verdict on the evaluated model."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess

import pytest

from ftpipe.core.evaluation.review import COLUMNS, human_metrics, read_verdicts, write_review_sample
from ftpipe_tests.reviewer import fill, key_of, other, read_csv


def records(count: int = 40, new: str = "Answer") -> list[dict]:
    return [{"id": f"r{i:02d}", "message": f"Question {i}?", "prompt": f"system: Be brief.\nuser: Question {i}?",
             "reference": f"Answer {i}", "base_answer": f"Base {i}", "finetuned_answer": f"{new} {i}"}
            for i in range(count)]


def test_the_sample_is_blind_shuffled_and_reproducible(tmp_path):
    written = write_review_sample(records(), tmp_path / "one", rows=12, seed=1)
    rows = read_csv(tmp_path / "one" / "review.csv")
    assert written["review_rows"] == len(rows) == 12 and list(rows[0]) == COLUMNS
    assert {row["sample"] for row in rows} == {written["review_sample"]}
    assert all(row["prompt"] == f"Question {int(row['id'][1:])}?" and not row["verdict"] for row in rows)
    new_sides = {row_id: row["new"] for row_id, row in key_of(tmp_path / "one")["rows"].items()}
    assert set(new_sides.values()) == {"A", "B"}  # shuffled per row
    for row in rows:
        assert row[f"answer_{new_sides[row['id']].lower()}"].startswith("Answer")
        assert row[f"answer_{other(new_sides[row['id']]).lower()}"].startswith("Base")
    page = (tmp_path / "one" / "review.html").read_text()
    assert "finetuned" not in page and "finetuned" not in (tmp_path / "one" / "review.csv").read_text()
    again = write_review_sample(records(), tmp_path / "two", rows=12, seed=1)
    assert again["review_sample"] == written["review_sample"]
    assert (tmp_path / "two" / "review.csv").read_bytes() == (tmp_path / "one" / "review.csv").read_bytes()
    other_seed = write_review_sample(records(), tmp_path / "three", rows=12, seed=2)
    assert other_seed["review_sample"] != again["review_sample"]


def test_verdicts_are_unblinded_into_wins_ties_and_losses(tmp_path):
    sample = tmp_path / "sample"
    write_review_sample(records(), sample, rows=10)
    choices = iter(["new"] * 6 + ["tie"] * 2 + ["old"] * 1 + [""])  # the last row is not judged yet
    answer = {"new": lambda letter: letter, "old": other, "tie": lambda letter: "Tie", "": lambda letter: ""}
    fill(sample, tmp_path / "reviews" / "ann.csv", lambda row, new: answer[next(choices)](new).lower())
    verdicts = read_verdicts(tmp_path / "reviews", sample / "review_key.json")
    summary = verdicts.summary()
    assert verdicts.files == ["ann.csv"]
    assert (summary["human_verdicts"], summary["human_wins"], summary["human_ties"], summary["human_losses"]) == (
        9, 6, 2, 1)
    assert summary["human_win_rate"] == pytest.approx(7 / 9)
    assert summary["human_win_rate_ci_low"] < 7 / 9 < summary["human_win_rate_ci_high"]


def test_bad_verdict_rows_are_refused_once_naming_file_row_and_field(tmp_path):
    sample = tmp_path / "sample"
    write_review_sample(records(), sample, rows=4)
    reviews = tmp_path / "reviews"
    path = fill(sample, reviews / "bob.csv", lambda row, new: "A")
    rows = read_csv(path)
    rows[1]["verdict"], rows[3]["id"] = "maybe", "r99"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (reviews / "notes.csv").write_text("id,comment\nr01,fine\n")
    with pytest.raises(ValueError) as error:
        read_verdicts(reviews, sample / "review_key.json")
    lines = str(error.value).splitlines()
    assert lines[1:] == ["bob.csv: row 3: verdict: 'maybe' is not A, B or tie",
                         f"bob.csv: row 5: id: 'r99' is not in review sample {key_of(sample)['sample']}",
                         "notes.csv: missing column(s) sample, verdict"]


def test_other_samples_are_skipped_copies_count_once_and_a_reviewer_can_revise(tmp_path):
    old, new, reviews = tmp_path / "old", tmp_path / "new", tmp_path / "reviews"
    write_review_sample(records(new="Older"), old, rows=5)
    write_review_sample(records(), new, rows=5)
    fill(old, reviews / "old-round.csv", lambda row, side: side)
    first = fill(new, reviews / "ann-1.csv", lambda row, side: other(side), reviewer="Ann")
    shutil.copy(first, reviews / "ann-1 (copy).csv")
    unjudged = read_csv(new / "review.csv")[0]["id"]
    later = fill(new, reviews / "ann-2.csv", lambda row, side: "" if row["id"] == unjudged else side, reviewer="Ann")
    os.utime(later, (first.stat().st_mtime + 10,) * 2)
    fill(new, reviews / "cy.csv", lambda row, side: "tie")  # no reviewer named: the file stands for one
    found = read_verdicts(reviews, new / "review_key.json").summary()
    # Ann: 4 rows revised to wins, one loss kept from her first file; Cy: 5 ties
    assert (found["human_verdicts"], found["human_wins"], found["human_losses"], found["human_ties"]) == (10, 4, 1, 5)
    assert read_verdicts(tmp_path / "no-reviews-yet", new / "review_key.json").summary()["human_verdicts"] == 0


def test_only_verdicts_on_the_evaluated_models_answers_count_and_the_judge_is_compared(tmp_path):
    sample, reviews = tmp_path / "sample", tmp_path / "reviews"
    write_review_sample(records(), sample, rows=6)
    fill(sample, reviews / "ann.csv", lambda row, side: side)
    verdicts = read_verdicts(reviews, sample / "review_key.json")
    judged = [{**r, "judge_outcome": "win" if i % 2 else "tie"} for i, r in enumerate(records())]
    metrics = human_metrics(judged, verdicts)
    assert metrics["human_verdicts"] == metrics["judge_human_pairs"] == 6
    reviewed = {v.row for v in verdicts.verdicts}
    assert metrics["judge_human_agreement"] == sum(int(row_id[1:]) % 2 for row_id in reviewed) / 6
    retrained = [{**r, "finetuned_answer": "New words"} if r["id"] in sorted(reviewed)[:4] else r for r in judged]
    assert human_metrics(retrained, verdicts)["human_verdicts"] == 2  # 4 answers changed since
    nothing = human_metrics(records(), None)
    assert nothing["human_verdicts"] == 0 and nothing["judge_human_agreement"] is None


def test_the_page_is_self_contained_and_answers_cannot_break_out_of_it(tmp_path):
    rows = records(3)
    rows[0]["finetuned_answer"] = '</script><script src="https://example.com/x.js"></script> & <b>'
    write_review_sample(rows, tmp_path, rows=3)
    page = (tmp_path / "review.html").read_text()
    assert page.count("</script>") == 2 and "<script src" not in page  # the answer stays inside the data
    head, rest = page.split('<script id="review-data" type="application/json">')
    data, tail = rest.split("</script>", 1)
    assert "\\u003c/script>\\u003cscript src=" in data
    assert any("</script><script src" in row["answer_a"] + row["answer_b"] for row in json.loads(data)["rows"])
    assert not any(word in head + tail for word in ("http:", "https:", "src=", "@import", "url("))  # nothing fetched


NODE_HARNESS = r"""
const fs = require("fs"), vm = require("vm");
const html = fs.readFileSync(process.argv[2], "utf8");
const picks = JSON.parse(process.argv[3]);
const scripts = [...html.matchAll(/<script([^>]*)>([\s\S]*?)<\/script>/g)];
class Element {
  constructor(tag) { this.tag = tag; this.children = []; this.listeners = {}; this.textContent = ""; }
  append(...nodes) { this.children.push(...nodes); }
  addEventListener(type, listener) { this.listeners[type] = listener; }
  click() {}
  remove() {}
}
const byId = {"review-data": Object.assign(new Element("script"), {textContent: scripts[0][2]})};
for (const id of ["rows", "progress", "reviewer", "download"]) byId[id] = new Element(id);
global.document = {getElementById: id => byId[id], createElement: tag => new Element(tag), body: new Element("body")};
const stored = {};
global.localStorage = {getItem: key => stored[key] ?? null, setItem: (key, value) => { stored[key] = value; }};
let blob = null;
URL.createObjectURL = made => { blob = made; return "blob:verdicts"; };
vm.runInThisContext(scripts[1][2]);
const inputs = [];
const walk = node => { if (node.tag === "input") inputs.push(node); (node.children || []).forEach(walk); };
walk(byId.rows);
picks.forEach((pick, index) => {
  const input = inputs.find(i => i.name === "verdict-" + index && i.value === pick);
  if (input) { input.checked = true; input.listeners.change(); }
});
byId.reviewer.value = " Ann ";
byId.reviewer.listeners.input();
byId.download.listeners.click();
blob.text().then(text => process.stdout.write(JSON.stringify({csv: text, progress: byId.progress.textContent})));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run the page's script")
def test_a_reviewer_picks_on_the_page_and_its_download_is_read_back(tmp_path):
    sample = tmp_path / "sample"
    rows = records(5)
    rows[2]["finetuned_answer"] = 'Quote " and comma, and\nnew line'
    write_review_sample(rows, sample, rows=5)
    new_sides = {row_id: row["new"] for row_id, row in key_of(sample)["rows"].items()}
    order = [row["id"] for row in read_csv(sample / "review.csv")]
    picks = [new_sides[order[0]], other(new_sides[order[1]]), "tie", new_sides[order[3]], ""]
    harness = tmp_path / "harness.js"
    harness.write_text(NODE_HARNESS)
    run = subprocess.run(["node", str(harness), str(sample / "review.html"), json.dumps(picks)], capture_output=True,
                         text=True, timeout=60, check=True)
    page = json.loads(run.stdout)
    assert page["progress"] == "4 of 5 judged"
    (tmp_path / "reviews").mkdir()
    (tmp_path / "reviews" / "verdicts.csv").write_text(page["csv"], encoding="utf-8", newline="")
    downloaded = read_csv(tmp_path / "reviews" / "verdicts.csv")
    assert [row["verdict"] for row in downloaded] == picks and {row["reviewer"] for row in downloaded} == {"Ann"}
    assert [row["answer_a"] for row in downloaded] == [row["answer_a"] for row in read_csv(sample / "review.csv")]
    found = read_verdicts(tmp_path / "reviews", sample / "review_key.json").summary()
    assert (found["human_verdicts"], found["human_wins"], found["human_ties"], found["human_losses"]) == (4, 2, 1, 1)


def test_a_multi_turn_row_is_reviewed_and_reported_with_its_earlier_turns(tmp_path):
    from ftpipe.config import EvaluationConfig
    from ftpipe.core.evaluation.measurements import prediction_records, side_scores
    from ftpipe.core.evaluation.metrics import task_metrics
    from ftpipe.core.evaluation.outputs import Heldout, ModelOutputs

    chat = [{"role": "system", "content": "You are the support desk."},
            {"role": "user", "content": "My order is late."}, {"role": "assistant", "content": "Which order number?"}, {"role": "user", "content": "It is 4411."},
            {"role": "assistant", "content": "It ships today."}]
    task = task_metrics(EvaluationConfig(task_type="generation"))
    heldout = Heldout.of([{"id": "c1", "messages": chat}], [], task)
    outputs = {side: ModelOutputs(ids=["c1"], answers=[answer], prompt_tokens=40.0)
               for side, answer in (("base", "Sorry."), ("finetuned", "It ships today."))}
    scores = {side: side_scores(task, produced, ["It ships today."]) for side, produced in outputs.items()}
    record = prediction_records(heldout, outputs, scores, task)[0]
    assert record["message"] == "user: My order is late.\nassistant: Which order number?\nuser: It is 4411."
    write_review_sample([record], tmp_path, rows=1)
    assert read_csv(tmp_path / "review.csv")[0]["prompt"] == record["message"]
