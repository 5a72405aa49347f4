"""Package a fine-tuned model for serving: merge a LoRA adapter into a full-precision base and prove parity, or
take a full fine-tune as trained (nothing to merge). Either way the model dir holds safetensors weights, the
tokenizer with its chat template, a model card, vLLM and Ollama files (`serving_files`) and a typed result."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

from ftpipe.core.evaluation.chart import CHART
from ftpipe.core.evaluation.generation import (
    ADAPTER_CONFIG, generate, greedy_batches, is_adapter, load_finetuned, load_model, stop_token_ids,
)
from ftpipe.core.layout import MODEL_CARD
from ftpipe.core.modeling import hub_id
from ftpipe.core.records import read_examples
from ftpipe.core.results import Result, reusable
from ftpipe.core.storage import atomic_dir, exclusive
from ftpipe.core.text import markdown_table
from ftpipe.core.training.methods import PREFERENCE_OBJECTIVES
from ftpipe.core.serving_files import (
    ADAPTER_COPY, default_system_prompt, ollama_modelfile, serve_script, serving_commands, serving_markdown,
)

RESULT_KIND = "merged_model"
PARITY_MAX_NEW_TOKENS = 24
PARITY_ROWS = 16  # held-out prompts the merged model must answer as base + adapter does
PARITY_BATCH_TOKENS = 4096  # the shortest prompts in one batch (one run of decoding steps); its logits are kept
PARITY_TOLERANCE = {"float32": 1e-3, "float16": 0.25, "bfloat16": 0.5}  # largest |logit difference| accepted
ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors")
FULL_MODEL_PARITY = {
    "parity_max_abs_diff": 0.0, "parity_rows": 0, "parity_identical_outputs": True,
    "parity_check": "not needed: a full fine-tune is served with the very weights it was trained and evaluated "
                    "with; nothing was merged",
}


class ParityError(RuntimeError):
    """The merged model does not behave like base + adapter."""


# ---------------------------------------------------------------- merge and parity


def parity_prompts(eval_path: Path, count: int) -> list[list[dict]]:
    """The `count` shortest held-out prompts (in characters, then by id): parity holds or fails on any prompt, and a
    pasted 1,500-word email would only make the check slow."""
    rows = sorted(read_examples(eval_path), key=lambda row: (sum(len(m["content"]) for m in row["messages"][:-1]),
                                                            row["id"]))
    prompts = [row["messages"][:-1] for row in rows[:count]]
    if not prompts:
        raise ValueError(f"{eval_path}: no held-out rows for the parity check")
    return prompts


def greedy_with_logits(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> tuple[list[str], list]:
    """Greedy answers and each row's per-step logits, in prompt order."""
    answers, logits = [""] * len(prompts), [None] * len(prompts)
    for batch in greedy_batches(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                batch_tokens=PARITY_BATCH_TOKENS, output_logits=True):
        for index, text, steps in zip(batch.indices, batch.answers, batch.logits):
            answers[index], logits[index] = text, steps
    return answers, logits


def max_abs_diff(left: list, right: list) -> float:
    """Largest |a - b| over the decoding steps both runs made, row by row."""
    largest = 0.0
    for a, b in zip(left, right):
        steps = min(a.shape[0], b.shape[0])
        largest = max(largest, float((a[:steps] - b[:steps]).abs().max()))
    return largest


def merge(peft_model):
    """Fold the adapter weights into the base weights (a plain transformers model comes back)."""
    return peft_model.merge_and_unload()


def check_parity(before: tuple[list[str], list], after: tuple[list[str], list], dtype: str) -> dict[str, Any]:
    """{parity_max_abs_diff, parity_rows, parity_identical_outputs, parity_check}; raises ParityError when they
    disagree."""
    differing = [i for i, (a, b) in enumerate(zip(before[0], after[0])) if a != b]
    diff = max_abs_diff(before[1], after[1])
    tolerance = PARITY_TOLERANCE.get(dtype, PARITY_TOLERANCE["bfloat16"])
    if differing or diff > tolerance:
        raise ParityError(
            f"merged model differs from base + adapter: {len(differing)}/{len(before[0])} greedy outputs differ "
            f"(prompts {differing[:5]}), largest |logit difference| {diff:.3g} (tolerance {tolerance:g} for {dtype})"
        )
    return {"parity_max_abs_diff": diff, "parity_rows": len(before[0]), "parity_identical_outputs": True,
            "parity_check": f"on {len(before[0])} held-out prompts the merged model's greedy outputs equal base + "
                            f"adapter; largest |logit difference| {diff:.3g}"}


# ---------------------------------------------------------------- model card


def flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level with dotted names (`lora.r`), without those left unset (None)."""
    items: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            items.update(flat(value, f"{prefix}{key}."))
        elif value is not None:
            items[f"{prefix}{key}"] = value
    return items


def as_trained(training: dict[str, Any]) -> dict[str, Any]:
    """The training settings that shaped the weights: the preference stage's only when it ran, where the training ran
    (launcher, processes, nodes) only when more than one process took part."""
    single = training.get("num_processes", 1) * training.get("nnodes", 1) == 1
    left_out = {"launcher", "num_processes", "nnodes", "rdzv_endpoint", "k8s"} if single else set()
    if not set(training.get("stages", ())) & set(PREFERENCE_OBJECTIVES):
        left_out.add("preference")
    return {key: value for key, value in training.items() if key not in left_out}


def _section(title: str, values: dict[str, Any]) -> str:
    if not values:
        return ""
    rows = [[key, json.dumps(value) if isinstance(value, (dict, list)) else value] for key, value in values.items()]
    return f"## {title}\n\n{markdown_table(['name', 'value'], rows)}\n\n"


def model_card(card: dict[str, Any], parity: dict[str, Any], serving: str, *, merged: bool,
               weights: str) -> str:
    """README.md: YAML front matter for model hubs, then what the model is (task description, base, how it was
    trained, the `weights`' dtype), how good (metrics, parity), the training's own settings and how to serve it.

    Known keys of `card`: task, description, system_prompt, base_model, method (as trained), data_versions, data
    (row counts), evaluation (Markdown), evaluation_chart (the PNG it links, copied beside the card), hyperparameters
    (the training config as recorded by the training); any other key is listed under Details.
    """
    known = {"task", "base_model", "description", "system_prompt", "method", "data_versions", "data", "evaluation",
             "evaluation_chart", "hyperparameters"}
    task, method, base = card.get("task", "model"), card.get("method", "lora"), card.get("base_model", "?")
    stages = card.get("hyperparameters", {}).get("stages", ())
    preference = [stage for stage in stages if stage in PREFERENCE_OBJECTIVES]
    tags = ["ftpipe", task, method, *preference, "merged" if merged else "full-fine-tune"]
    hub = hub_id(str(base))  # the hub checks base_model against its models: none for a model of your own
    front_matter = {"base_model": hub} if hub else {}
    front_matter.update({"library_name": "transformers", "tags": tags})
    front = "---\n" + "".join(f"{key}: {json.dumps(value)}\n" for key, value in front_matter.items()) + "---\n\n"
    how = (f"and merged into {weights} weights" if merged
           else "as a full fine-tune: every weight was trained, so there was nothing to merge")
    description = f"{card['description'].strip()}\n\n" if card.get("description") else ""
    intro = f"# ftpipe-{task}\n\n{description}Base model `{base}`, fine-tuned with `{method}` by ftpipe {how}.\n\n"
    if card.get("system_prompt"):
        quoted = "\n".join(f"> {line}".rstrip() for line in card["system_prompt"].splitlines())
        intro += f"System prompt (the default when a conversation has none):\n\n{quoted}\n\n"
    return (front + intro + _section("Data", card.get("data", {}))
            + _section("Data versions", card.get("data_versions", {}))
            + f"## Evaluation\n\n{card.get('evaluation', 'Not evaluated.')}\n\nParity: {parity['parity_check']}.\n\n"
            + _section("Hyperparameters (as trained)", flat(as_trained(card.get("hyperparameters", {}))))
            + _section("Details", {k: v for k, v in card.items() if k not in known}) + serving)


def card_body(model_dir: Path | str) -> str:
    """The model card of `model_dir` without its YAML front matter, for Markdown views (the Dagster UI) that would
    render the front matter as a heading."""
    text = (Path(model_dir) / MODEL_CARD).read_text(encoding="utf-8")
    return text.split("\n---\n", 1)[1].lstrip("\n") if text.startswith("---\n") else text


# ---------------------------------------------------------------- the model dir


def write_model_dir(tmp: Path, model, tokenizer, files: dict[str, str]) -> None:
    """Weights (safetensors), generation config, tokenizer with chat template, and the text `files`."""
    model.generation_config.eos_token_id = stop_token_ids(model, tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name, text in files.items():
        (tmp / name).write_text(text, encoding="utf-8")
    (tmp / "serve.sh").chmod(0o755)


def _publish(out_dir: Path, model, tokenizer, card: dict[str, Any], parity: dict[str, Any], result: Result,
             lora: tuple[Path, Path] | None) -> dict[str, Any]:
    """Write the servable model dir atomically (with the adapter's copy for a merge); return its facts."""
    task, system = card.get("task", "model"), card.get("system_prompt")
    commands = serving_commands(task, out_dir, lora)
    serving = serving_markdown(task, commands, system)
    files = {
        MODEL_CARD: model_card(card, parity, serving, merged=lora is not None,
                               weights=str(model.dtype).removeprefix("torch.")),
        "SERVING.md": f"# Serving ftpipe-{task}\n\n" + serving,
        "serve.sh": serve_script(commands),
        "Modelfile": ollama_modelfile(out_dir, model, tokenizer, system),
    }
    default_system_prompt(tokenizer, system)
    with atomic_dir(out_dir) as tmp:
        write_model_dir(tmp, model, tokenizer, files)
        if card.get("evaluation_chart"):
            shutil.copy2(card["evaluation_chart"], tmp / CHART)
        if lora:
            (tmp / ADAPTER_COPY).mkdir()
            for name in ADAPTER_FILES:
                shutil.copy2(lora[1] / name, tmp / ADAPTER_COPY / name)
        result.write(tmp)
    return {"model_path": str(out_dir), **parity}


def merge_adapter(*, base_model_dir: Path | str, adapter_dir: Path | str, out_dir: Path | str,
                  eval_path: Path | str, card: dict[str, Any], reuse_key: str, trust_remote_code: bool = False,
                  parity_rows: int = PARITY_ROWS, max_new_tokens: int = PARITY_MAX_NEW_TOKENS) -> dict[str, Any]:
    """Merge `adapter_dir` into a freshly loaded full-precision base (fp32 on CPU, bf16 on GPU; never 4-bit, so a
    QLoRA adapter merges cleanly), check parity on `parity_rows` held-out prompts and write `out_dir` atomically.

    Returns {model_path, parity_max_abs_diff, parity_rows, parity_identical_outputs, parity_check}; raises
    ParityError.
    """
    base_model_dir, adapter_dir, out_dir = Path(base_model_dir), Path(adapter_dir), Path(out_dir)
    if not is_adapter(adapter_dir):
        raise ValueError(f"{adapter_dir}: not a LoRA adapter (no {ADAPTER_CONFIG}); package a full fine-tune "
                         "with package_full_model")
    adapted, tokenizer = load_finetuned(adapter_dir, lambda: load_model(base_model_dir, trust_remote_code))
    prompts = parity_prompts(Path(eval_path), parity_rows)
    before = greedy_with_logits(adapted, tokenizer, prompts, max_new_tokens)
    merged = merge(adapted).eval()
    parity = check_parity(before, greedy_with_logits(merged, tokenizer, prompts, max_new_tokens),
                          str(merged.dtype).removeprefix("torch."))
    result = Result(kind=RESULT_KIND, reuse_key=reuse_key, produced={"merged": True, "parity": parity},
                    inputs={"base_model": str(base_model_dir), "finetuned": str(adapter_dir)})
    return _publish(out_dir, merged, tokenizer, card, parity, result, lora=(base_model_dir, adapter_dir))


def package_full_model(*, model_dir: Path | str, out_dir: Path | str, card: dict[str, Any], reuse_key: str,
                       trust_remote_code: bool = False) -> dict[str, Any]:
    """Package a full fine-tune for serving like a merge, without merging: its own weights and tokenizer, the
    model card, serving files (no LoRA command: there is no adapter) and a parity record that says why no parity
    check was needed. Returns the same keys as `merge_adapter`."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if is_adapter(model_dir):
        raise ValueError(f"{model_dir}: a LoRA adapter, not a full model; merge it with merge_adapter")
    model, tokenizer = load_model(model_dir, trust_remote_code)
    result = Result(kind=RESULT_KIND, reuse_key=reuse_key, produced={"merged": False, "parity": FULL_MODEL_PARITY},
                    inputs={"base_model": None, "finetuned": str(model_dir)})
    return _publish(out_dir, model, tokenizer, card, FULL_MODEL_PARITY, result, lora=None)


def package_model(*, base_model_dir: Path | str, finetuned_dir: Path | str, out_dir: Path | str,
                  eval_path: Path | str, card: dict[str, Any], reuse_key: str,
                  trust_remote_code: bool = False) -> dict[str, Any]:
    """The servable model of a training's output: `merge_adapter` for an adapter, `package_full_model` for a
    full fine-tune. One writer at a time: a model another run packaged meanwhile is reused, not written again."""
    with exclusive(Path(out_dir).parent):
        found = packaged(out_dir, reuse_key)
        if found is not None:
            return found
        if is_adapter(finetuned_dir):
            return merge_adapter(base_model_dir=base_model_dir, adapter_dir=finetuned_dir, out_dir=out_dir,
                                 eval_path=eval_path, card=card, reuse_key=reuse_key,
                                 trust_remote_code=trust_remote_code)
        return package_full_model(model_dir=finetuned_dir, out_dir=out_dir, card=card, reuse_key=reuse_key,
                                  trust_remote_code=trust_remote_code)


def packaged(model_dir: Path | str, reuse_key: str) -> dict[str, Any] | None:
    """The facts (`package_model`'s return value) of the model published in `model_dir` from exactly these
    inputs; None when there is none."""
    found = reusable(Path(model_dir), RESULT_KIND, reuse_key)
    if found is None:
        return None
    return {"model_path": str(model_dir), **found.produced["parity"]}


# ---------------------------------------------------------------- chat


def chat(model_dir: Path | str, messages: list[dict], max_new_tokens: int = 128, labels: list[str] | None = None) -> str:
    """One greedy assistant reply to `messages`, formatted with the model's chat template; with `labels`, the
    likeliest of them (`constrained_answers`). The model stays loaded for the next reply."""
    model, tokenizer = _loaded(str(model_dir))
    if labels:
        from ftpipe.core.evaluation.label_likelihood import constrained_answers

        return constrained_answers(model, tokenizer, [messages], labels)[0]
    return generate(model, tokenizer, [messages], max_new_tokens=max_new_tokens, batch_tokens=1)[0]


@functools.lru_cache(maxsize=1)
def _loaded(model_dir: str):
    return load_model(model_dir)
