"""Replay of general behaviour (`training.replay`): the shipped prompts never touch the probe, the mix has the
asked share of cached base-model answers, the answers are generated once, and replay 0 changes nothing."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from ftpipe.core.evaluation import generation
from ftpipe.core.similarity import Settings, shingles, similar_pairs
from ftpipe.core.storage import REPO_ROOT
from ftpipe.core.text import canonical
from ftpipe.core.training import replay
from ftpipe.core.training.methods import Method
from ftpipe.core.training.program import prepare
from ftpipe.core.modeling import chat_length
from ftpipe.core.training.setup import trainer_setup
from ftpipe.core.training.sft import build_datasets
from ftpipe.core.training.spec import TrainingSpec
from ftpipe_tests.training_program import SMALL_TRAINING, mlflow_client, output_result, run_to_end, toy_workspace

GENERAL = REPO_ROOT / "data" / "general"
PROMPTS, PROBE = GENERAL / "replay_prompts.jsonl", GENERAL / "probe.jsonl"
TRAIN_ROWS = 40  # the workspace's train rows within SMALL_TRAINING's max_length


def user_texts(path: Path) -> list[str]:
    return [row["messages"][0]["content"] for row in replay.read_prompts(path)]


class Generations:
    """Stands in for `generation.generate`: a short answer per prompt (an over-long one for facts), counting calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, tokenizer, prompts, *, max_new_tokens, batch_tokens, progress=None, each_batch=None):
        self.calls += 1
        answers = [answer(prompt[0]["content"]) for prompt in prompts]
        if each_batch:
            each_batch(generation.Batch(list(range(len(prompts))), answers, [], [[] for _ in prompts], 0.0))
        return answers


def answer(prompt: str) -> str:
    return "word " * replay.MAX_NEW_TOKENS if prompt.startswith("Which city") else f"Short answer {len(prompt)}."


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir) -> Path:
    return toy_workspace(tmp_path_factory.mktemp("replay"), tiny_model_dir)


@pytest.fixture
def generations(monkeypatch) -> Generations:
    spy = Generations()
    monkeypatch.setattr(generation, "generate", spy)
    return spy


def spec_of(workspace: Path, name: str, prompts: Path = PROMPTS, **training) -> TrainingSpec:
    return TrainingSpec(
        task="toy", base_model_dir=str(workspace / "base"), base_fingerprint="tiny", split_version="toy-split",
        train_path=str(workspace / "train.parquet"), eval_path=str(workspace / "eval.parquet"),
        output_dir=str(workspace / name / "adapter"), checkpoint_dir=str(workspace / name / "checkpoints"),
        training={**SMALL_TRAINING, **training}, replay_prompts=str(prompts),
        replay_cache_dir=str(workspace / name / "replay-cache"),
    )


def datasets(spec: TrainingSpec, info=lambda line: None):
    """(train rows, eval rows, replay rows handed out) as the sft objective builds them; `info` takes its lines."""
    setup = trainer_setup(spec, spec.config(), Method("sft", "lora", "none"), callbacks=[], info=info)
    train, evals, _, _ = build_datasets(setup)
    return list(train), list(evals), setup.replay_rows


def prompt_of(row: dict) -> str:
    return row["prompt"][-1]["content"]


def test_the_replay_prompts_share_no_question_with_the_probe() -> None:
    prompts, probe = user_texts(PROMPTS), user_texts(PROBE)
    assert len(prompts) >= 300 and len(set(map(canonical, prompts))) == len(prompts)
    assert not set(map(canonical, prompts)) & set(map(canonical, probe)), "no probe prompt, case and spacing aside"
    rows = shingles([[("user", text)] for text in probe + prompts], k=2)
    across = [(a, b) for a, b, _ in similar_pairs(rows, Settings(threshold=0.5)) if a < len(probe) <= b]
    assert not across, "no replay prompt is even half alike a probe prompt"


def test_the_replay_prompts_file_is_what_its_generator_writes() -> None:
    sys.path.insert(0, str(GENERAL.parent))  # the generator imports its sibling generate_probe
    location = importlib.util.spec_from_file_location("generate_replay", GENERAL.parent / "generate_replay.py")
    generator = importlib.util.module_from_spec(location)
    location.loader.exec_module(generator)
    rows = generator.replay_prompts(random.Random(generator.SEED))
    assert PROMPTS.read_bytes() == "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    assert all(row.keys() == {"id", "messages"} and [m["role"] for m in row["messages"]] == ["user"] for row in rows)


def test_the_mix_has_the_share_of_cached_answers_only_in_train(workspace, generations) -> None:
    spec = spec_of(workspace, "mix", replay=0.25)
    train, evals, handed_out = datasets(spec)
    prompts = {row["messages"][0]["content"]: row["id"] for row in replay.read_prompts(PROMPTS)}
    general = [row for row in train if prompt_of(row) in prompts]
    assert handed_out == len(general) == round(0.25 * TRAIN_ROWS) and len(train) == TRAIN_ROWS + len(general)
    assert not any(prompt_of(row) in prompts for row in evals)
    [cache] = Path(spec.replay_cache_dir).glob("replay-*.json")
    cached = json.loads(cache.read_text())
    for row in general:
        assert row["completion"][0]["content"] == cached[prompts[prompt_of(row)]] == answer(prompt_of(row))
    assert not any(prompt_of(row).startswith("Which city") for row in general), "incomplete answers are left out"
    tokenizer = generation.load_model(spec.base_model_dir)[1]
    assert all(chat_length(tokenizer, row["prompt"] + row["completion"]) <= SMALL_TRAINING["max_length"]
               for row in general)
    assert not {canonical(prompt_of(row)) for row in train} & set(map(canonical, user_texts(PROBE)))


def test_answers_are_generated_once_and_reused(workspace, generations) -> None:
    spec = spec_of(workspace, "reuse", replay=0.25)
    lines = []
    first, _, _ = datasets(spec, lines.append)
    assert re.fullmatch(r"replay: 10 general rows, 10 distinct base-model answers \(answers generated in \d+ s\)",
                        lines[-2]), "the generation is timed"
    [cache] = Path(spec.replay_cache_dir).glob("replay-*.json")
    calls, written = generations.calls, cache.stat().st_mtime_ns
    again, _, _ = datasets(spec, lines.append)
    assert calls > 0 and generations.calls == calls, "a re-run generates nothing"
    assert lines[-2] == "replay: 10 general rows, 10 distinct base-model answers"
    assert cache.stat().st_mtime_ns == written and again == first, "the same seed picks the same rows"
    other, _, _ = datasets(spec_of(workspace, "reuse", replay=0.25, seed=7))
    assert other != first, "another seed picks others"


def test_a_stop_keeps_the_answers_of_the_batches_done_and_the_next_training_generates_only_the_rest(
        workspace, monkeypatch) -> None:
    import torch

    prompts = replay.read_prompts(PROMPTS)[:12]
    monkeypatch.setattr(replay, "BATCH_TOKENS", 256)  # a few prompts a batch
    spec = spec_of(workspace, "stopped")
    setup = trainer_setup(spec, spec.config(), Method("sft", "lora", "none"), callbacks=[], info=lambda line: None)
    with torch.no_grad():  # the random model answers line breaks only; without them its answers differ by prompt
        setup.model.get_output_embeddings().weight[setup.tokenizer.convert_tokens_to_ids("Ċ")] = 0
    cache, write = replay.cache_file(setup), replay.write_text

    def write_then_stop(target: Path, text: str) -> None:
        write(target, text)
        raise KeyboardInterrupt

    monkeypatch.setattr(replay, "write_text", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        replay.cached_answers(setup, prompts, cache)
    kept = json.loads(cache.read_text())
    assert 0 < len(kept) < len(prompts), "the first batch, stored"
    monkeypatch.setattr(replay, "write_text", write)
    answer_all, asked = generation.answers_and_logprobs, []

    def counted(model, tokenizer, rows, **options):
        asked.append(len(rows))
        return answer_all(model, tokenizer, rows, **options)

    monkeypatch.setattr(generation, "answers_and_logprobs", counted)
    answers = replay.cached_answers(setup, prompts, cache)
    assert asked == [len(prompts) - len(kept)], "only the prompts left"
    cold = generation.generate(setup.model, setup.tokenizer, [p["messages"] for p in prompts],
                               max_new_tokens=replay.MAX_NEW_TOKENS, batch_tokens=replay.BATCH_TOKENS)
    assert len(set(cold)) > 3, "answers that differ by prompt"
    assert answers == json.loads(cache.read_text()) == dict(zip((p["id"] for p in prompts), cold))


def test_too_few_usable_answers_are_repeated_to_the_share(workspace, generations, tmp_path) -> None:
    prompts = tmp_path / "three.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": f"Say {i}."}]})
                               + "\n" for i in range(3)))
    train, _, handed_out = datasets(spec_of(workspace, "few", prompts, replay=0.5))
    counts = Counter(prompt_of(row) for row in train if prompt_of(row).startswith("Say"))
    assert handed_out == 20 and sorted(counts.values()) == [6, 7, 7]


def test_replay_zero_changes_nothing(workspace, generations) -> None:
    without = TrainingSpec(**{**vars(spec_of(workspace, "off")), "replay_prompts": None, "replay_cache_dir": None,
                              "mlflow": None, "fingerprint": None})
    zero = spec_of(workspace, "off", replay=0.0)
    assert zero.fingerprint == without.fingerprint and "replay" not in zero.config().recipe()
    built = datasets(zero)
    assert built == datasets(without) and built[2] == 0
    assert generations.calls == 0 and not Path(zero.replay_cache_dir).exists()
    assert spec_of(workspace, "on", replay=0.1).fingerprint != zero.fingerprint


def test_replay_without_its_prompts_is_refused_before_training(workspace, tmp_path) -> None:
    spec = spec_of(workspace, "refused", tmp_path / "missing.jsonl", replay=0.2)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(vars(spec), default=vars))
    with pytest.raises(ValueError, match="training.replay 0.2 needs replay_prompts"):
        prepare(path)


@pytest.mark.slow
def test_a_training_with_replay_reports_its_rows_from_the_cache(workspace, generations) -> None:
    spec = spec_of(workspace, "trained", replay=0.25)
    datasets(spec)  # fills the cache as this machine's training would
    [cache] = Path(spec.replay_cache_dir).glob("replay-*.json")
    written = cache.stat().st_mtime_ns
    path = workspace / "trained.json"
    path.write_text(json.dumps(vars(spec), default=vars))
    stdout = run_to_end(workspace, path)
    metadata = output_result(path).metadata
    assert metadata["replay_rows"] == 10
    assert "the base model answers" not in stdout and cache.stat().st_mtime_ns == written, "answered from the cache"
    params = mlflow_client(workspace).get_run(metadata["mlflow_run_id"]).data.params
    assert (params["replay"], params["replay_rows"], params["train_rows"]) == ("0.25", "10", "50")
