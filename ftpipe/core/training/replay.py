"""Replay (`training.replay`): the base model's own answers to general prompts, mixed into the train rows so that
fine-tuning keeps the model's general behaviour.

The prompts (the spec's `replay_prompts`, `data/general/replay_prompts.jsonl`) share no question with the
general-skills probe that measures forgetting. A training takes them in an order drawn by its seed and keeps
those whose answer is complete and fits `max_length`. Answers are greedy, from the model the training loaded
(before it is trained), generated only for the prompts taken, and cached batch by batch in the spec's
`replay_cache_dir` under a key of the base model, the prompts file and the decoding: no answer is generated twice,
even after a stop.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

from ftpipe.config import EvaluationConfig, TrainingConfig
from ftpipe.core.modeling import chat_length
from ftpipe.core.storage import file_sha256, write_text
from ftpipe.core.training.setup import TrainerSetup
from ftpipe.core.training.spec import TrainingSpec

CACHE_FORMAT = "1"  # bump when the cached content or the decoding changes
MAX_NEW_TOKENS = 96
COMPLETE_BELOW = 86  # answer tokens; a longer one probably stopped at MAX_NEW_TOKENS (its text re-encodes shorter)
BATCH_TOKENS = EvaluationConfig.model_fields["batch_tokens"].default  # generated at once, as in evaluation
OVERSAMPLE = 1.25  # prompts answered per row still wanted, as some answers are not usable

Conversation = list[dict[str, str]]


def check(spec: TrainingSpec, config: TrainingConfig) -> None:
    """ValueError when replay is on and the spec lacks an existing prompts file or a cache dir."""
    if config.replay and not (spec.replay_prompts and Path(spec.replay_prompts).is_file() and spec.replay_cache_dir):
        raise ValueError(f"training.replay {config.replay} needs replay_prompts (an existing file; got "
                         f"{spec.replay_prompts!r}) and replay_cache_dir (got {spec.replay_cache_dir!r}) in the spec")


def read_prompts(path: Path) -> list[dict]:
    """The rows of a prompts file: {"id", "messages": [user turn]}."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cache_file(setup: TrainerSetup) -> Path:
    """The answer cache of this base model (as loaded here), prompts file and decoding."""
    key = {"format": CACHE_FORMAT, "base": setup.spec.base_fingerprint,
           "prompts": file_sha256(Path(setup.spec.replay_prompts)), "max_new_tokens": MAX_NEW_TOKENS,
           "weights": setup.method.quantization, "device": setup.model.device.type}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(setup.spec.replay_cache_dir) / f"replay-{digest}.json"


def cached_answers(setup: TrainerSetup, prompts: list[dict], cache: Path) -> dict[str, str]:
    """Answers by prompt id: those in `cache`, plus the missing ones of `prompts` generated now and added to it."""
    from ftpipe.core.evaluation import generation

    answers = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
    missing = [prompt for prompt in prompts if prompt["id"] not in answers]
    if missing:
        setup.info(f"replay: the base model answers general prompts ({len(missing)} new; cached in {cache.parent})")
        started = time.monotonic()

        def keep(batch: generation.Batch) -> None:  # after each batch: a stopped training loses none of them
            answers.update((missing[index]["id"], text) for index, text in zip(batch.indices, batch.answers))
            write_text(cache, json.dumps(answers, ensure_ascii=False, sort_keys=True, indent=0))

        generation.generate(setup.model, setup.tokenizer, [p["messages"] for p in missing],
                            max_new_tokens=MAX_NEW_TOKENS, batch_tokens=BATCH_TOKENS, each_batch=keep)
        setup.replay_seconds += time.monotonic() - started
    return answers


def usable(setup: TrainerSetup, prompt: dict, answer: str) -> Conversation | None:
    """The prompt with its answer, when the answer is complete and the whole fits `max_length`."""
    from ftpipe.core.evaluation.generation import encode

    conversation = [*prompt["messages"], {"role": "assistant", "content": answer}]
    complete = 0 < len(encode(setup.tokenizer, answer)) < COMPLETE_BELOW
    return conversation if complete and chat_length(setup.tokenizer, conversation) <= setup.config.max_length else None


def replay_rows(setup: TrainerSetup, train_rows: int) -> list[Conversation]:
    """round(replay × train_rows) general conversations: the first usable ones in an order drawn by the training
    seed, repeated when all usable ones are too few."""
    wanted = round(setup.config.replay * train_rows)
    if not wanted:
        return []
    prompts = read_prompts(Path(setup.spec.replay_prompts))
    order, cache = random.Random(setup.config.seed).sample(prompts, len(prompts)), cache_file(setup)
    picked: list[Conversation] = []
    taken = 0
    while len(picked) < wanted and taken < len(order):
        batch = order[taken : taken + math.ceil(OVERSAMPLE * (wanted - len(picked)))]
        taken += len(batch)
        answers = cached_answers(setup, batch, cache)
        picked += filter(None, (usable(setup, prompt, answers[prompt["id"]]) for prompt in batch))
    if not picked:
        setup.info(f"replay: none of the {len(prompts)} general prompts has a usable answer; training without replay")
        return []
    generated = f" (answers generated in {setup.replay_seconds:.0f} s)" if setup.replay_seconds else ""
    setup.info(f"replay: {wanted} general rows, {min(len(picked), wanted)} distinct base-model answers{generated}")
    return [picked[i % len(picked)] for i in range(wanted)]
