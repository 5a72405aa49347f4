"""Packaging for serving: parity of the merged model with base + adapter, a full fine-tune packaged without a
merge, the servable dir and its model card, reuse by key, chat, and the model registry's aliases."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ftpipe.core import merging, registry
from ftpipe.core.evaluation.generation import generate, load_model
from ftpipe.core.results import read_result
from ftpipe_tests.tiny_model import toy_rows, write_chat_parquet
from ftpipe_tests.trained_models import full_finetune, lora_adapter, noisy_base

CARD = {
    "task": "toy", "base_model": "tiny-llama", "method": "lora", "description": "Names fruit colors.",
    "data_versions": {"heldout_split": "abc123"}, "evaluation": "**Eval gate: PASSED** (min_improvement 0.1).",
    "hyperparameters": {"stages": ["sft"], "lora": {"r": 8, "alpha": 16}, "learning_rate": 0.02, "warmup_steps": None,
                        "preference": {"beta": 0.1}, "launcher": "subprocess", "num_processes": 1, "nnodes": 1},
    "data": {"rows read": 40, "train rows": 30},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("merging")
    noisy_base(tiny_model_dir, root / "base")
    lora_adapter(root / "base", root / "adapter", random_weights=True)
    full_finetune(root / "base", root / "full", toy_rows(16, seed=4), steps=10)
    write_chat_parquet(root / "eval.parquet", toy_rows(20, seed=2))
    return root


def package(root: Path, finetuned: str, out: str, **card) -> dict:
    return merging.package_model(base_model_dir=root / "base", finetuned_dir=root / finetuned, out_dir=root / out,
                                 eval_path=root / "eval.parquet", card={**CARD, **card}, reuse_key=f"key-{out}")


@pytest.fixture(scope="module")
def merged(workspace) -> tuple[Path, dict]:
    return workspace, package(workspace, "adapter", "merged")


@pytest.fixture(scope="module")
def full(workspace) -> tuple[Path, dict]:
    return workspace, package(workspace, "full", "full_model", method="full")


def prompts() -> list[list[dict]]:
    return [row["messages"][:-1] for row in toy_rows(6, seed=5)]


def answers(model_dir: Path) -> list[str]:
    model, tokenizer = load_model(model_dir)
    return generate(model, tokenizer, prompts(), max_new_tokens=8, batch_tokens=300)


def test_merged_model_matches_base_plus_adapter(merged):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, result = merged
    assert result["model_path"] == str(root / "merged")
    assert result["parity_identical_outputs"] is True and result["parity_rows"] == 16
    assert 0 <= result["parity_max_abs_diff"] < merging.PARITY_TOLERANCE["float32"]
    plain = AutoModelForCausalLM.from_pretrained(root / "merged").eval()  # no peft needed
    assert not hasattr(plain, "peft_config")
    base, tokenizer = load_model(root / "base")
    adapted = PeftModel.from_pretrained(base, root / "adapter").eval()
    adapted_answers = generate(adapted, tokenizer, prompts(), max_new_tokens=8, batch_tokens=300)
    assert generate(plain, tokenizer, prompts(), max_new_tokens=8, batch_tokens=300) == adapted_answers
    assert adapted_answers != answers(root / "base")  # the adapter matters, so parity is not trivial


def test_merged_dir_is_servable_with_its_card(merged):
    root, _ = merged
    out = root / "merged"
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "chat_template.jinja", "README.md", "SERVING.md", "serve.sh", "Modelfile", "result.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not list(root.glob(".merged.*.tmp"))
    assert [p.name for p in root.glob(".merged.*")] == [Path(os.readlink(out)).name]  # only the live version
    readme = (out / "README.md").read_text()
    assert readme.startswith('---\nlibrary_name: "transformers"\n') and '"merged"]' in readme, "no hub id to name"
    assert "## Evaluation\n\n**Eval gate: PASSED** (min_improvement 0.1).\n\nParity: " in readme
    assert "warmup_steps" not in readme, "settings left unset are not listed"
    assert "preference.beta" not in readme and "launcher" not in readme, "nor a stage that did not run, nor one process"
    assert "merged into float32 weights" in readme and "| train rows | 30 |" in readme
    for fact in ("abc123", "| lora.r | 8 |", "| learning_rate | 0.02 |", "Names fruit colors",
                 "fine-tuned with `lora`", "16 held-out prompts"):
        assert fact in readme, fact
    script = (out / "serve.sh").read_text()
    assert (f"vllm serve {root / 'base'} --host 127.0.0.1 --enable-lora --lora-modules toy={out / 'adapter'} "
            "--max-lora-rank 8") in script
    assert f"vllm serve {out} --host 127.0.0.1 --served-model-name ftpipe-toy" in script
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == (root / "adapter" / "adapter_model.safetensors").read_bytes()
    assert subprocess.run(["bash", "-n", str(out / "serve.sh")]).returncode == 0
    assert "vllm serve" in (out / "SERVING.md").read_text() and "ollama create ftpipe-toy" in readme
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM {out}\n")
    assert "<|im_start|>{{ .Role }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_the_task_system_prompt_is_the_served_default(workspace):
    system = 'Name the fruit\'s color. Reply with "one word".'
    package(workspace, "adapter", "merged_system", system_prompt=system)
    out = workspace / "merged_system"
    _, tokenizer = load_model(out)
    user = prompts()[0][-1:]
    assert system in tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    own = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *user], tokenize=False)
    assert "Be brief." in own and system not in own, "a caller's own system message replaces the default"
    assert merging.chat(out, user, max_new_tokens=8) == merging.chat(
        out, [{"role": "system", "content": system}, *user], max_new_tokens=8), "callers need not add it"
    assert f'SYSTEM """{system}"""' in (out / "Modelfile").read_text()
    assert "callers send only the user's message" in (out / "SERVING.md").read_text()
    assert system in (out / "README.md").read_text()


def test_a_system_prompt_of_several_paragraphs_is_quoted_whole_on_the_card():
    system = "You are Nora, NordLink's support assistant.\n\nPolicies you must follow:\n1. Be brief.\n2. No refunds."
    card = merging.model_card({"task": "support", "system_prompt": system}, merging.FULL_MODEL_PARITY, "",
                              merged=False, weights="float32")
    assert ("> You are Nora, NordLink's support assistant.\n>\n> Policies you must follow:\n> 1. Be brief.\n"
            "> 2. No refunds.\n\n") in card


@pytest.mark.parametrize(("base", "front_matter"), [
    ("smollm2-135m-instruct", 'base_model: "HuggingFaceTB/SmolLM2-135M-Instruct"\n'),  # the alias's original
    ("Qwen/Qwen2.5-0.5B-Instruct", 'base_model: "Qwen/Qwen2.5-0.5B-Instruct"\n'),
    ("/models/acme-7b.Q4_K_M.gguf", ""),  # a file of the user's own: no hub model to link, and no path published
    ("/models/acme-7b", ""),
])
def test_the_card_names_the_base_model_s_hub_id_for_model_hubs_and_no_local_path(base, front_matter):
    card = merging.model_card({"task": "support", "base_model": base}, merging.FULL_MODEL_PARITY, "", merged=False,
                              weights="float32")
    assert card.startswith(f'---\n{front_matter}library_name: "transformers"\ntags: ')
    assert f"Base model `{base}`" in card, "the body names the model as the task set it"


def test_card_body_leaves_the_front_matter_to_the_file(merged):
    root, _ = merged
    body = merging.card_body(root / "merged")
    assert body.startswith("# ftpipe-toy\n\nNames fruit colors.") and "---" not in body.split("\n")[:3]
    assert (root / "merged" / "README.md").read_text().endswith(body)


def test_a_finished_model_is_found_again_only_by_its_key(merged):
    root, result = merged
    assert merging.packaged(root / "merged", "key-merged") == result
    assert merging.packaged(root / "merged", "key-other") is None
    assert merging.packaged(root / "missing", "key-merged") is None
    assert read_result(root / "merged", "merged_model").inputs["finetuned"] == str(root / "adapter")


def test_two_runs_packaging_the_same_model_at_once_write_it_once(workspace):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: package(workspace, "adapter", "twice"), range(2))
    assert first == second
    assert len(list(workspace.glob(".twice.*"))) == 1, "one copy: the second run reused the first one's"


def test_a_full_finetune_is_packaged_as_trained_without_a_merge(full):
    root, result = full
    out = root / "full_model"
    assert result == {"model_path": str(out), **merging.FULL_MODEL_PARITY}
    assert answers(out) == answers(root / "full") != answers(root / "base")
    assert not (out / "adapter").exists() and not list(out.glob("adapter_*"))
    script = (out / "serve.sh").read_text()
    assert "--enable-lora" not in script and f"exec vllm serve {out} --host 127.0.0.1" in script
    assert subprocess.run(["bash", "-n", str(out / "serve.sh")]).returncode == 0
    readme = (out / "README.md").read_text()
    assert '"full-fine-tune"]' in readme and "fine-tuned with `full`" in readme and "nothing to merge" in readme
    assert "Parity: not needed: a full fine-tune" in readme and "--enable-lora" not in readme
    assert merging.packaged(out, "key-full_model") == result


def test_each_packaging_refuses_the_other_kind(workspace):
    with pytest.raises(ValueError, match="package_full_model"):
        merging.merge_adapter(base_model_dir=workspace / "base", adapter_dir=workspace / "full", out_dir=workspace / "x",
                              eval_path=workspace / "eval.parquet", card=CARD, reuse_key="k")
    with pytest.raises(ValueError, match="merge_adapter"):
        merging.package_full_model(model_dir=workspace / "adapter", out_dir=workspace / "x", card=CARD, reuse_key="k")
    assert not (workspace / "x").exists()


def test_chat_replies_like_the_merged_model(merged):
    root, _ = merged
    model, tokenizer = load_model(root / "merged")
    messages = prompts()[0]
    assert merging.chat(root / "merged", messages, max_new_tokens=8) == generate(
        model, tokenizer, [messages], max_new_tokens=8, batch_tokens=1)[0]


def test_chat_with_labels_answers_one_of_them(merged):
    root, _ = merged
    labels = ['{"category": "billing"}', '{"category": "shipping"}', "red"]
    assert {merging.chat(root / "merged", messages, labels=labels) for messages in prompts()} <= set(labels)


def test_a_broken_merge_raises_parity_error_and_writes_nothing(workspace, monkeypatch):
    import torch

    real_merge = merging.merge

    def corrupting_merge(peft_model):
        model = real_merge(peft_model)
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5)
        return model

    monkeypatch.setattr(merging, "merge", corrupting_merge)
    with pytest.raises(merging.ParityError, match=r"greedy outputs differ .* largest \|logit difference\|"):
        package(workspace, "adapter", "broken")
    assert not (workspace / "broken").exists()


def test_registry_moves_champion_only_to_a_better_version_on_the_same_split(tmp_path, merged):
    import shutil
    from urllib.parse import urlsplit

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("toy", artifact_location=(tmp_path / "artifacts").as_uri())
    assert registry.champion_model_path("toy", tracking_uri=uri) is None

    def register(version: int, score: float, split: str = "split-1", rows: dict | None = None,
                 metric: str = "exact_match") -> dict:
        shutil.copytree(merged[0] / "merged", tmp_path / f"model-{version}")
        run_id = client.create_run(experiment).info.run_id
        return registry.register_model(task="toy", model_path=tmp_path / f"model-{version}", run_id=run_id,
                                      eval_score=score, eval_version=split, tracking_uri=uri,
                                      scores={"metric": metric, "rows": rows or {"r1": score, "r2": score}})

    first = register(1, 0.70)
    assert first == {"registered_model": "ftpipe-toy", "registered_version": 1, "champion": True,
                     "compared": "no champion before", "previous_champion_version": None}
    second = register(2, 0.60)
    assert second == {**first, "registered_version": 2, "champion": False, "previous_champion_version": 1,
                      "compared": "0.600 against the champion's 0.700 on the 2 eval rows both were scored on: gain "
                                  "-0.100, 95% CI -0.100 … -0.100"}
    assert int(client.get_model_version_by_alias("ftpipe-toy", "candidate").version) == 2
    assert int(client.get_model_version_by_alias("ftpipe-toy", "champion").version) == 1
    assert registry.aliased_model_names("toy", tracking_uri=uri) == {"model-1", "model-2"}
    third = register(3, 0.80)
    assert third["champion"] is True and third["previous_champion_version"] == 1
    unrelated = register(4, 0.99, split="split-2", rows={"x1": 0.99})
    assert unrelated["champion"] is False and unrelated["compared"].startswith(
        "the champion was scored on another eval split, with no row in common: not comparable; make it the champion "
        "with MlflowClient().set_registered_model_alias('ftpipe-toy', 'champion', <version>)")
    version = client.get_model_version("ftpipe-toy", "3")
    assert version.run_id and version.tags == {"eval_score": "0.8", "eval_version": "split-1",
                                               "model_path": str(tmp_path / "model-3")}
    assert registry.champion_model_path("toy", tracking_uri=uri) == (tmp_path / "model-3").resolve()
    assert registry.aliased_model_names("toy", tracking_uri=uri) == {"model-3", "model-4"}
    grown = register(5, 0.70, split="split-3", rows={"r1": 1.0, "r2": 0.8, "new": 0.3})  # r1, r2 kept their side
    assert grown["champion"] is True and grown["compared"] == (
        "0.900 against the champion's 0.800 on the 2 eval rows both were scored on: gain +0.100, 95% CI +0.000 … "
        "+0.200, which may be noise"), "one row better, the other the same: the interval says it may be chance"
    tie = register(50, 0.70, split="split-3", rows={"r1": 1.0, "r2": 0.8, "new": 0.3})
    assert tie["champion"] is False and tie["compared"] == (
        "a tie: the champion's score, 0.700, on each of the 3 eval rows both were scored on"), "not 'may be noise'"
    by_fields = register(6, 0.95, split="split-3", rows={"r1": 1.0, "r2": 1.0, "new": 0.85}, metric="field_accuracy")
    assert by_fields["champion"] is False and by_fields["compared"].startswith(
        "the champion was judged by exact_match, this model by field_accuracy: not comparable; make it the champion")
    (tmp_path / "model-5" / registry.EVAL_SCORES).unlink()  # a champion registered before row scores were kept
    later = register(7, 0.75, split="split-3")
    assert later["champion"] is True
    assert later["compared"] == "0.750 against the champion's 0.700 on the same eval split"
    (tmp_path / "model-7" / registry.EVAL_SCORES).unlink()
    assert register(8, 0.99, split="split-4")["compared"].startswith(
        "the champion was registered without its score on each eval row, and on another eval split: not comparable")

    shutil.rmtree(tmp_path / "model-1")  # what pruning does to a model that is neither champion nor candidate
    assert registry.mark_removed_versions("toy", tracking_uri=uri) == [1]
    assert client.get_model_version("ftpipe-toy", "1").tags["files"] == "removed"
    logged = [Path(urlsplit(client.get_model_version("ftpipe-toy", v).source).path) / "MLmodel" for v in ("1", "2")]
    assert [path.exists() for path in logged] == [False, True], "the MLflow copy of a pruned model goes with it"
    assert "files" not in client.get_model_version("ftpipe-toy", "2").tags
    assert registry.mark_removed_versions("toy", tracking_uri=uri) == []


def test_a_registered_version_is_an_mlflow_transformers_model_of_the_merged_weights(merged, tmp_path, monkeypatch):
    """The registry's champion loads with `mlflow.transformers.load_model` (the merged weights and tokenizer) and with
    MLflow's pyfunc serving (an OpenAI-style chat signature, with an input example)."""
    import mlflow
    import torch
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftpipe.core.tracking import ensure_experiment

    root, _ = merged
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    run_id = client.create_run(ensure_experiment(client, "ftpipe-toy")).info.run_id

    def register() -> dict:
        return registry.register_model(task="toy", model_path=root / "merged", run_id=run_id, eval_score=0.5,
                                      eval_version="split-1", scores={"metric": "accuracy", "rows": {"r1": 0.5}},
                                      tracking_uri=uri)

    registered, again = register(), register()
    assert again["registered_version"] == registered["registered_version"] == 1, "once per folder"
    assert again["champion"] and again["compared"] == "as before"
    version = client.get_model_version("ftpipe-toy", "1")
    assert version.tags["model_path"] == str(root / "merged") and version.run_id == run_id
    [output] = client.get_run(run_id).outputs.model_outputs  # the logged model is an output of the training run
    assert client.get_logged_model(output.model_id).artifact_location == version.source
    assert registry.champion_model_path("toy", tracking_uri=uri) == root / "merged"
    info = mlflow.models.get_model_info("models:/ftpipe-toy@champion")
    assert "transformers" in info.flavors and info.signature.inputs.input_names()[0] == "messages"
    assert info.saved_input_example_info is not None

    pipeline = mlflow.transformers.load_model("models:/ftpipe-toy@champion")
    stored = AutoModelForCausalLM.from_pretrained(root / "merged", dtype="auto").state_dict()
    loaded = pipeline.model.state_dict()
    assert loaded.keys() == stored.keys() and all(torch.equal(loaded[name], stored[name]) for name in stored)
    assert pipeline.tokenizer.chat_template == AutoTokenizer.from_pretrained(root / "merged").chat_template
    reply = mlflow.pyfunc.load_model("models:/ftpipe-toy@champion").predict(registry.CHAT_EXAMPLE)
    assert reply[0]["choices"][0]["message"]["role"] == "assistant"


def test_parity_is_checked_on_the_shortest_held_out_prompts(tmp_path):
    rows = toy_rows(20, seed=2)
    pasted = [{**row, "messages": [{"role": "user", "content": f"{row['messages'][-2]['content']} {'log line ' * 300}"},
                                   row["messages"][-1]]} for row in toy_rows(5, seed=9)]
    write_chat_parquet(tmp_path / "eval.parquet", pasted + rows)
    chosen = merging.parity_prompts(tmp_path / "eval.parquet", 16)
    assert len(chosen) == 16 and not any("log line" in m["content"] for prompt in chosen for m in prompt)
