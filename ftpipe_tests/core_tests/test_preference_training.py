"""The preference objectives (dpo, orpo, kto) of the training program, run for real as a subprocess on the tiny model
from an SFT adapter of it; plus the adapter combination and the pure helpers."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest

from ftpipe.config import TrainingConfig
from ftpipe.core.preferences import write_preferences
from ftpipe.core.results import Result, read_result
from ftpipe.core.training import checkpoints, preference
from ftpipe.core.training.methods import PREFERENCE_OBJECTIVES, Method
from ftpipe.core.training.outputs import likelihood_displacement
from ftpipe.core.training.program import EXIT_REFUSED
from ftpipe.core.training.reporting import REWARD_METRICS
from ftpipe.core.training.sizing import after_first_step
from ftpipe.core.training.spec import TrainingSpec, training_fingerprint
from ftpipe_tests.tiny_model import COLORS, toy_rows
from ftpipe_tests.trained_models import full_finetune, lora_adapter
from ftpipe_tests.training_program import (
    SMALL_TRAINING, kill_after_logging_past_a_checkpoint, mlflow_client, run_to_end, start, write_spec,
)

PAIRS, LONG_PAIRS, UNPAIRED, EVAL_PAIRS = 24, 2, 6, 8
SFT_RANK, PREFERENCE_RANK = 8, TrainingConfig().lora.r  # trained_models.lora_adapter's rank, the default rank
STEPS = 8  # logged every 2 steps, evaluated every 4


def preference_rows(count: int, *, seed: int, paired: bool = True, long: bool = False) -> list[dict]:
    """Canonical preference rows on the fruit colors: the right color chosen over a wrong one (paired), or one color
    labelled desirable when it is right (unpaired); `long` rows are over the specs' max_length."""
    rng, rows = random.Random(seed), []
    for index in range(count):
        fruit = rng.choice(sorted(COLORS))
        right, wrong = COLORS[fruit], rng.choice(sorted(set(COLORS.values()) - {COLORS[fruit]}))
        question = f"What color is the {fruit}? ({seed}-{index})" * (20 if long else 1)
        prompt = [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": question}]
        answer = rng.choice([right, wrong])
        sides = ({"chosen": right, "rejected": wrong, "completion": None, "label": None} if paired
                 else {"chosen": None, "rejected": None, "completion": answer, "label": answer == right})
        rows.append({"id": f"{seed}-{index}", "prompt": prompt, **sides, "source": f"prefs.jsonl:{index + 1}"})
    return rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny base, an SFT adapter (r=8, random factors) and a full fine-tune of it, and preference rows: train
    (pairs, long pairs, unpaired rows), eval (pairs) and unpaired rows only."""
    root = tmp_path_factory.mktemp("preference")
    (root / "base").symlink_to(tiny_model_dir)
    lora_adapter(root / "base", root / "sft", random_weights=True)
    full_finetune(root / "base", root / "sft-full", toy_rows(16, seed=1), steps=5)
    write_preferences(preference_rows(PAIRS, seed=1) + preference_rows(LONG_PAIRS, seed=2, long=True)
                      + preference_rows(UNPAIRED, seed=3, paired=False), root / "train_preferences.parquet")
    write_preferences(preference_rows(EVAL_PAIRS, seed=4), root / "eval_preferences.parquet")
    write_preferences(preference_rows(UNPAIRED, seed=5, paired=False), root / "unpaired.parquet")
    return root


def preference_spec(root: Path, name: str, objective: str, *, start: str = "sft", train: str = "train_preferences",
                    steps: int = STEPS, sizing: dict | None = None, **training) -> Path:
    """`root/<name>.json`: the preference stage `objective` (`steps` steps, `training` settings) from `root/<start>`
    on the workspace's preference rows, with the asset's `sizing` entry."""
    training = TrainingConfig.model_validate({
        **SMALL_TRAINING, **training, "stages": ["sft", objective],
        "preference": {"max_steps": steps, "learning_rate": 5e-3},
    }).for_stage(objective)
    path = write_spec(root, name, sizing=sizing)
    spec = json.loads(path.read_text())
    spec.update(train_path=str(root / f"{train}.parquet"), eval_path=str(root / "eval_preferences.parquet"),
                start_adapter=str(root / start), training=training.model_dump())
    path.write_text(json.dumps(spec))
    return path


def published(spec: Path) -> Result:
    return read_result(Path(json.loads(spec.read_text())["output_dir"]), "preference_adapter")


def logits(model_dir: Path, adapter: Path | None = None, *, merge_first: Path | None = None):
    """Logits of a fixed input: the model at `model_dir` (with `merge_first` merged into it), with `adapter` on top."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if merge_first:
        model = PeftModel.from_pretrained(model, merge_first).merge_and_unload()
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 20, 33, 7, 2]])).logits


@pytest.fixture(scope="module", params=PREFERENCE_OBJECTIVES)
def trained(request, workspace) -> tuple[str, Path, str, Result]:
    """(objective, spec, stdout, result) of a preference training from the SFT adapter."""
    objective = request.param
    spec = preference_spec(workspace, objective, objective, sizing=after_first_step(seconds_left=1.0))
    stdout = run_to_end(workspace, spec)
    return objective, spec, stdout, published(spec)


@pytest.mark.slow
def test_each_objective_publishes_the_contract_metadata(trained):
    objective, spec, stdout, result = trained
    metadata = result.metadata
    assert result.kind == "preference_adapter" and result.reuse_key == TrainingSpec.from_json(spec).fingerprint
    assert result.inputs["start_adapter"] == str(spec.parent / "sft")
    assert {"objective", "adapter_path", "train_loss", "eval_loss", "reward_accuracy", "reward_margin", "pairs_train",
            "pairs_eval", "tokens_per_second", "mlflow_run_id", "likelihood_displacement"} <= metadata.keys()
    assert metadata["objective"] == objective and metadata["steps"] == STEPS and metadata["tokens_per_second"] > 0
    rows_per_pair = 2 if objective == "kto" else 1  # kto trains on each side of a pair as its own row
    extra_rows = UNPAIRED if objective == "kto" else 0  # dpo and orpo leave the unpaired rows out
    assert metadata["pairs_train"] == PAIRS * rows_per_pair + extra_rows
    assert metadata["pairs_eval"] == EVAL_PAIRS * rows_per_pair
    assert metadata["rows_too_long"] == LONG_PAIRS * rows_per_pair
    assert math.isfinite(metadata["reward_margin"]) and isinstance(metadata["likelihood_displacement"], bool)
    if objective == "kto":
        assert metadata["reward_accuracy"] is None, "kto's unpaired rows give no reward accuracy"
    else:
        assert 0.0 <= metadata["reward_accuracy"] <= 1.0
    assert metadata["reward_curve"].startswith("![reward curve](data:image/png;base64,")
    assert result.produced["reward_curve"] == "reward_curve.png"
    assert re.search(rf"step {STEPS}/{STEPS}: loss [0-9.]+, reward margin -?[0-9.]+", stdout)
    # not sized before it starts: its first step gives the estimate, beyond the run's 1 s under dagster/max_runtime
    assert re.search(rf"sizing: step 1/{STEPS} took [0-9]+ s: ~[0-9]+ s for the other steps, evaluations apart", stdout)
    assert re.search(r"sizing: the other steps need ~[0-9.]+ min but this run's dagster/max_runtime leaves 0.0 min",
                     stdout), stdout


@pytest.mark.slow
def test_each_objective_publishes_one_adapter_on_the_base_with_both_updates(trained):
    _, spec, _, result = trained
    root, adapter = spec.parent, Path(result.metadata["adapter_path"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == SFT_RANK + PREFERENCE_RANK and config["lora_alpha"] == config["r"]
    assert not (adapter / "ref").exists() and result.produced["weights"] == ["adapter_model.safetensors"]
    sft_only, combined = logits(root / "base", root / "sft"), logits(root / "base", adapter)
    assert (combined - sft_only).abs().max() > 1e-4, "the preference update is in the published adapter"


@pytest.mark.slow
def test_each_objective_logs_rewards_to_mlflow_at_every_logging_step(trained):
    objective, spec, _, result = trained
    client = mlflow_client(spec.parent)
    run_id = result.metadata["mlflow_run_id"]
    expected = [name for name in REWARD_METRICS if not (objective == "kto" and name == "rewards/accuracies")]
    for name in ("train_loss", *expected):
        assert [m.step for m in client.get_metric_history(run_id, name)] == [2, 4, 6, 8], name
    assert [m.step for m in client.get_metric_history(run_id, "eval_rewards/margins")] == [4, 8]
    params = client.get_run(run_id).data.params
    assert params["preference.beta"] == "0.1" and params["objective"] == objective


def random_lora(model, out: Path, **settings) -> Path:
    """A LoRA adapter with random A and B (`settings` of peft's LoraConfig) on `model`, saved to `out`."""
    from peft import LoraConfig, get_peft_model

    get_peft_model(model, LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **settings)).save_pretrained(out)
    return out


def test_combined_adapter_equals_the_sft_model_merged_then_the_preference_adapter(workspace, tmp_path):
    """SFT on q/k projections, preference on k/v/o: shared modules stack, the others get zero blocks."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = workspace / "base"
    sft = random_lora(AutoModelForCausalLM.from_pretrained(base), tmp_path / "sft", r=4, lora_alpha=8,
                      target_modules=["q_proj", "k_proj"])
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), sft).merge_and_unload()
    preference_only = random_lora(merged, tmp_path / "preference", r=6, lora_alpha=3, use_rslora=True,
                                  target_modules=["k_proj", "v_proj", "o_proj"])
    (tmp_path / "combined").mkdir()
    preference.combine_adapters(sft, preference_only, tmp_path / "combined")

    config = json.loads((tmp_path / "combined" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (10, 10, False)
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    step_by_step = logits(base, preference_only, merge_first=sft)
    assert (logits(base, tmp_path / "combined") - step_by_step).abs().max() < 1e-5
    assert (logits(base, sft) - step_by_step).abs().max() > 1e-3, "the preference adapter changes the SFT model"


def test_likelihood_displacement_needs_chosen_answers_below_the_reference_and_a_positive_margin():
    def history(chosen: list[float], margins: list[float], logps: list[float]) -> list[dict]:
        return [{"step": 2 * i + 2, "loss": 0.6, "rewards/chosen": c, "rewards/margins": m, "logps/chosen": p}
                for i, (c, m, p) in enumerate(zip(chosen, margins, logps))]

    displaced = history([0.0, -0.02, -0.05], [0.0, 0.1, 0.3], [-170.0, -172.0, -175.0])
    assert likelihood_displacement({}, displaced), "no evaluation: the last logged step"
    other_batches = history([0.004, 0.02, 0.043], [0.0, 0.1, 0.3], [-172.3, -165.0, -178.0])
    assert not likelihood_displacement({}, other_batches), "batch log-probabilities of other rows say nothing"
    assert not likelihood_displacement({}, history([-0.1, -0.2], [0.0, -0.1], [-10.0, -11.0])), "no margin"
    kept = {"eval_rewards/chosen": 0.01, "eval_rewards/margins": 0.2}
    assert not likelihood_displacement(kept, displaced), "the kept model's evaluation decides"
    assert likelihood_displacement({"eval_rewards/chosen": -0.01, "eval_rewards/margins": 0.2}, other_batches)
    assert not likelihood_displacement({}, [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.9}]), "an SFT history"



def test_orpo_without_a_reference_model_is_never_said_to_displace_it(tmp_path):
    from types import SimpleNamespace

    from ftpipe.core.training.outputs import reward_metadata

    curve = tmp_path / "rewards.png"
    curve.write_bytes(b"png")
    below_zero = [{"step": 4, "loss": 0.6, "rewards/chosen": -0.9, "rewards/margins": 0.3}]  # ORPO: beta * log p
    trainer = SimpleNamespace(state=SimpleNamespace(log_history=below_zero, best_model_checkpoint=None))
    assert reward_metadata(trainer, "dpo", curve)["likelihood_displacement"] is True
    assert reward_metadata(trainer, "orpo", curve)["likelihood_displacement"] is False


@pytest.mark.slow
def test_on_a_cpu_long_pairs_go_through_in_smaller_passes_and_a_step_keeps_its_pairs(workspace):
    from ftpipe.core.training.program import build_trainer
    from ftpipe.core.training.reporting import NewStepsOnly
    from ftpipe.core.training.spec import TrainingSpec
    from ftpipe_tests.training_program import Quiet

    write_preferences(preference_rows(16, seed=6, long=True) + preference_rows(UNPAIRED, seed=7, paired=False),
                      workspace / "long_preferences.parquet")

    def passes(objective: str, train: str) -> tuple[int, int]:  # the long pairs' file kept whole, the other's cut
        longest = 4096 if train == "long_preferences" else 64
        spec = TrainingSpec.from_json(preference_spec(workspace, f"passes-{objective}-{train}", objective, train=train,
                                                      max_length=longest))
        trainer, _, _ = build_trainer(spec, spec.config(), Method(objective, "lora", "none"), Quiet(),
                                      NewStepsOnly(Quiet(), False))
        return trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps

    assert passes("dpo", "train_preferences") == (4, 2), "short pairs: 4 pairs (8 answers of ~40 tokens) a pass"
    assert passes("dpo", "long_preferences") == (1, 8), "long pairs: one a pass, the same 8 pairs a step"
    assert passes("kto", "long_preferences") == (8, 1), "kto's KL term needs the whole batch in its pass"


def test_rows_become_trl_rows_and_long_ones_are_dropped_or_kept_for_truncation_and_counted():
    from ftpipe_tests.tiny_model import build_tokenizer

    rows = preference_rows(3, seed=1) + preference_rows(1, seed=2, long=True) + preference_rows(2, seed=3, paired=False)
    pairs, single = preference.paired_examples(rows), preference.unpaired_examples(rows)
    assert len(pairs) == 4 and pairs[0]["chosen"] == [{"role": "assistant", "content": rows[0]["chosen"]}]
    assert pairs[0]["prompt"] == rows[0]["prompt"] and pairs[0]["prompt"][-1]["role"] == "user"
    assert [row["label"] for row in single] == [True, False] * 4 + [rows[4]["label"], rows[5]["label"]]
    assert single[1]["completion"] == [{"role": "assistant", "content": rows[0]["rejected"]}]
    tokenizer = build_tokenizer()
    (kept, over), (truncated, over_too) = (preference.fit_examples(pairs, tokenizer, 64, way) for way in ("drop",
                                                                                                         "truncate"))
    assert kept == pairs[:3] and truncated == pairs and len(over) == 1 and over == over_too and over[0] > 64
    kept, over = preference.fit_examples(single, tokenizer, 64, "drop")
    assert kept == single[:6] + single[8:] and len(over) == 2 and min(over) > 64


def test_the_start_adapters_weights_are_part_of_the_fingerprint_and_sft_fingerprints_stay(workspace, tmp_path):
    from safetensors.torch import load_file, save_file

    def fingerprint(start: Path) -> str:
        return TrainingSpec.from_json(preference_spec(workspace, "fingerprint", "dpo", start=str(start))).fingerprint

    copy = shutil.copytree(workspace / "sft", tmp_path / "copy")
    changed = shutil.copytree(workspace / "sft", tmp_path / "changed")
    weights = load_file(changed / "adapter_model.safetensors")
    weights[min(weights)] += 1.0
    save_file(weights, changed / "adapter_model.safetensors")
    assert fingerprint(workspace / "sft") == fingerprint(copy) != fingerprint(changed)
    sft = TrainingSpec.from_json(write_spec(workspace, "sft-fingerprint"))
    assert sft.fingerprint == training_fingerprint("toy-split", "tiny", sft.config().recipe())


def test_preference_trainings_that_cannot_run_are_refused_before_any_model_loads(workspace):
    def refusal(objective: str, **changes) -> str:
        spec = TrainingSpec.from_json(preference_spec(workspace, f"refused-{objective}", objective, **changes))
        with pytest.raises(ValueError) as refused:
            preference.check(spec, spec.config())
        return str(refused.value)

    assert refusal("dpo", train="unpaired").startswith("dpo trains on paired preference rows (prompt, chosen,")
    assert refusal("orpo", train="unpaired").endswith("use kto for rows with a completion and a label")
    assert "a whole model but training.adapter is lora" in refusal("dpo", start="sft-full")
    assert "a LoRA adapter but training.adapter is none" in refusal("kto", adapter="none")
    single = TrainingSpec.from_json(preference_spec(workspace, "kto-batch", "kto"))
    single.training["batch_size"] = 1
    with pytest.raises(ValueError, match="kto needs training.batch_size of at least 2 per process"):
        preference.check(single, single.config())
    kto = TrainingSpec.from_json(preference_spec(workspace, "kto-unpaired", "kto", train="unpaired"))
    preference.check(kto, kto.config())  # kto trains on unpaired rows


def test_a_pairs_objective_without_pairs_is_refused_by_the_program_in_one_line(workspace):
    spec = preference_spec(workspace, "no-pairs", "dpo", train="unpaired")
    process = start(workspace, spec)
    stdout, _ = process.communicate(timeout=120)
    stderr = (workspace / "no-pairs.stderr").read_text().strip()
    assert process.returncode == EXIT_REFUSED, stdout + stderr
    assert stderr.splitlines() == [stderr] and "Traceback" not in stderr
    assert stderr.startswith("training refused: dpo trains on paired preference rows")
    assert not (workspace / "no-pairs" / "adapter").exists()


@pytest.mark.slow
def test_a_full_fine_tune_starts_from_the_sft_model_and_publishes_a_whole_model(workspace):
    from transformers import AutoModelForCausalLM

    spec = preference_spec(workspace, "dpo-full", "dpo", start="sft-full", adapter="none", steps=4)
    run_to_end(workspace, spec)
    result = published(spec)
    assert result.produced["weights"] == ["model.safetensors"] and result.produced["peft_adapter"] is False
    model_dir = Path(result.metadata["adapter_path"])
    assert not (model_dir / "adapter_config.json").exists()
    tuned = AutoModelForCausalLM.from_pretrained(model_dir)
    assert sum(p.numel() for p in tuned.parameters()) == result.metadata["trainable_params"]
    assert (logits(model_dir) - logits(workspace / "sft-full")).abs().max() > 1e-4


@pytest.mark.slow
def test_a_killed_dpo_training_resumes_in_the_same_mlflow_run(workspace):
    spec = preference_spec(workspace, "dpo-resume", "dpo", steps=24, logging_steps=1)
    checkpoint_dir = workspace / "dpo-resume" / "checkpoints"
    kill_after_logging_past_a_checkpoint(workspace, spec, checkpoint_dir)
    first_run_id = (checkpoint_dir / checkpoints.RUN_ID_FILE).read_text()

    stdout = run_to_end(workspace, spec)
    resumed = [line for line in stdout.splitlines() if line.startswith("resuming from checkpoint-")]
    assert len(resumed) == 1
    metadata = published(spec).metadata
    assert metadata["mlflow_run_id"] == first_run_id and metadata["steps"] == 24
    assert metadata["resumed_from_step"] == int(resumed[0].rsplit("-", 1)[1]) > 0
    client = mlflow_client(workspace)
    assert client.get_run(first_run_id).info.status == "FINISHED"
    for name in ("train_loss", "rewards/margins", "logps/chosen"):
        assert [m.step for m in client.get_metric_history(first_run_id, name)] == list(range(1, 25)), name


def test_a_full_fine_tunes_reference_is_a_frozen_copy_of_the_start_model(tiny_model_dir):
    """Not a second load by TRL, which would leave out ftpipe's loading settings (no kernels from the Hub)."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    from ftpipe.core.modeling import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(tiny_model_dir)
    reference = preference.frozen_reference(SimpleNamespace(model=model, peft_config=None))["ref_model"]
    assert reference is not model and not reference.use_kernels and not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    assert all((a == b).all() for a, b in zip(reference.parameters(), model.parameters(), strict=True))
    adapter = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert preference.frozen_reference(SimpleNamespace(model=adapter, peft_config=None)) == {}, "TRL disables it"
