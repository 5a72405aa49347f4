"""Base vs fine-tuned evaluation on the held-out split: batched greedy generation, task metrics with
per-row scores, a paired bootstrap confidence interval, a general-skills forgetting probe and the eval gate.

The base model's outputs are cached on disk (keyed by base fingerprint, eval data version, decoding settings
and probe hash), so evaluating a new adapter only generates with the fine-tuned model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ftpipe.config import EvaluationConfig
from ftpipe.core.modeling import load_model_and_tokenizer
from ftpipe.core.records import read_examples
from ftpipe.core.storage import atomic_dir, file_sha256, write_text

CACHE_FORMAT = "1"  # bump when the cached content or the decoding code changes
PROBE_ROWS = 40
PROBE_MAX_NEW_TOKENS = 16
PRIMARY_METRIC = {"classification": "accuracy", "extraction": "exact_match", "generation": "rouge_l"}
UNPARSEABLE = "(unparseable)"
OTHER_LABEL = "(other)"
SHOWCASE_ROWS = 10
CELL_CHARS = 160
EPS = 1e-9
IGNORE = -100

Progress = Callable[[int, int], None]


# ---------------------------------------------------------------- tokens and generation


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of already-templated text (the chat template carries any special tokens itself)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _pad(sequences: list[list[int]], pad_id: int, *, left: bool):
    """(input_ids, attention_mask) tensors, padded on the left (generation) or the right (scoring)."""
    import torch

    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids of the model's generation config and of the tokenizer."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


def _cut_at_stop(ids: list[int], stops: list[int]) -> list[int]:
    return next((ids[:i] for i, token in enumerate(ids) if token in stops), ids)


def greedy_batches(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int,
                   output_logits: bool = False) -> Iterator[tuple[list[int], list[str], Any]]:
    """Yield (row indices, answers, per-step logits or None) per batch of greedy generation.

    Rows are batched longest first (little padding), left-padded, and decoded with the KV cache.
    """
    import torch

    encoded = [_encode(tokenizer, tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True))
               for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    for indices in _chunks(order, batch_size):
        ids, mask = _pad([encoded[i] for i in indices], pad_id, left=True)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, repetition_penalty=1.0, use_cache=True, eos_token_id=stops,
                pad_token_id=pad_id, return_dict_in_generate=True, output_logits=output_logits,
            )
        new_tokens = out.sequences[:, ids.shape[1]:].tolist()
        answers = [tokenizer.decode(_cut_at_stop(seq, stops), skip_special_tokens=True).strip() for seq in new_tokens]
        yield indices, answers, torch.stack(out.logits, dim=1).float().cpu() if output_logits else None


def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int,
             progress: Progress | None = None) -> list[str]:
    """Greedy answers to chat `prompts` (in order), batched with left padding; `progress(done, total)` per batch."""
    answers: list[str] = [""] * len(prompts)
    done = 0
    for indices, texts, _ in greedy_batches(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                            batch_size=batch_size):
        for index, text in zip(indices, texts):
            answers[index] = text
        done += len(indices)
        if progress:
            progress(done, len(prompts))
    return answers


def _scored_tokens(tokenizer, conversation: list[dict]) -> tuple[list[int], int]:
    """(ids of the whole conversation, how many leading ids are prompt): the rest is the reference answer."""
    prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    if full.startswith(prompt):
        prompt_ids = _encode(tokenizer, prompt)
        return prompt_ids + _encode(tokenizer, full[len(prompt):]), len(prompt_ids)
    prompt_ids, full_ids = _encode(tokenizer, prompt), _encode(tokenizer, full)
    shared = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), len(prompt_ids))
    return full_ids, shared


def reference_loss(model, tokenizer, conversations: list[list[dict]], batch_size: int) -> tuple[float, float]:
    """(mean token loss, perplexity) of each conversation's last (assistant) message given the rest."""
    import torch
    import torch.nn.functional as F

    scored = sorted((_scored_tokens(tokenizer, c) for c in conversations), key=lambda s: -len(s[0]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for batch in _chunks(scored, batch_size):
        ids, mask = _pad([seq for seq, _ in batch], pad_id, left=False)
        labels = ids.masked_fill(mask == 0, IGNORE)
        for row, (_, prompt_len) in enumerate(batch):
            labels[row, :prompt_len] = IGNORE
        start = max(min(prompt_len for _, prompt_len in batch) - 1, 0)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                           logits_to_keep=ids.shape[1] - start).logits
        targets = labels[:, start + 1:].to(logits.device)
        total += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                 reduction="sum").item()
        count += int((targets != IGNORE).sum())
    mean = total / max(count, 1)
    return mean, math.exp(min(mean, 700.0))


# ---------------------------------------------------------------- parsing and metrics


def normalise(text: str) -> str:
    """Casefolded, punctuation removed, whitespace collapsed."""
    kept = "".join(ch for ch in text.casefold() if not unicodedata.category(ch).startswith("P"))
    return " ".join(kept.split())


def first_json_object(text: str) -> dict | None:
    """The first `{...}` in `text` that parses as a JSON object (text around it is ignored)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def parse_label(text: str, label_field: str | None = None) -> str | None:
    """The normalised label in `text`: JSON field `label_field` when given, else the whole text; None if absent."""
    if label_field:
        found = first_json_object(text)
        if found is None or found.get(label_field) is None:
            return None
        text = str(found[label_field])
    return normalise(text) or None


def macro_f1(expected: list[str], predicted: list[str | None]) -> float:
    """Mean F1 over the labels seen in `expected` (a None prediction is wrong for every label)."""
    scores = []
    for label in sorted(set(expected)):
        tp = sum(e == label and p == label for e, p in zip(expected, predicted))
        fp = sum(e != label and p == label for e, p in zip(expected, predicted))
        fn = sum(e == label and p != label for e, p in zip(expected, predicted))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def _cell(text: Any) -> str:
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= CELL_CHARS else flat[: CELL_CHARS - 1] + "…"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(_cell, row)) + " |" for row in rows])


def confusion_table(expected: list[str], predicted: list[str | None]) -> str:
    """Markdown counts, reference label × predicted label; labels never seen as a reference go to `(other)`."""
    labels = sorted(set(expected))
    column = [UNPARSEABLE if p is None else p if p in labels else OTHER_LABEL for p in predicted]
    columns = labels + [c for c in (OTHER_LABEL, UNPARSEABLE) if c in column or c == UNPARSEABLE]
    counts = Counter(zip(expected, column))
    rows = [[label, *(counts[label, c] for c in columns)] for label in labels]
    return markdown_table(["reference / predicted", *columns], rows)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def token_f1(answer: str, reference: str) -> float:
    """SQuAD-style F1 over normalised words."""
    got, want = normalise(answer).split(), normalise(reference).split()
    if not got or not want:
        return float(got == want)
    overlap = sum((Counter(got) & Counter(want)).values())
    return 0.0 if overlap == 0 else 2 * overlap / (len(got) + len(want))


class _WordTokenizer:
    """Unicode-aware words for rouge_score (its default drops every non-ASCII character)."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return normalise(text).split()


def classification_scores(answers: list[str], references: list[str], label_field: str | None) -> dict[str, Any]:
    expected = [parse_label(r, label_field) or normalise(r) for r in references]
    predicted = [parse_label(a, label_field) for a in answers]
    return {
        "rows": {"accuracy": [float(p == e) for e, p in zip(expected, predicted)]},
        "summary": {"macro_f1": macro_f1(expected, predicted)},
        "labels": {"expected": expected, "predicted": predicted},
    }


def _field_hits(wanted: dict, got: dict | None) -> dict[str, float]:
    got = got or {}
    return {key: float(key in got and got[key] == value) for key, value in wanted.items()}


def extraction_scores(answers: list[str], references: list[str]) -> dict[str, Any]:
    wanted = [first_json_object(r) or {} for r in references]
    got = [first_json_object(a) for a in answers]
    hits = [_field_hits(w, g) for w, g in zip(wanted, got)]
    by_field: dict[str, list[float]] = {}
    for row in hits:
        for key, hit in row.items():
            by_field.setdefault(key, []).append(hit)
    return {
        "rows": {
            "exact_match": [float(g == w) for g, w in zip(got, wanted)],
            "json_valid": [float(g is not None) for g in got],
            "field_accuracy": [_mean(list(row.values())) for row in hits],
        },
        "summary": {"field_accuracy_by_field": {key: _mean(values) for key, values in sorted(by_field.items())}},
    }


def generation_scores(answers: list[str], references: list[str]) -> dict[str, Any]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    return {
        "rows": {
            "rouge_l": [scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references)],
            "token_f1": [token_f1(a, r) for a, r in zip(answers, references)],
            "exact_match": [float(normalise(a) == normalise(r)) for a, r in zip(answers, references)],
        },
        "summary": {},
    }


def task_scores(config: EvaluationConfig, answers: list[str], references: list[str]) -> dict[str, Any]:
    """{rows: per-row scores by metric, summary: every metric's value, labels (classification only)}."""
    if config.task_type == "classification":
        scores = classification_scores(answers, references, config.label_field)
    elif config.task_type == "extraction":
        scores = extraction_scores(answers, references)
    else:
        scores = generation_scores(answers, references)
    scores["summary"] = {**{name: _mean(values) for name, values in scores["rows"].items()}, **scores["summary"]}
    return scores


def check_references(rows: list[dict], config: EvaluationConfig) -> None:
    """Refuse references the metrics cannot read (before any generation)."""
    references = [row["messages"][-1]["content"] for row in rows]
    if config.task_type == "extraction":
        bad = [row["id"] for row, ref in zip(rows, references) if first_json_object(ref) is None]
        problem = "is not a JSON object"
    elif config.task_type == "classification" and config.label_field:
        bad = [row["id"] for row, ref in zip(rows, references) if parse_label(ref, config.label_field) is None]
        problem = f"has no JSON field {config.label_field!r}"
    else:
        return
    if bad:
        raise ValueError(f"{len(bad)} held-out reference(s) {problem} (task_type {config.task_type}); ids: {bad[:5]}")


# ---------------------------------------------------------------- statistics and the gate


def paired_bootstrap(base_scores, tuned_scores, samples: int, seed: int,
                     chunk: int = 256) -> tuple[float, float, float]:
    """(mean(tuned - base), 2.5th and 97.5th percentile of that mean over `samples` paired resamples of rows)."""
    import numpy as np

    diffs = np.asarray(tuned_scores, dtype=float) - np.asarray(base_scores, dtype=float)
    if diffs.size == 0:
        raise ValueError("paired_bootstrap needs at least one row")
    rng = np.random.default_rng(seed)
    means = np.concatenate([
        diffs[rng.integers(0, diffs.size, size=(min(chunk, samples - start), diffs.size))].mean(axis=1)
        for start in range(0, samples, chunk)
    ])
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diffs.mean()), float(low), float(high)


def forgetting_score(base_accuracy: float, tuned_accuracy: float, base_loss: float, tuned_loss: float) -> float:
    """Relative worsening on the general-skills probe:

        max(0, (base_acc - tuned_acc) / max(base_acc, eps), (tuned_loss - base_loss) / max(base_loss, eps))

    i.e. the larger of the relative accuracy drop and the relative reference-loss increase, floored at 0.
    """
    accuracy_drop = (base_accuracy - tuned_accuracy) / max(base_accuracy, EPS)
    loss_increase = (tuned_loss - base_loss) / max(base_loss, EPS)
    return max(0.0, accuracy_drop, loss_increase)


def failed_conditions(result: dict[str, Any], config: EvaluationConfig) -> list[str]:
    """The gate's unmet conditions as sentences with the numbers (empty: passed)."""
    failures = []
    if not result["delta_ci_low"] >= config.min_improvement:
        failures.append(
            f"delta_ci_low {result['delta_ci_low']:.4f} < min_improvement {config.min_improvement:.4f} "
            f"({result['primary_metric']} {result['base_score']:.4f} -> {result['finetuned_score']:.4f})"
        )
    if not result["forgetting"] <= config.max_forgetting:
        failures.append(
            f"forgetting {result['forgetting']:.4f} > max_forgetting {config.max_forgetting:.4f} "
            f"(probe accuracy {result['probe_base_accuracy']:.3f} -> {result['probe_finetuned_accuracy']:.3f}, "
            f"probe loss {result['probe_base_loss']:.4f} -> {result['probe_finetuned_loss']:.4f})"
        )
    return failures


# ---------------------------------------------------------------- probe, cache, model outputs


def read_probe(path: Path, limit: int) -> list[dict]:
    """The first `limit` rows of the probe JSONL: {id, skill, messages (ending with a user turn), reference}."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit]


def contains_reference(answer: str, reference: str) -> bool:
    """The normalised reference appears as whole words in the normalised answer."""
    return f" {normalise(reference)} " in f" {normalise(answer)} "


def select_rows(rows: list[dict], max_rows: int | None) -> list[dict]:
    """The first `max_rows` rows by id (all when None)."""
    return sorted(rows, key=lambda row: row["id"])[:max_rows]


def base_cache_key(*, base_fingerprint: str, eval_version: str, config: EvaluationConfig, probe_hash: str | None,
                   probe_rows: int, device: str) -> str:
    settings = {
        "format": CACHE_FORMAT, "base": base_fingerprint, "eval": eval_version, "max_rows": config.max_rows,
        "max_new_tokens": config.max_new_tokens, "batch_size": config.batch_size, "probe": probe_hash,
        "probe_rows": probe_rows, "probe_max_new_tokens": PROBE_MAX_NEW_TOKENS, "device": device,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def read_cached(path: Path, rows: list[dict]) -> dict | None:
    """Cached base outputs, if present and made for exactly these rows."""
    if not path.is_file():
        return None
    cached = json.loads(path.read_text())
    return cached if cached.get("ids") == [row["id"] for row in rows] else None


def model_outputs(model, tokenizer, rows: list[dict], probe: list[dict], config: EvaluationConfig,
                  log: Callable[[str], None], name: str) -> dict[str, Any]:
    """One model's answers and reference loss on the held-out rows and on the probe."""
    prompts = [row["messages"][:-1] for row in rows]
    answers = generate(model, tokenizer, prompts, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                       progress=lambda done, total: log(f"{name}: generated {done}/{total} held-out rows"))
    loss, perplexity = reference_loss(model, tokenizer, [row["messages"] for row in rows], config.batch_size)
    outputs = {"ids": [row["id"] for row in rows], "answers": answers, "loss": loss, "perplexity": perplexity}
    if probe:
        probe_prompts = [p["messages"] for p in probe]
        probe_answers = generate(model, tokenizer, probe_prompts, max_new_tokens=PROBE_MAX_NEW_TOKENS,
                                 batch_size=config.batch_size)
        conversations = [p["messages"] + [{"role": "assistant", "content": p["reference"]}] for p in probe]
        probe_loss, _ = reference_loss(model, tokenizer, conversations, config.batch_size)
        outputs.update(probe_answers=probe_answers, probe_loss=probe_loss)
    log(f"{name}: held-out loss {loss:.4f} (perplexity {perplexity:.2f})")
    return outputs


def probe_accuracy(outputs: dict[str, Any], probe: list[dict]) -> float:
    return _mean([float(contains_reference(a, p["reference"])) for a, p in zip(outputs["probe_answers"], probe)])


def cached_base_outputs(model, tokenizer, rows: list[dict], probe: list[dict], config: EvaluationConfig,
                        cache_file: Path, log: Callable[[str], None]) -> tuple[dict[str, Any], bool]:
    """(base model outputs, whether they came from `cache_file`); generated and cached on a miss."""
    cached = read_cached(cache_file, rows)
    if cached is not None:
        log(f"base: outputs from cache {cache_file.name}")
        return cached, True
    outputs = model_outputs(model, tokenizer, rows, probe, config, log, "base")
    write_text(cache_file, json.dumps(outputs))
    return outputs, False


def load_tuned(base_model, adapter_dir: Path, trust_remote_code: bool):
    """The fine-tuned model: a LoRA/QLoRA adapter applied to `base_model`, or a full fine-tune loaded whole."""
    if (adapter_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()
    model, _ = load_model_and_tokenizer(adapter_dir, method="full", trust_remote_code=trust_remote_code)
    return model.eval()


# ---------------------------------------------------------------- comparison, report, outputs


def compare(rows: list[dict], probe: list[dict], base: dict, tuned: dict,
            config: EvaluationConfig) -> tuple[dict, dict, dict]:
    """(result, base scores, tuned scores): metrics of both models, bootstrap CI of the primary metric's delta,
    forgetting and the gate."""
    references = [row["messages"][-1]["content"] for row in rows]
    base_scores = task_scores(config, base["answers"], references)
    tuned_scores = task_scores(config, tuned["answers"], references)
    primary = PRIMARY_METRIC[config.task_type]
    delta, low, high = paired_bootstrap(base_scores["rows"][primary], tuned_scores["rows"][primary],
                                        config.bootstrap_samples, seed=0)
    probe_part = {"probe_rows": len(probe), "probe_base_accuracy": None, "probe_finetuned_accuracy": None,
                  "probe_base_loss": None, "probe_finetuned_loss": None, "forgetting": 0.0}
    if probe:
        probe_part.update(
            probe_base_accuracy=probe_accuracy(base, probe), probe_finetuned_accuracy=probe_accuracy(tuned, probe),
            probe_base_loss=base["probe_loss"], probe_finetuned_loss=tuned["probe_loss"],
        )
        probe_part["forgetting"] = forgetting_score(probe_part["probe_base_accuracy"],
                                                    probe_part["probe_finetuned_accuracy"],
                                                    base["probe_loss"], tuned["probe_loss"])
    result = {
        "primary_metric": primary,
        "base_score": base_scores["summary"][primary],
        "finetuned_score": tuned_scores["summary"][primary],
        "delta": delta, "delta_ci_low": low, "delta_ci_high": high,
        **probe_part,
        "base_loss": base["loss"], "finetuned_loss": tuned["loss"],
        "base_perplexity": base["perplexity"], "finetuned_perplexity": tuned["perplexity"],
        "rows": len(rows),
        "metrics": {"base": base_scores["summary"], "finetuned": tuned_scores["summary"]},
    }
    result["failed_conditions"] = failed_conditions(result, config)
    result["passed"] = not result["failed_conditions"]
    return result, base_scores, tuned_scores


def prompt_text(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages[:-1])


def prediction_rows(rows, base, tuned, base_scores, tuned_scores, primary: str) -> list[dict[str, Any]]:
    """One record per held-out row: prompt, reference, both answers, both models' per-row scores, primary delta."""
    records = []
    for i, row in enumerate(rows):
        record = {"id": row["id"], "prompt": prompt_text(row["messages"]), "reference": row["messages"][-1]["content"],
                  "base_answer": base["answers"][i], "finetuned_answer": tuned["answers"][i]}
        for side, scores in (("base", base_scores), ("finetuned", tuned_scores)):
            record.update({f"{side}_{name}": values[i] for name, values in scores["rows"].items()})
            if "labels" in scores:
                record[f"{side}_label"] = scores["labels"]["predicted"][i] or UNPARSEABLE
        record["delta"] = tuned_scores["rows"][primary][i] - base_scores["rows"][primary][i]
        records.append(record)
    return records


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def summary_table(result: dict[str, Any]) -> str:
    base, tuned = result["metrics"]["base"], result["metrics"]["finetuned"]
    names = [name for name, value in base.items() if isinstance(value, float)]
    rows = [[name, _fmt(base[name]), _fmt(tuned[name]), _fmt(tuned[name] - base[name])] for name in names]
    rows += [
        ["held-out loss", _fmt(result["base_loss"]), _fmt(result["finetuned_loss"]), ""],
        ["held-out perplexity", _fmt(result["base_perplexity"]), _fmt(result["finetuned_perplexity"]), ""],
        ["probe accuracy", _fmt(result["probe_base_accuracy"]), _fmt(result["probe_finetuned_accuracy"]), ""],
        ["probe loss", _fmt(result["probe_base_loss"]), _fmt(result["probe_finetuned_loss"]), ""],
    ]
    return markdown_table(["metric", "base", "fine-tuned", "delta"], rows)


def showcase(records: list[dict[str, Any]], improvements: bool) -> str:
    """The SHOWCASE_ROWS largest improvements (or worst regressions) of the primary metric, side by side."""
    sign = 1 if improvements else -1
    picked = sorted((r for r in records if sign * r["delta"] > 0), key=lambda r: (-sign * r["delta"], r["id"]))
    rows = [[r["prompt"], r["reference"], r["base_answer"], r["finetuned_answer"], _fmt(r["delta"])]
            for r in picked[:SHOWCASE_ROWS]]
    if not rows:
        return "_none_"
    return markdown_table(["prompt", "reference", "base answer", "fine-tuned answer", "delta"], rows)


def report_markdown(result: dict[str, Any], records: list[dict], confusion: dict[str, str]) -> str:
    verdict = "PASSED" if result["passed"] else "FAILED: " + "; ".join(result["failed_conditions"])
    probe = (f"forgetting {result['forgetting']:.4f} on {result['probe_rows']} probe rows"
             if result["probe_rows"] else "forgetting not checked (no probe file)")
    parts = [
        "# Evaluation: base vs fine-tuned", f"**Eval gate: {verdict}**",
        f"Primary metric `{result['primary_metric']}` on {result['rows']} held-out rows: delta {result['delta']:+.4f} "
        f"(95% paired-bootstrap CI {result['delta_ci_low']:+.4f} … {result['delta_ci_high']:+.4f}); {probe}. "
        f"Base outputs {'from cache' if result['base_cached'] else 'generated'}.",
        summary_table(result),
    ]
    for side, table in confusion.items():
        parts += [f"## Confusion table ({side})", table]
    parts += ["## Largest improvements", showcase(records, True), "## Worst regressions", showcase(records, False)]
    return "\n\n".join(parts) + "\n"


def write_outputs(out_dir: Path, result: dict[str, Any], records: list[dict]) -> None:
    """report.md, predictions.parquet and metrics.json into `out_dir`, replaced atomically."""
    import pandas as pd

    with atomic_dir(out_dir) as tmp:
        (tmp / "report.md").write_text(result["report_markdown"], encoding="utf-8")
        pd.DataFrame(records).to_parquet(tmp / "predictions.parquet", index=False)
        metrics = {key: value for key, value in result.items() if key != "report_markdown"}
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))


def run_evaluation(*, base_model_dir: Path | str, base_fingerprint: str, adapter_dir: Path | str,
                   eval_path: Path | str, eval_version: str, probe_path: Path | str | None,
                   config: EvaluationConfig, cache_dir: Path | str, out_dir: Path | str,
                   trust_remote_code: bool = False, log: Callable[[str], None] = print,
                   probe_rows: int = PROBE_ROWS) -> dict[str, Any]:
    """Evaluate base vs fine-tuned on the held-out rows and the probe; write `out_dir`; return the eval_report dict.

    The base model is loaded once; its outputs come from `cache_dir` when this base, eval split, decoding setup
    and probe were evaluated before. The adapter is then applied to that same model. `probe_path` None skips
    the forgetting check (forgetting 0).

    `out_dir` gets report.md, predictions.parquet (one row per held-out example: prompt, reference, both
    answers, both models' per-row scores, delta) and metrics.json. The returned dict has the eval_report
    contract keys (primary_metric, base_score, finetuned_score, delta, delta_ci_low, delta_ci_high, forgetting,
    passed) and base_cached, failed_conditions, report_markdown, base/finetuned loss and perplexity, probe
    accuracies and losses, rows, metrics (every metric of both models) and the paths of the three files.
    """
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    rows = select_rows(read_examples(Path(eval_path)), config.max_rows)
    if not rows:
        raise ValueError(f"{eval_path}: no held-out rows to evaluate")
    check_references(rows, config)
    probe = read_probe(Path(probe_path), probe_rows) if probe_path else []
    # full precision (never 4-bit), so a QLoRA adapter is judged on the weights a merge will use
    model, tokenizer = load_model_and_tokenizer(base_model_dir, method="full", trust_remote_code=trust_remote_code)
    model.eval()
    key = base_cache_key(base_fingerprint=base_fingerprint, eval_version=eval_version, config=config,
                         probe_hash=file_sha256(Path(probe_path)) if probe_path else None,
                         probe_rows=len(probe), device=model.device.type)
    base, base_cached = cached_base_outputs(model, tokenizer, rows, probe, config, cache_dir / f"base-{key}.json", log)
    tuned = model_outputs(load_tuned(model, Path(adapter_dir), trust_remote_code), tokenizer, rows, probe, config,
                          log, "fine-tuned")
    result, base_scores, tuned_scores = compare(rows, probe, base, tuned, config)
    result["base_cached"] = base_cached
    records = prediction_rows(rows, base, tuned, base_scores, tuned_scores, result["primary_metric"])
    confusion = {side: confusion_table(scores["labels"]["expected"], scores["labels"]["predicted"])
                 for side, scores in (("fine-tuned", tuned_scores), ("base", base_scores)) if "labels" in scores}
    result["report_markdown"] = report_markdown(result, records, confusion)
    result.update(report_path=str(out_dir / "report.md"), predictions_path=str(out_dir / "predictions.parquet"),
                  metrics_path=str(out_dir / "metrics.json"))
    write_outputs(out_dir, result, records)
    log(f"eval gate {'passed' if result['passed'] else 'failed'}: {result['primary_metric']} "
        f"{result['base_score']:.4f} -> {result['finetuned_score']:.4f}, forgetting {result['forgetting']:.4f}")
    return result


# ---------------------------------------------------------------- MLflow


def log_to_mlflow(run_id: str, result: dict[str, Any], predictions_path: Path | str,
                  tracking_uri: str | None = None) -> None:
    """Log the numeric results (prefixed `eval_`), the report and the predictions table to an existing run."""
    import pandas as pd
    from mlflow import MlflowClient

    from ftpipe.core.tracking import RunLogger, tracking_uri as default_uri

    client = MlflowClient(tracking_uri=tracking_uri or default_uri())
    numbers = {f"eval_{key}": float(value) for key, value in result.items()
               if isinstance(value, (int, float))}
    for side in ("base", "finetuned"):
        numbers.update({f"eval_{side}_{name}": value for name, value in result["metrics"][side].items()
                        if isinstance(value, float)})
    RunLogger(client, run_id).log_metrics(numbers, step=0)
    client.set_tag(run_id, "eval_passed", str(result["passed"]).lower())
    client.log_text(run_id, result["report_markdown"], "evaluation/report.md")
    client.log_table(run_id, data=pd.read_parquet(predictions_path), artifact_file="evaluation/predictions.json")
