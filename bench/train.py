"""Training throughput: ftpipe's training program against a plain TRL `SFTTrainer` script, side by side.

    python bench/train.py                       # random Llama (hidden 256, 4 layers), 30 steps
    python bench/train.py --repeats 3           # median of 3 runs per side (steadier on a busy machine)
    python bench/train.py --model DIR           # a real model dir (safetensors + tokenizer)
    python bench/train.py --model DIR --long --steps 4   # long rows: peak memory of each side
    python bench/train.py --model DIR --skewed --steps 6 # 1 row in 12 long: also ftpipe with one row a pass
    python bench/train.py --model DIR --quantization 4bit   # QLoRA (CUDA only)

1. Same settings: ftpipe (`python -m ftpipe.core.training SPEC.json`, the real program, with its
   TrainingConfig defaults and a 16/32-bit LoRA adapter) and a plain TRL script with the same model, data, seed,
   steps, batch size, max_length, LoRA config, schedule, eval/save cadence and completion-only loss. The plain
   script writes its SFTConfig and LoraConfig out by hand; before any run the bench checks that they equal the
   ones ftpipe builds (but for how ftpipe runs a batch: padding-free passes, the same rows per step), so the
   ratio compares like with like. Prints real (non-padding) tokens/s and peak memory of each and the ratio
   ftpipe / plain TRL (target >= 1.3). With --skewed, a third side: ftpipe with `micro_batch_size: 1`, how it ran
   a batch of such rows before its training passes had a token budget (micro-batches sized from the 95th
   percentile row, here one row).
2. Defaults: those ftpipe runs against `SFTConfig` defaults with a default peft `LoraConfig`, the same number
   of steps and the same data (prompt/completion); prints tokens/s and final eval loss.

Peak memory is the process's resident memory on a CPU, its allocated CUDA memory on a GPU. Every run is a fresh
subprocess, run one after another. Both sides are measured the same way by a probe
installed in the subprocess: wall time of `SFTTrainer.train()` (model load and data preparation excluded)
and the non-padding tokens of the batches its training steps processed; also a steady-state figure that
leaves out the first WARMUP_STEPS steps. ftpipe's own `tokens_per_second` (from its `result.json`,
train start to the last logged step) is printed beside it as a cross-check.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from ftpipe.config import TrainingConfig  # noqa: E402
from ftpipe.core.results import read_result  # noqa: E402
from ftpipe_tests.tiny_model import CORPUS, build_tokenizer, toy_rows, write_chat_parquet  # noqa: E402

TARGET_RATIO = 1.3
TRAIN_ROWS, EVAL_ROWS = 256, 32
WARMUP_STEPS = 3  # the first steps on CPU are several times slower (one-off initialisation)
LONG_ROWS = (25, 40)  # filler sentences of --long rows: about 300-450 tokens, like worked solutions
SKEWED_EVERY = 12  # --skewed: every 12th row long, the others short
ROW_A_PASS = "ftpipe, a row a pass"
MICRO_BATCHING = {"per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"}


# ---------------------------------------------------------------- workspace


def build_model(path: Path, hidden: int, layers: int) -> Path:
    """A random LlamaForCausalLM (safetensors) with the tests' ChatML tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 32, 1),
        num_key_value_heads=max(hidden // 64, 1),
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def chat_rows(count: int, seed: int, sentences: tuple[int, int] = (1, 6), long_every: int = 0) -> list[dict]:
    """toy_rows with filler sentences (between `sentences` counts, LONG_ROWS for every `long_every`th row) before
    each question, so lengths vary and padding matters."""
    rng = random.Random(seed)
    rows = toy_rows(count, seed=seed)
    for index, row in enumerate(rows):
        user = row["messages"][1]
        filler = LONG_ROWS if long_every and index % long_every == long_every - 1 else sentences
        user["content"] = " ".join(rng.choices(CORPUS, k=rng.randint(*filler))) + " " + user["content"]
    return rows


def prepare(root: Path, args: argparse.Namespace) -> dict[str, str]:
    model_dir = Path(args.model) if args.model else build_model(root / "model", args.hidden, args.layers)
    sentences, long_every = (LONG_ROWS if args.long else (1, 6)), (SKEWED_EVERY if args.skewed else 0)
    return {
        "model_dir": str(model_dir),
        "train_path": str(write_chat_parquet(root / "train.parquet", chat_rows(TRAIN_ROWS, 1, sentences, long_every))),
        "eval_path": str(write_chat_parquet(root / "eval.parquet", chat_rows(EVAL_ROWS, 2, sentences, long_every))),
    }


# ---------------------------------------------------------------- inside a run's subprocess


def install_probe(result_path: Path) -> None:
    """Time `SFTTrainer.train()` and count the non-padding tokens its training steps see; write them out.

    Also the steady state: the same from the start of the first step after WARMUP_STEPS to the end of train().
    """
    from trl import SFTTrainer

    from ftpipe.core.training.sizing import peak_memory_gib

    train, training_step = SFTTrainer.train, SFTTrainer.training_step
    counts, starts = [], []

    def counting_step(self, model, inputs, *args, **kwargs):
        starts.append(time.perf_counter())
        mask = inputs.get("attention_mask")
        counts.append(mask.sum() if mask is not None else inputs["input_ids"].numel())
        return training_step(self, model, inputs, *args, **kwargs)

    def timed_train(self, *args, **kwargs):
        counts.clear(), starts.clear()
        started = time.perf_counter()
        output = train(self, *args, **kwargs)
        ended = time.perf_counter()
        tokens = [int(count) for count in counts]
        warm = min(WARMUP_STEPS, len(tokens) - 1)
        timing = {
            "peak_memory_mb": peak_memory_gib() * 1024,
            "seconds": ended - started,
            "tokens": sum(tokens),
            "steady_seconds": ended - starts[warm],
            "steady_tokens": sum(tokens[warm:]),
        }
        result_path.write_text(json.dumps(timing))
        return output

    SFTTrainer.train, SFTTrainer.training_step = timed_train, counting_step


def run_ftpipe_program(spec_path: str) -> None:
    """`python -m ftpipe.core.training SPEC.json`, as __main__ (it exits with the program's status)."""
    sys.argv = ["ftpipe.core.training", spec_path]
    runpy.run_module("ftpipe.core.training", run_name="__main__", alter_sys=True)


def plain_datasets(job: dict):
    """Conversational prompt/completion datasets: TRL puts the loss on the completion only."""
    import pandas as pd
    from datasets import Dataset

    def load(path: str) -> Dataset:
        chats = [[dict(m) for m in messages] for messages in pd.read_parquet(path)["messages"]]
        return Dataset.from_list([{"prompt": chat[:-1], "completion": chat[-1:]} for chat in chats])

    return load(job["train_path"]), load(job["eval_path"])


def hand_written_arguments(t: dict, output_dir: str) -> dict:
    """The TrainingArguments every TRL config of a plain script gets, written out by hand from the values of a
    TrainingConfig dump `t` (the baseline never calls ftpipe's own code)."""
    import torch

    on_gpu = torch.cuda.is_available()
    return dict(
        output_dir=output_dir,
        num_train_epochs=t["epochs"],
        max_steps=t["max_steps"],
        per_device_train_batch_size=t["batch_size"],
        per_device_eval_batch_size=t["batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation"],
        learning_rate=t["learning_rate"],
        lr_scheduler_type=t["scheduler"],
        warmup_steps=t["warmup_ratio"],
        weight_decay=t["weight_decay"],
        seed=t["seed"],
        max_length=t["max_length"],
        eval_strategy="steps",
        eval_steps=t["eval_steps"],
        save_strategy="steps",
        save_steps=t["eval_steps"],
        save_total_limit=t["save_total_limit"],
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        restore_callback_states_from_checkpoint=True,
        logging_strategy="steps",
        logging_steps=t["logging_steps"],
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        activation_checkpointing=on_gpu,
        dataloader_num_workers=0,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not on_gpu else None,
    )


def hand_written_lora(t: dict):
    """The LoraConfig of a plain script, written out by hand from a TrainingConfig dump `t`."""
    from peft import LoraConfig

    lora = t["lora"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora["target_modules"], task_type="CAUSAL_LM")


def hand_written_quantization(t: dict):
    """QLoRA's usual BitsAndBytesConfig (NF4, double quantization, bf16 compute) for `quantization: 4bit`, else None."""
    import torch
    from transformers import BitsAndBytesConfig

    if t["quantization"] != "4bit":
        return None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def same_settings_args(job: dict):
    """SFTConfig + LoraConfig written out by hand with the values of ftpipe's TrainingConfig in the job."""
    from trl import SFTConfig

    t = job["training"]
    args = SFTConfig(**hand_written_arguments(t, job["output_dir"]), packing=t["packing"], completion_only_loss=True)
    return args, hand_written_lora(t)


def settings_differences(ours, plain, ignored: set[str]) -> list[str]:
    """`name: ours != plain` for each setting of two configs (TRL args or peft configs) that differs."""
    ours, plain = ours.to_dict(), plain.to_dict()
    return [f"{key}: {ours.get(key)!r} != {plain.get(key)!r}" for key in sorted(ours.keys() | plain.keys())
            if key not in ignored and ours.get(key) != plain.get(key)]


def check_same_settings(root: Path, training: dict) -> None:
    """Exit unless the plain script's SFTConfig and LoraConfig equal the ones ftpipe's program builds, but for how a
    batch goes through forward passes (ftpipe's micro-batches, padding-free: the same rows per optimizer step)."""
    from ftpipe.core.training.setup import lora_config, trainer_arguments
    from ftpipe.core.training.sft import sft_config

    config = TrainingConfig.model_validate(training)
    plain_args, plain_lora = same_settings_args({"training": training, "output_dir": str(root / "plain-check")})
    ours = sft_config(config, trainer_arguments(config, root / "ftpipe-check"), flat=False)  # padded passes
    rows_per_step = [args.per_device_train_batch_size * args.gradient_accumulation_steps for args in (ours, plain_args)]
    differences = [
        *settings_differences(ours, plain_args, ignored={"output_dir", "logging_dir", *MICRO_BATCHING}),
        *settings_differences(lora_config(config), plain_lora, ignored=set()),
        *([f"rows per optimizer step: {rows_per_step[0]} != {rows_per_step[1]}"]
          if rows_per_step[0] != rows_per_step[1] else []),
    ]
    if differences:
        sys.exit("the plain TRL baseline does not train like ftpipe (ftpipe != plain):\n  " + "\n  ".join(differences))


def default_args(job: dict):
    """SFTConfig defaults (plus use_cpu, which TRL's bf16 default requires without a GPU) and LoraConfig()."""
    import torch
    from peft import LoraConfig
    from trl import SFTConfig

    args = SFTConfig(output_dir=job["output_dir"], max_steps=job["steps"], use_cpu=not torch.cuda.is_available())
    return args, LoraConfig()


def run_plain_trl(job_path: str, result_path: Path) -> None:
    """The plain TRL script: load, SFTTrainer(...).train(), evaluate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, EarlyStoppingCallback
    from trl import SFTTrainer

    job = json.loads(Path(job_path).read_text())
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    device_map = {"": torch.cuda.current_device()} if on_gpu else None
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=dtype, device_map=device_map,
                                                 quantization_config=hand_written_quantization(job["training"]),
                                                 use_kernels=False)  # as ftpipe: no kernels from the Hub
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    train, evals = plain_datasets(job)
    same = job["mode"] == "same"
    args, peft = same_settings_args(job) if same else default_args(job)
    callbacks = [EarlyStoppingCallback(job["training"]["early_stopping_patience"])] if same else None
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evals,
        processing_class=tokenizer, peft_config=peft, callbacks=callbacks,
    )
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = json.loads(result_path.read_text())
    result_path.write_text(json.dumps({**result, "eval_loss": eval_loss, "trainable_params": trainable}))


def child(kind: str, job_path: str, result_path: str) -> None:
    install_probe(Path(result_path))
    if kind == "ftpipe":
        run_ftpipe_program(job_path)
    else:
        run_plain_trl(job_path, Path(result_path))


# ---------------------------------------------------------------- the parent: one subprocess per run


def child_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DAGSTER_PIPES"))}
    return {
        **env,
        "FTPIPE_HOME": str(root / "home"),
        "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH")))),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }


def run_child(root: Path, kind: str, name: str, job: dict) -> dict:
    """Run one training in a fresh subprocess; its probe timing plus eval loss and trainable parameters."""
    job_path, result_path, log_path = (root / f"{name}{suffix}" for suffix in (".json", ".result.json", ".log"))
    job_path.write_text(json.dumps(job))
    with log_path.open("w") as log:
        command = [sys.executable, __file__, "_child", kind, str(job_path), str(result_path)]
        status = subprocess.run(command, cwd=REPO_ROOT, env=child_env(root), stdout=log, stderr=subprocess.STDOUT)
    if status.returncode != 0:
        sys.exit(f"{name} failed (exit {status.returncode}):\n{log_path.read_text()[-4000:]}")
    result = json.loads(result_path.read_text())
    if kind == "ftpipe":
        program = read_result(Path(job["output_dir"]), "lora_adapter").metadata
        result.update({key: program[key] for key in ("eval_loss", "trainable_params")})
        result["own_tokens_per_second"] = program["tokens_per_second"]
    result["tokens_per_second"] = result["tokens"] / result["seconds"]
    print(f"  {name}: {result['tokens_per_second']:.0f} tokens/s, peak {result['peak_memory_mb']:.0f} MB", flush=True)
    return result


def ftpipe_job(root: Path, name: str, paths: dict, training: dict) -> dict:
    return {
        "task": "bench",
        "base_model_dir": paths["model_dir"],
        "base_fingerprint": "bench",
        "split_version": "bench",
        "train_path": paths["train_path"],
        "eval_path": paths["eval_path"],
        "output_dir": str(root / name / "adapter"),
        "checkpoint_dir": str(root / name / "checkpoints"),
        "training": training,
        "mlflow": {"experiment": "bench", "run_name": name},
    }


def plain_job(root: Path, name: str, paths: dict, mode: str, training: dict) -> dict:
    return {**paths, "mode": mode, "training": training, "steps": training["max_steps"],
            "output_dir": str(root / name / "checkpoints")}


def compare_same_settings(root: Path, paths: dict, args: argparse.Namespace) -> dict[str, list[dict]]:
    """ftpipe (TrainingConfig defaults, a LoRA adapter on 16/32-bit or NF4 weights) and plain TRL, same settings,
    order alternated; with --skewed also ftpipe with one row a pass."""
    training = TrainingConfig(adapter="lora", quantization=args.quantization, max_steps=args.steps).model_dump()
    check_same_settings(root, training)
    sides = {"ftpipe": ("ftpipe", training), "plain TRL": ("plain", training)}
    if args.skewed:
        sides[ROW_A_PASS] = ("ftpipe", {**training, "micro_batch_size": 1})
    runs = {side: [] for side in sides}
    for repeat in range(args.repeats):
        for side in list(sides)[:: 1 if repeat % 2 == 0 else -1]:  # alternate who goes first
            kind, settings = sides[side]
            name = f"{side.replace(' ', '-').replace(',', '')}-{repeat}"
            job = (ftpipe_job(root, name, paths, settings) if kind == "ftpipe"
                   else plain_job(root, name, paths, "same", settings))
            runs[side].append(run_child(root, kind, name, job))
    return runs


def run_trl_defaults(root: Path, paths: dict, args: argparse.Namespace) -> dict:
    """SFTConfig + LoraConfig defaults, `steps` steps."""
    training = TrainingConfig(max_steps=args.steps).model_dump()
    return run_child(root, "plain", "trl-defaults", plain_job(root, "trl-defaults", paths, "defaults", training))


# ---------------------------------------------------------------- report


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda run: run["tokens_per_second"])[(len(runs) - 1) // 2]


def steady_speed(run: dict) -> float:
    return run["steady_tokens"] / run["steady_seconds"]


def print_same_settings(runs: dict[str, list[dict]], args: argparse.Namespace) -> None:
    weights = "NF4 weights (QLoRA)" if args.quantization == "4bit" else "16/32-bit weights"
    print(f"\n1. same settings (ftpipe's TrainingConfig defaults: LoRA r16 a32 all-linear on {weights}, lr 2e-4 "
          f"cosine, batch 8 (ftpipe on a CPU: padding-free passes of whole rows up to 512 tokens), max_length 512, "
          f"eval/save every 20 steps), {args.steps} steps, median of {args.repeats}; tokens are real (non-padding) "
          "tokens")
    print(f"{'side':<22}{'tokens/s':>10}{'train s':>9}{'tokens':>8}{'steady tok/s':>14}{'eval loss':>11}"
          f"{'peak MB':>9}   tokens/s of each run")
    for side, side_runs in runs.items():
        run = median_run(side_runs)
        each = ", ".join(f"{r['tokens_per_second']:.0f}" for r in side_runs)
        print(f"{side:<22}{run['tokens_per_second']:>10.0f}{run['seconds']:>9.1f}{run['tokens']:>8}"
              f"{statistics.median(map(steady_speed, side_runs)):>14.0f}{run['eval_loss']:>11.4f}"
              f"{max(r['peak_memory_mb'] for r in side_runs):>9.0f}   {each}")
    own = statistics.median(r["own_tokens_per_second"] for r in runs["ftpipe"])
    print(f"ftpipe's own result.json tokens_per_second (train start to last logged step): {own:.0f}")
    ratio = median_run(runs["ftpipe"])["tokens_per_second"] / median_run(runs["plain TRL"])["tokens_per_second"]
    steady = statistics.median(map(steady_speed, runs["ftpipe"])) / statistics.median(
        map(steady_speed, runs["plain TRL"]))
    print(f"steady state (after {WARMUP_STEPS} warm-up steps) ftpipe/plain TRL: {steady:.2f}x")
    print(f"ratio ftpipe/plain TRL: {ratio:.2f}x (target >= {TARGET_RATIO})")
    if ROW_A_PASS in runs:
        before = median_run(runs["ftpipe"])["tokens_per_second"] / median_run(runs[ROW_A_PASS])["tokens_per_second"]
        print(f"ratio ftpipe/{ROW_A_PASS}: {before:.2f}x")


def print_defaults(ftpipe_run: dict, trl_run: dict, args: argparse.Namespace) -> None:
    print(f"\n2. defaults, {args.steps} steps each (ftpipe: the median run above)")
    rows = {
        "ftpipe defaults": (ftpipe_run, "LoRA r16 a32 all-linear, lr 2e-4 cosine, warmup 5%, max_length 512, fp32"),
        "TRL defaults": (trl_run, "LoRA r8 a8 (peft's q/v_proj), lr 2e-5 linear, max_length 1024, "
                                  "gradient checkpointing, bf16"),
    }
    print(f"{'side':<17}{'tokens/s':>10}{'eval loss':>11}{'trainable':>11}   settings")
    for side, (run, settings) in rows.items():
        print(f"{side:<17}{run['tokens_per_second']:>10.0f}{run['eval_loss']:>11.4f}"
              f"{run['trainable_params']:>11,}   {settings}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local model dir (safetensors + tokenizer); default: a random Llama")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the random Llama")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random Llama")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1, help="runs per side in comparison 1 (median)")
    parser.add_argument("--long", action="store_true", help="rows of 300-450 tokens (memory), not short ones")
    parser.add_argument("--skewed", action="store_true", help="short rows with every 12th row long (300-450 tokens)")
    parser.add_argument("--quantization", choices=["none", "4bit"], default="none",
                        help="4bit: QLoRA on NF4 weights (CUDA only)")
    return parser.parse_args(argv)


def main() -> None:
    if sys.argv[1:2] == ["_child"]:
        child(*sys.argv[2:5])
        return
    args = parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ftpipe-bench-train-") as tmp:
        root = Path(tmp)
        paths = prepare(root, args)
        runs = compare_same_settings(root, paths, args)
        print_same_settings(runs, args)
        print_defaults(median_run(runs["ftpipe"]), run_trl_defaults(root, paths, args), args)
    print(f"\n(bench wall time {time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
