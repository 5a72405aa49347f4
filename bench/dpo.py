"""DPO throughput and memory: ftpipe's preference stage against plain TRL `DPOTrainer` scripts, side by side.

    python bench/dpo.py                   # the tests' tiny Llama, 20 steps
    python bench/dpo.py --real            # SmolLM2-135M-Instruct, the default base model (from its GGUF file)
    python bench/dpo.py --model DIR       # any local model folder (safetensors + tokenizer)
    python bench/dpo.py --steps 10 --repeats 3

Every side starts from the same SFT model (the base with a LoRA adapter merged in) and trains a new LoRA adapter
with DPO on the same pairs, with the same seed, steps, batch size and settings:

1. ftpipe: `python -m ftpipe.core.training SPEC.json`, the real program (objective dpo, `start_adapter` the SFT
   adapter); its reference is the policy with the new adapter disabled.
2. plain TRL: a script writing its `DPOConfig` and `LoraConfig` out by hand (checked equal to ftpipe's before any
   run) with `ref_model=None`, which TRL also turns into the disabled-adapter reference: the throughput baseline,
   ftpipe / plain TRL (target >= 0.95).
3. plain TRL, separate reference: the same script given `ref_model` = a second copy of the SFT model: the memory
   baseline, what a reference model costs when it is held.

Every run is a fresh subprocess, one after another, the order alternated between repeats. A probe installed in
the subprocess times `DPOTrainer.train()` (model load and data preparation excluded) and counts the non-padding
tokens of its training batches (chosen and rejected); peak memory is the process's (allocated CUDA memory on a
GPU, resident memory on a CPU, where the Python process and torch take most of it for a small model).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from ftpipe.config import TrainingConfig  # noqa: E402
from ftpipe.core.preferences import read_preferences, write_preferences  # noqa: E402
from ftpipe.core.results import read_result  # noqa: E402
from ftpipe_tests.tiny_model import COLORS, CORPUS, build_tiny_model  # noqa: E402
from train import (  # noqa: E402
    child_env, hand_written_arguments, hand_written_lora, run_ftpipe_program, settings_differences,
)

TARGET_RATIO = 0.95
TRAIN_PAIRS, EVAL_PAIRS = 128, 16
SIDES = {"ftpipe": "ftpipe", "plain TRL": "disabled", "plain TRL, separate reference": "copy"}


# ---------------------------------------------------------------- workspace


def preference_rows(count: int, seed: int) -> list[dict]:
    """Pairs on the fruit colors, the right color over a wrong one, after 1-6 filler sentences (lengths vary)."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        fruit = rng.choice(sorted(COLORS))
        wrong = rng.choice(sorted(set(COLORS.values()) - {COLORS[fruit]}))
        question = " ".join(rng.choices(CORPUS, k=rng.randint(1, 6))) + f" What color is the {fruit}? ({index})"
        prompt = [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": question}]
        rows.append({"id": f"{seed}-{index}", "prompt": prompt, "chosen": COLORS[fruit], "rejected": wrong,
                     "completion": None, "label": None, "source": f"bench:{index + 1}"})
    return rows


def base_model(root: Path, args: argparse.Namespace) -> Path:
    """`--model`, the default base model resolved (and cached) as the pipeline does, or the tests' tiny random Llama."""
    if args.model:
        return Path(args.model)
    if not args.real:
        return build_tiny_model(root / "model")
    from ftpipe.core.layout import models_dir
    from ftpipe.core.modeling import DEFAULT_MODEL_ALIAS, resolve_base_model

    return Path(resolve_base_model(DEFAULT_MODEL_ALIAS, models_dir())["path"])


def sft_adapter(model_dir: Path, out: Path, training: dict) -> Path:
    """A LoRA adapter of the training's LoRA settings on the base (peft's initialisation): the SFT stage's output."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from ftpipe.core.training.setup import lora_config

    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                   lora_config(TrainingConfig.model_validate(training))).save_pretrained(out)
    return out


def prepare(root: Path, args: argparse.Namespace, training: dict) -> dict[str, str]:
    model_dir = base_model(root, args)
    train, evals = root / "train_preferences.parquet", root / "eval_preferences.parquet"
    write_preferences(preference_rows(TRAIN_PAIRS, seed=1), train)
    write_preferences(preference_rows(EVAL_PAIRS, seed=2), evals)
    return {"model_dir": str(model_dir), "sft_dir": str(sft_adapter(model_dir, root / "sft", training)),
            "train_path": str(train), "eval_path": str(evals)}


# ---------------------------------------------------------------- inside a run's subprocess


def install_probe(result_path: Path) -> None:
    """Time `DPOTrainer.train()`, count the non-padding tokens its training steps see and take the process's peak
    memory after it; write them out."""
    from trl import DPOTrainer

    from ftpipe.core.training.sizing import peak_memory_gib

    train, training_step = DPOTrainer.train, DPOTrainer.training_step
    counts = []

    def counting_step(self, model, inputs, *args, **kwargs):
        counts.append(inputs["attention_mask"].sum())
        return training_step(self, model, inputs, *args, **kwargs)

    def timed_train(self, *args, **kwargs):
        counts.clear()
        started = time.perf_counter()
        output = train(self, *args, **kwargs)
        seconds = time.perf_counter() - started
        reference = sum(p.numel() * p.element_size() for p in self.ref_model.parameters()) if self.ref_model else 0
        result_path.write_text(json.dumps({"seconds": seconds, "tokens": sum(int(count) for count in counts),
                                           "peak_memory_gib": peak_memory_gib(), "reference_bytes": reference}))
        return output

    DPOTrainer.train, DPOTrainer.training_step = timed_train, counting_step


def plain_datasets(job: dict):
    """TRL's conversational pairs from the preference files."""
    from datasets import Dataset

    def load(path: str) -> Dataset:
        return Dataset.from_list([{"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": row["chosen"]}],
                                   "rejected": [{"role": "assistant", "content": row["rejected"]}]}
                                  for row in read_preferences(Path(path))])

    return load(job["train_path"]), load(job["eval_path"])


def same_settings_args(job: dict):
    """DPOConfig + LoraConfig written out by hand with the values of ftpipe's TrainingConfig in the job."""
    from trl import DPOConfig

    t = job["training"]
    args = DPOConfig(**hand_written_arguments(t, job["output_dir"]), beta=t["preference"]["beta"])
    return args, hand_written_lora(t)


def check_same_settings(root: Path, training: dict) -> None:
    """Exit unless the plain script's DPOConfig and LoraConfig equal the ones ftpipe's program builds."""
    from trl import DPOConfig

    from ftpipe.core.training.preference import preference_config
    from ftpipe.core.training.setup import lora_config, trainer_arguments

    config = TrainingConfig.model_validate(training)
    plain_args, plain_lora = same_settings_args({"training": training, "output_dir": str(root / "plain-check")})
    ours = preference_config(DPOConfig, config, trainer_arguments(config, root / "ftpipe-check"))
    differences = [*settings_differences(ours, plain_args, ignored={"output_dir", "logging_dir"}),
                   *settings_differences(lora_config(config), plain_lora, ignored=set())]
    if differences:
        sys.exit("the plain TRL baseline does not train like ftpipe (ftpipe != plain):\n  " + "\n  ".join(differences))


def run_plain_trl(job_path: str) -> None:
    """The plain TRL script: the SFT model (base + SFT adapter merged), DPOTrainer(...).train()."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, EarlyStoppingCallback
    from trl import DPOTrainer

    job = json.loads(Path(job_path).read_text())
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    device_map = {"": torch.cuda.current_device()} if on_gpu else None

    def sft_model():
        base = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=dtype, device_map=device_map,
                                                    use_kernels=False)  # as ftpipe: no kernels from the Hub
        return PeftModel.from_pretrained(base, job["sft_dir"]).merge_and_unload()

    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    train, evals = plain_datasets(job)
    args, peft = same_settings_args(job)
    trainer = DPOTrainer(
        model=sft_model(), ref_model=sft_model() if job["reference"] == "copy" else None, args=args,
        train_dataset=train, eval_dataset=evals, processing_class=tokenizer, peft_config=peft,
        callbacks=[EarlyStoppingCallback(job["training"]["early_stopping_patience"])],
    )
    trainer.train()


def child(kind: str, job_path: str, result_path: str) -> None:
    install_probe(Path(result_path))
    if kind == "ftpipe":
        run_ftpipe_program(job_path)
    else:
        run_plain_trl(job_path)


# ---------------------------------------------------------------- the parent: one subprocess per run


def job_of(root: Path, name: str, reference: str, paths: dict, training: dict) -> dict:
    """ftpipe's training spec (reference `ftpipe`), or the plain script's job."""
    if reference != "ftpipe":
        return {**paths, "reference": reference, "training": training, "output_dir": str(root / name / "checkpoints")}
    return {
        "task": "bench", "base_model_dir": paths["model_dir"], "base_fingerprint": "bench", "split_version": "bench",
        "train_path": paths["train_path"], "eval_path": paths["eval_path"], "start_adapter": paths["sft_dir"],
        "output_dir": str(root / name / "adapter"), "checkpoint_dir": str(root / name / "checkpoints"),
        "training": training, "mlflow": {"experiment": "bench", "run_name": name},
    }


def run_child(root: Path, name: str, job: dict) -> dict:
    """Run one training in a fresh subprocess; its probe's figures (and ftpipe's own tokens/s)."""
    kind = "plain" if "reference" in job else "ftpipe"
    job_path, result_path, log_path = (root / f"{name}{suffix}" for suffix in (".json", ".result.json", ".log"))
    job_path.write_text(json.dumps(job))
    with log_path.open("w") as log:
        command = [sys.executable, __file__, "_child", kind, str(job_path), str(result_path)]
        status = subprocess.run(command, cwd=REPO_ROOT, env=child_env(root), stdout=log, stderr=subprocess.STDOUT)
    if status.returncode != 0:
        sys.exit(f"{name} failed (exit {status.returncode}):\n{log_path.read_text()[-4000:]}")
    result = json.loads(result_path.read_text())
    if kind == "ftpipe":
        result["own_tokens_per_second"] = read_result(Path(job["output_dir"])).metadata["tokens_per_second"]
    result["tokens_per_second"] = result["tokens"] / result["seconds"]
    print(f"  {name}: {result['tokens_per_second']:.0f} tokens/s, peak {result['peak_memory_gib']:.2f} GiB", flush=True)
    return result


def compare(root: Path, paths: dict, training: dict, repeats: int) -> dict[str, list[dict]]:
    runs = {side: [] for side in SIDES}
    for repeat in range(repeats):
        for side in list(SIDES)[:: 1 if repeat % 2 == 0 else -1]:  # alternate who goes first
            name = f"{SIDES[side]}-{repeat}"
            runs[side].append(run_child(root, name, job_of(root, name, SIDES[side], paths, training)))
    return runs


def median(runs: list[dict], key: str) -> float:
    return sorted(run[key] for run in runs)[(len(runs) - 1) // 2]


def report(runs: dict[str, list[dict]], args: argparse.Namespace, model: str) -> None:
    print(f"\nDPO from an SFT model ({model}), LoRA r16 a32 all-linear, batch 8, beta 0.1, {args.steps} steps, "
          f"median of {args.repeats}")
    print(f"{'side':<31}{'tokens/s':>10}{'train s':>9}{'tokens':>8}{'peak GiB':>10}{'reference MiB':>15}")
    for side, side_runs in runs.items():
        print(f"{side:<31}{median(side_runs, 'tokens_per_second'):>10.0f}{median(side_runs, 'seconds'):>9.1f}"
              f"{median(side_runs, 'tokens'):>8}{median(side_runs, 'peak_memory_gib'):>10.3f}"
              f"{median(side_runs, 'reference_bytes') / 2**20:>15.1f}")
    print(f"ftpipe's own result.json tokens_per_second: {median(runs['ftpipe'], 'own_tokens_per_second'):.0f}")
    speed = median(runs["ftpipe"], "tokens_per_second") / median(runs["plain TRL"], "tokens_per_second")
    print(f"tokens/s ftpipe / plain TRL: {speed:.2f}x (target >= {TARGET_RATIO})")
    ours, held = (median(runs[side], "peak_memory_gib") for side in ("ftpipe", "plain TRL, separate reference"))
    weights = median(runs["plain TRL, separate reference"], "reference_bytes") / 2**20
    print(f"peak memory ftpipe - plain TRL with a separate reference: {(ours - held) * 1024:+.0f} MiB "
          f"(the separate reference's weights: {weights:.1f} MiB)")


def run(root: Path, args: argparse.Namespace, model: str) -> None:
    """Check the settings match, prepare the SFT model and pairs under `root`, run every side and print the table."""
    training = TrainingConfig.model_validate({
        "stages": ["sft", "dpo"], "adapter": "lora", "quantization": "none", "preference": {"max_steps": args.steps},
    }).for_stage("dpo").model_dump()
    root.mkdir(parents=True, exist_ok=True)
    check_same_settings(root, training)
    paths = prepare(root, args, training)
    report(compare(root, paths, training, args.repeats), args, model)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct instead of the tiny test model")
    parser.add_argument("--model", help="a local model folder (safetensors + tokenizer)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="runs per side (median)")
    return parser.parse_args(argv)


def main() -> None:
    if sys.argv[1:2] == ["_child"]:
        child(*sys.argv[2:5])
        return
    args = parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ftpipe-bench-dpo-") as tmp:
        run(Path(tmp), args, args.model or ("SmolLM2-135M-Instruct" if args.real else "tiny random Llama"))
    print(f"\n(bench wall time {time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
