"""Merge an adapter into a full-precision base, prove parity, write a servable model dir (safetensors, tokenizer,
chat template, model card, vLLM and Ollama files), and register it in the MLflow model registry where the
`champion` alias follows the best evaluated version."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any

from ftpipe.core.evaluation import generate, greedy_batches, markdown_table, select_rows, stop_token_ids
from ftpipe.core.modeling import load_model_and_tokenizer
from ftpipe.core.records import read_examples
from ftpipe.core.storage import atomic_dir

PARITY_MAX_NEW_TOKENS = 24
PARITY_BATCH = 8
PARITY_TOLERANCE = {"float32": 1e-3, "float16": 0.25, "bfloat16": 0.5}  # largest |logit difference| accepted
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
CANDIDATE, CHAMPION = "candidate", "champion"
SCORE_TAG, EVAL_VERSION_TAG = "eval_score", "eval_version"
CHATML_OLLAMA_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
SENTINEL = "<<ftpipe-prompt>>"
PARITY_FILE = "parity.json"
ADAPTER_COPY = "adapter"  # the adapter this model was merged from, for serving it as a LoRA module


class ParityError(RuntimeError):
    """The merged model does not behave like base + adapter."""


# ---------------------------------------------------------------- merge and parity


def parity_prompts(eval_path: Path, count: int) -> list[list[dict]]:
    """The prompts of the first `count` held-out rows by id."""
    prompts = [row["messages"][:-1] for row in select_rows(read_examples(eval_path), count)]
    if not prompts:
        raise ValueError(f"{eval_path}: no held-out rows for the parity check")
    return prompts


def greedy_with_logits(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> tuple[list[str], list]:
    """Greedy answers (in prompt order) and each batch's per-step logits (batches in a fixed order)."""
    answers, logits = [""] * len(prompts), []
    for indices, texts, step_logits in greedy_batches(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                      batch_size=PARITY_BATCH, output_logits=True):
        for index, text in zip(indices, texts):
            answers[index] = text
        logits.append(step_logits)
    return answers, logits


def max_abs_diff(left: list, right: list) -> float:
    """Largest |a - b| over the decoding steps both runs made, batch by batch."""
    largest = 0.0
    for a, b in zip(left, right):
        steps = min(a.shape[1], b.shape[1])
        largest = max(largest, float((a[:, :steps] - b[:, :steps]).abs().max()))
    return largest


def merge(peft_model):
    """Fold the adapter weights into the base weights (a plain transformers model comes back)."""
    return peft_model.merge_and_unload()


def check_parity(before: tuple[list[str], list], after: tuple[list[str], list], dtype: str) -> dict[str, Any]:
    """{parity_max_abs_diff, parity_rows, parity_identical_outputs}; raises ParityError when they disagree."""
    differing = [i for i, (a, b) in enumerate(zip(before[0], after[0])) if a != b]
    diff = max_abs_diff(before[1], after[1])
    tolerance = PARITY_TOLERANCE.get(dtype, PARITY_TOLERANCE["bfloat16"])
    if differing or diff > tolerance:
        raise ParityError(
            f"merged model differs from base + adapter: {len(differing)}/{len(before[0])} greedy outputs differ "
            f"(prompts {differing[:5]}), largest |logit difference| {diff:.3g} (tolerance {tolerance:g} for {dtype})"
        )
    return {"parity_max_abs_diff": diff, "parity_rows": len(before[0]), "parity_identical_outputs": True}


# ---------------------------------------------------------------- serving files and model card


def vllm_lora_rank(adapter_dir: Path) -> int:
    """The smallest `--max-lora-rank` vLLM accepts for this adapter."""
    rank = json.loads((adapter_dir / "adapter_config.json").read_text())["r"]
    return next((allowed for allowed in VLLM_LORA_RANKS if allowed >= rank), rank)


def serving_commands(task: str, model_dir: Path, base_model_dir: Path, adapter_dir: Path) -> dict[str, str]:
    """vLLM (bound to 127.0.0.1, like every server ftpipe starts) and Ollama commands; the LoRA one serves the copy
    of `adapter_dir` inside `model_dir`."""
    name = f"ftpipe-{task}"
    return {
        "merged": f"vllm serve {shlex.quote(str(model_dir))} --host 127.0.0.1 --served-model-name {name}",
        "lora": (f"vllm serve {shlex.quote(str(base_model_dir))} --host 127.0.0.1 --enable-lora "
                 f"--lora-modules {shlex.quote(f'{task}={model_dir / ADAPTER_COPY}')} "
                 f"--max-lora-rank {vllm_lora_rank(adapter_dir)}"),
        "ollama": f"ollama create {name} -f {shlex.quote(str(model_dir / 'Modelfile'))} && ollama run {name}",
    }


def serve_script(commands: dict[str, str]) -> str:
    return (
        "#!/usr/bin/env bash\n"
        "# OpenAI-compatible API on port 8000 with vLLM.\n"
        "#   ./serve.sh        the merged model\n"
        "#   ./serve.sh lora   the base model with the LoRA adapter (its copy in adapter/)\n"
        "# It listens on 127.0.0.1 only; put an authenticating proxy in front before exposing it.\n"
        "set -euo pipefail\n"
        f'if [[ "${{1:-merged}}" == lora ]]; then\n  exec {commands["lora"]}\nfi\n'
        f"exec {commands['merged']}\n"
    )


def serving_markdown(task: str, commands: dict[str, str]) -> str:
    request = {"model": f"ftpipe-{task}", "messages": [{"role": "user", "content": "Hello"}]}
    return (
        f"## How to serve\n\nThe merged model with vLLM (`./serve.sh`):\n\n```bash\n{commands['merged']}\n```\n\n"
        f"The base model with the adapter, hot-swappable (`./serve.sh lora`; the model name is `{task}`):\n\n"
        f"```bash\n{commands['lora']}\n```\n\nThen:\n\n```bash\ncurl http://127.0.0.1:8000/v1/chat/completions "
        f"-H 'Content-Type: application/json' -d '{json.dumps(request)}'\n```\n\n"
        f"With Ollama (the `Modelfile` approximates the chat template):\n\n```bash\n{commands['ollama']}\n```\n"
    )


def ollama_modelfile(model_dir: Path, model, tokenizer) -> str:
    """FROM the merged dir, a Go TEMPLATE for the chat template (ChatML exactly, anything else single-turn)
    and the stop tokens."""
    chat_template = tokenizer.chat_template or ""
    if "<|im_start|>" in chat_template:
        template = CHATML_OLLAMA_TEMPLATE
    else:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False,
                                                 add_generation_prompt=True)
        template = rendered.replace(SENTINEL, "{{ .Prompt }}")
    stops = dict.fromkeys(tokenizer.convert_ids_to_tokens(stop_token_ids(model, tokenizer)))
    lines = [f"FROM {model_dir}", f'TEMPLATE """{template}"""', *(f'PARAMETER stop "{s}"' for s in stops),
             "PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"


def _section(title: str, values: dict[str, Any]) -> str:
    if not values:
        return ""
    rows = [[key, json.dumps(value) if isinstance(value, (dict, list)) else value] for key, value in values.items()]
    return f"## {title}\n\n{markdown_table(['name', 'value'], rows)}\n\n"


def model_card(card: dict[str, Any], parity: dict[str, Any], serving: str) -> str:
    """README.md: what the model is (base, task, data versions), how good (metrics, parity), how it was trained
    and how to serve it. Known keys of `card`: task, base_model, description, method, data_versions, metrics,
    hyperparameters; any other key is listed under Details."""
    known = {"task", "base_model", "description", "method", "data_versions", "metrics", "hyperparameters"}
    task = card.get("task", "model")
    front = f"---\nbase_model: {json.dumps(str(card.get('base_model', '')))}\nlibrary_name: transformers\n" \
            f"tags: [ftpipe, {json.dumps(task)}, {json.dumps(card.get('method', 'lora'))}, merged]\n---\n\n"
    intro = (f"# ftpipe-{task}\n\n{card.get('description', '')}\n\nBase model `{card.get('base_model', '?')}`, "
             f"fine-tuned with {card.get('method', 'LoRA')} by ftpipe and merged into 16/32-bit weights.\n\n")
    parity_line = (f"Parity: on {parity['parity_rows']} held-out prompts the merged model's greedy outputs equal "
                   f"base + adapter; largest |logit difference| {parity['parity_max_abs_diff']:.3g}.\n\n")
    return (front + intro + _section("Data versions", card.get("data_versions", {}))
            + _section("Evaluation", card.get("metrics", {})) + parity_line
            + _section("Hyperparameters", card.get("hyperparameters", {}))
            + _section("Details", {k: v for k, v in card.items() if k not in known}) + serving)


def write_model_dir(tmp: Path, merged, tokenizer, files: dict[str, str]) -> None:
    """Weights (safetensors), generation config, tokenizer with chat template, and the text `files`."""
    merged.generation_config.eos_token_id = stop_token_ids(merged, tokenizer)
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name, text in files.items():
        (tmp / name).write_text(text, encoding="utf-8")
    (tmp / "serve.sh").chmod(0o755)


def merge_adapter(*, base_model_dir: Path | str, adapter_dir: Path | str, out_dir: Path | str,
                  eval_path: Path | str, card: dict[str, Any], trust_remote_code: bool = False,
                  parity_rows: int = 16, max_new_tokens: int = PARITY_MAX_NEW_TOKENS) -> dict[str, Any]:
    """Merge `adapter_dir` into a freshly loaded full-precision base (fp32 on CPU, bf16 on GPU; never 4-bit, so a
    QLoRA adapter merges cleanly), check parity on `parity_rows` held-out prompts and write `out_dir` atomically.

    Returns {model_path, parity_max_abs_diff, parity_rows, parity_identical_outputs}; raises ParityError.
    """
    from peft import PeftModel

    base_model_dir, adapter_dir, out_dir = Path(base_model_dir), Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(f"{adapter_dir}: not a LoRA adapter (no adapter_config.json); a full fine-tune needs no merge")
    model, tokenizer = load_model_and_tokenizer(base_model_dir, method="full", trust_remote_code=trust_remote_code)
    adapted = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    prompts = parity_prompts(Path(eval_path), parity_rows)
    before = greedy_with_logits(adapted, tokenizer, prompts, max_new_tokens)
    merged = merge(adapted).eval()
    parity = check_parity(before, greedy_with_logits(merged, tokenizer, prompts, max_new_tokens),
                          str(merged.dtype).removeprefix("torch."))
    task = card.get("task", "model")
    commands = serving_commands(task, out_dir, base_model_dir, adapter_dir)
    files = {
        "README.md": model_card(card, parity, serving_markdown(task, commands)),
        "SERVING.md": f"# Serving ftpipe-{task}\n\n" + serving_markdown(task, commands),
        "serve.sh": serve_script(commands),
        "Modelfile": ollama_modelfile(out_dir, merged, tokenizer),
        PARITY_FILE: json.dumps(parity, indent=2),
    }
    with atomic_dir(out_dir) as tmp:
        write_model_dir(tmp, merged, tokenizer, files)
        (tmp / ADAPTER_COPY).mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(adapter_dir / name, tmp / ADAPTER_COPY / name)
    return {"model_path": str(out_dir), **parity}


def is_merged(model_dir: Path) -> bool:
    """True when `model_dir` holds a finished merge (weights and its parity record)."""
    return (model_dir / PARITY_FILE).is_file() and any(model_dir.glob("*.safetensors"))


def merge_facts(model_dir: Path) -> dict[str, Any]:
    """The parity record of a finished merge."""
    return json.loads((model_dir / PARITY_FILE).read_text())


# ---------------------------------------------------------------- registry


def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    from ftpipe.core.tracking import tracking_uri as default_uri

    return MlflowClient(tracking_uri=tracking_uri or default_uri())


def registered_name(task: str) -> str:
    return f"ftpipe-{task}"


def _version_by_alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def beats(version, eval_score: float, eval_version: str) -> bool:
    """True when `version` is None, or was scored on the same eval split with a lower score."""
    if version is None:
        return True
    same_split = version.tags.get(EVAL_VERSION_TAG) == eval_version
    return same_split and eval_score > float(version.tags.get(SCORE_TAG, "-inf"))


def register_model(*, task: str, model_path: Path | str, run_id: str, eval_score: float, eval_version: str,
                   tracking_uri: str | None = None) -> dict[str, Any]:
    """Register the merged dir as a new version of `ftpipe-<task>` linked to the training run (once per dir);
    alias it `candidate`, and `champion` when there is no champion yet or it beats the champion's score on the
    same eval split version (a champion scored on another split is not comparable and stays)."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    name = registered_name(task)
    try:
        client.create_registered_model(name, description=f"ftpipe fine-tuned model for task {task}")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = str(Path(model_path).absolute())
    previous = _version_by_alias(client, name, CHAMPION)
    version = next((v for v in client.search_model_versions(f"name = '{name}'") if v.source == source), None)
    if version is None:
        tags = {SCORE_TAG: repr(float(eval_score)), EVAL_VERSION_TAG: eval_version}
        version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    is_champion = previous is not None and previous.version == version.version
    promote = not is_champion and beats(previous, eval_score, eval_version)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return {
        "registered_model": name,
        "registered_version": int(version.version),
        "champion": is_champion or promote,
        "previous_champion_version": int(previous.version) if previous else None,
    }


def prune_merged(folder: Path, task: str, tracking_uri: str | None = None) -> list[str]:
    """Delete the merged models in `folder` that are neither the `champion` nor the `candidate`; return their names."""
    from ftpipe.core.storage import discard

    client = _client(tracking_uri)
    kept = [_version_by_alias(client, registered_name(task), alias) for alias in (CHAMPION, CANDIDATE)]
    keep = {Path(v.source).name for v in kept if v is not None}
    removed = []
    for child in sorted(folder.iterdir()):
        if child.is_symlink() and not child.name.startswith(".") and child.name not in keep | {"latest"}:
            discard(child)
            removed.append(child.name)
    return removed


def champion_model_path(task: str, tracking_uri: str | None = None) -> Path | None:
    """The champion's model dir (else the latest version's); None when nothing is registered."""
    client = _client(tracking_uri)
    name = registered_name(task)
    version = _version_by_alias(client, name, CHAMPION)
    if version is None:
        versions = client.search_model_versions(f"name = '{name}'")
        version = max(versions, key=lambda v: int(v.version), default=None)
    return Path(version.source) if version else None


def chat(model_dir: Path | str, messages: list[dict], max_new_tokens: int = 128) -> str:
    """One greedy assistant reply to `messages`, formatted with the model's chat template."""
    model, tokenizer = load_model_and_tokenizer(model_dir, method="full")
    return generate(model.eval(), tokenizer, [messages], max_new_tokens=max_new_tokens, batch_size=1)[0]
