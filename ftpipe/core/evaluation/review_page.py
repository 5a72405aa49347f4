"""The review page: one self-contained HTML file (no external assets, works offline in any browser) on which a
reviewer picks A, B or tie per row and downloads the filled verdict CSV."""

from __future__ import annotations

import json
from typing import Any

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Blind review</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 0 auto; padding: 0 1.5rem 4rem;
       color: #1d1d1f; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ccc; padding: .6rem 0;
         display: flex; gap: 1.2rem; align-items: center; flex-wrap: wrap; }
article { border: 1px solid #ccc; border-radius: 8px; margin: 1rem 0; padding: .4rem 1rem .8rem; }
article.judged { border-color: #4a4; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; font: inherit; margin: .2rem 0; padding: .5rem;
      background: #f4f4f6; border-radius: 6px; }
h2 { font-size: 1.05rem; margin: .6rem 0 0; }
h3 { margin: .7rem 0 .1rem; font-size: .8rem; text-transform: uppercase; letter-spacing: .04em; color: #555; }
.choice label { margin-right: 1.4rem; cursor: pointer; }
</style>
</head>
<body>
<header>
  <strong>Blind review</strong>
  <span id="progress"></span>
  <label>Your name <input id="reviewer" size="18"></label>
  <button id="download" type="button">Download verdicts (CSV)</button>
</header>
<p>Two models answered each request below. Which model wrote which answer is hidden, and the sides are shuffled
per row. Pick the better answer, A or B, or tie when neither is better; the reference shows what a good answer
contains. Your choices stay in this browser until you download them. When you are done, download the CSV and put
it into the task's <code>reviews/</code> folder.</p>
<main id="rows"></main>
<script id="review-data" type="application/json">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("review-data").textContent);
const storeKey = "ftpipe-review-" + data.sample;

function load() {
  try { return JSON.parse(localStorage.getItem(storeKey)) || {}; } catch (e) { return {}; }
}
const state = Object.assign({verdicts: {}, reviewer: ""}, load());
function save() {
  try { localStorage.setItem(storeKey, JSON.stringify(state)); } catch (e) { /* private mode: kept in the page */ }
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}
function block(title, text) {
  const box = element("div");
  box.append(element("h3", title), element("pre", text));
  return box;
}
function showProgress() {
  const done = data.rows.filter(row => state.verdicts[row.id]).length;
  document.getElementById("progress").textContent = done + " of " + data.rows.length + " judged";
}

data.rows.forEach((row, index) => {
  const article = element("article", undefined, state.verdicts[row.id] ? "judged" : "");
  article.append(element("h2", "Request " + (index + 1) + " of " + data.rows.length), block("Request", row.prompt));
  if (row.context !== row.prompt) {
    const details = element("details");
    details.append(element("summary", "Whole conversation"), element("pre", row.context));
    article.append(details);
  }
  article.append(block("Reference answer", row.reference));
  const pair = element("div", undefined, "pair");
  pair.append(block("Answer A", row.answer_a), block("Answer B", row.answer_b));
  const choice = element("div", undefined, "choice");
  for (const option of data.verdicts) {
    const label = element("label");
    const input = element("input");
    input.type = "radio";
    input.name = "verdict-" + index;
    input.value = option;
    input.checked = state.verdicts[row.id] === option;
    input.addEventListener("change", () => {
      state.verdicts[row.id] = option;
      article.className = "judged";
      save();
      showProgress();
    });
    label.append(input, " " + (option === "tie" ? "Tie" : option + " is better"));
    choice.append(label);
  }
  article.append(pair, choice);
  document.getElementById("rows").append(article);
});

const reviewer = document.getElementById("reviewer");
reviewer.value = state.reviewer;
reviewer.addEventListener("input", () => { state.reviewer = reviewer.value.trim(); save(); });

function csvCell(value) {
  return '"' + String(value).replace(/"/g, '""') + '"';
}
function verdictCsv() {
  const who = state.reviewer || (state.reviewer = "anonymous-" + Math.random().toString(36).slice(2, 10));
  save();
  const lines = [data.columns.map(csvCell).join(",")];
  for (const row of data.rows) {
    const values = {sample: data.sample, verdict: state.verdicts[row.id] || "", reviewer: who};
    lines.push(data.columns.map(column => csvCell(column in values ? values[column] : row[column])).join(","));
  }
  return "\\ufeff" + lines.join("\\r\\n") + "\\r\\n";
}
document.getElementById("download").addEventListener("click", () => {
  const link = element("a");
  link.href = URL.createObjectURL(new Blob([verdictCsv()], {type: "text/csv;charset=utf-8"}));
  link.download = "verdicts-" + data.sample + ".csv";
  document.body.append(link);
  link.click();
  link.remove();
});
showProgress();
</script>
</body>
</html>
"""


def review_page(data: dict[str, Any]) -> str:
    """The page for `data` ({sample, columns, verdicts, rows: [{id, prompt, context, reference, answer_a,
    answer_b}]}), embedded as JSON that no answer text can break out of."""
    return PAGE.replace("__DATA__", json.dumps(data, ensure_ascii=False).replace("<", "\\u003c"))
