"""What a packaged model needs to be served: vLLM commands and `serve.sh`, the Ollama `Modelfile`, `SERVING.md`,
and the task's system prompt as the chat template's default."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from ftpipe.core.evaluation.generation import ADAPTER_CONFIG, stop_token_ids

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
CHATML_OLLAMA_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
SENTINEL = "<<ftpipe-prompt>>"
ADAPTER_COPY = "adapter"  # the adapter a model was merged from, for serving it as a LoRA module


def vllm_lora_rank(adapter_dir: Path) -> int:
    """The smallest `--max-lora-rank` vLLM accepts for this adapter."""
    rank = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())["r"]
    return next((allowed for allowed in VLLM_LORA_RANKS if allowed >= rank), rank)


def serving_commands(task: str, model_dir: Path, lora: tuple[Path, Path] | None) -> dict[str, str]:
    """vLLM (bound to 127.0.0.1, like every server ftpipe starts) and Ollama commands for `model_dir`; with
    `lora` = (base model dir, adapter dir), also vLLM serving the base with the adapter's copy inside `model_dir`."""
    name = f"ftpipe-{task}"
    commands = {
        "model": f"vllm serve {shlex.quote(str(model_dir))} --host 127.0.0.1 --served-model-name {name}",
        "ollama": f"ollama create {name} -f {shlex.quote(str(model_dir / 'Modelfile'))} && ollama run {name}",
    }
    if lora:
        base_model_dir, adapter_dir = lora
        commands["lora"] = (f"vllm serve {shlex.quote(str(base_model_dir))} --host 127.0.0.1 --enable-lora "
                            f"--lora-modules {shlex.quote(f'{task}={model_dir / ADAPTER_COPY}')} "
                            f"--max-lora-rank {vllm_lora_rank(adapter_dir)}")
    return commands


def serve_script(commands: dict[str, str]) -> str:
    usage = "#   ./serve.sh        the model\n"
    lora = ""
    if "lora" in commands:
        usage += "#   ./serve.sh lora   the base model with the LoRA adapter (its copy in adapter/)\n"
        lora = f'if [[ "${{1:-model}}" == lora ]]; then\n  exec {commands["lora"]}\nfi\n'
    return (
        "#!/usr/bin/env bash\n# OpenAI-compatible API on port 8000 with vLLM.\n" + usage
        + "# It listens on 127.0.0.1 only; put an authenticating proxy in front before exposing it.\n"
        + "set -euo pipefail\n" + lora + f"exec {commands['model']}\n"
    )


def serving_markdown(task: str, commands: dict[str, str], system_prompt: str | None) -> str:
    request = {"model": f"ftpipe-{task}", "messages": [{"role": "user", "content": "Hello"}]}
    system = ("The task's system prompt is the model's default: a request without a system message gets it, so "
              "callers send only the user's message.\n\n") if system_prompt else ""
    lora = (f"The base model with the adapter, hot-swappable (`./serve.sh lora`; the model name is `{task}`):\n\n"
            f"```bash\n{commands['lora']}\n```\n\n") if "lora" in commands else ""
    return (
        f"## How to serve\n\n{system}The model with vLLM (`./serve.sh`):\n\n```bash\n{commands['model']}\n```\n\n{lora}"
        f"Then:\n\n```bash\ncurl http://127.0.0.1:8000/v1/chat/completions "
        f"-H 'Content-Type: application/json' -d '{json.dumps(request)}'\n```\n\n"
        f"With Ollama (the `Modelfile` approximates the chat template):\n\n```bash\n{commands['ollama']}\n```\n"
    )


def ollama_modelfile(model_dir: Path, model, tokenizer, system_prompt: str | None) -> str:
    """FROM the model dir, a Go TEMPLATE for the chat template (ChatML exactly, anything else single-turn),
    the stop tokens and the task's system prompt as the default SYSTEM."""
    chat_template = tokenizer.chat_template or ""
    if "<|im_start|>" in chat_template:
        template = CHATML_OLLAMA_TEMPLATE
    else:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False,
                                                 add_generation_prompt=True)
        template = rendered.replace(SENTINEL, "{{ .Prompt }}")
    stops = dict.fromkeys(tokenizer.convert_ids_to_tokens(stop_token_ids(model, tokenizer)))
    lines = [f"FROM {model_dir}", f'TEMPLATE """{template}"""', *(f'PARAMETER stop "{s}"' for s in stops),
             "PARAMETER temperature 0", *([f'SYSTEM """{system_prompt}"""'] if system_prompt else [])]
    return "\n".join(lines) + "\n"



def default_system_prompt(tokenizer, system_prompt: str | None) -> None:
    """Make `system_prompt` the chat template's system message for conversations that start without one, so every
    server that applies the template (vLLM, transformers) answers as the model was trained."""
    if system_prompt:
        literal = json.dumps(system_prompt)  # a valid Jinja string literal
        tokenizer.chat_template = (
            f"{{%- if not messages or messages[0]['role'] != 'system' %}}{{%- set messages = "
            f"[{{'role': 'system', 'content': {literal}}}] + messages %}}{{%- endif %}}" + tokenizer.chat_template)
