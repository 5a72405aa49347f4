"""The GPU checks and figures, in one run on a CUDA machine (nothing is downloaded):

    python bench/gpu.py                      # the default base model's tokenizer, resolved as the pipeline does
    python bench/gpu.py --tokenizer DIR      # any model folder's tokenizer
    python bench/gpu.py --parts methods      # one part: methods, train, dpo
    python bench/gpu.py --repeats 2          # the train and dpo comparisons' median of 2 runs per side
    python bench/gpu.py --parts methods --objectives dpo kto --methods full   # some of the method checks
    python bench/gpu.py --parts train --quantizations 4bit                   # QLoRA only

Without a model hub, the models are random weights in real shapes with a real tokenizer: SmolLM2-135M's shape for
the method checks, SmolLM2-1.7B's for the figures. Speed and memory do not depend on the weights' values.

1. methods: every objective (sft, distill, dpo, orpo, kto) with every method (lora, qlora, full) through the
   training program for a few steps, several at once: whether it published, its losses, tokens/s, peak memory.
2. train: bench/train.py's same-settings comparison, ftpipe against plain TRL, with LoRA and with QLoRA, on rows of
   300-450 tokens.
3. dpo: bench/dpo.py's three sides (ftpipe, plain TRL, plain TRL with a separate reference model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import dpo  # noqa: E402
import train  # noqa: E402
from ftpipe.config import TrainingConfig  # noqa: E402
from ftpipe.core.preferences import write_preferences  # noqa: E402
from ftpipe.core.results import read_result  # noqa: E402
from ftpipe_tests.tiny_model import write_chat_parquet  # noqa: E402

SHAPES = {  # LlamaConfig fields of the real models whose shapes the random ones take
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=100000.0),
    "SmolLM2-1.7B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, rope_theta=130000.0),
}
OBJECTIVES = ("sft", "distill", "dpo", "orpo", "kto")
METHODS = ("lora", "qlora", "full")
METHOD_STEPS, PARALLEL = 6, 5
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def default_tokenizer() -> Path:
    from ftpipe.core.layout import models_dir
    from ftpipe.core.modeling import DEFAULT_MODEL_ALIAS, resolve_base_model

    return Path(resolve_base_model(DEFAULT_MODEL_ALIAS, models_dir())["path"])


def random_model(out: Path, shape: str, tokenizer_dir: Path) -> Path:
    """A LlamaForCausalLM of `shape` with random bf16 weights (made on the GPU) and the tokenizer of `tokenizer_dir`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name in TOKENIZER_FILES:  # the chat template travels as its own file
        if (tokenizer_dir / name).is_file() and not (out / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    print(f"{shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters (random) at {out}", flush=True)
    return out


# ---------------------------------------------------------------- 1. methods


def method_workspace(root: Path, model: Path) -> dict[str, str]:
    """Chat rows, preference pairs and an SFT LoRA adapter of `model` (bench/dpo.py's)."""
    root.mkdir(parents=True, exist_ok=True)
    training = TrainingConfig.model_validate({"stages": ["sft", "dpo"]}).for_stage("dpo").model_dump()
    write_chat_parquet(root / "train.parquet", train.chat_rows(64, 1))
    write_chat_parquet(root / "eval.parquet", train.chat_rows(16, 2))
    write_preferences(dpo.preference_rows(64, seed=1), root / "train_preferences.parquet")
    write_preferences(dpo.preference_rows(16, seed=2), root / "eval_preferences.parquet")
    return {"model": str(model), "sft": str(dpo.sft_adapter(model, root / "sft", training))}


def method_spec(root: Path, paths: dict[str, str], objective: str, method: str) -> Path:
    """The training program's spec of one objective and method; a preference stage starts from the SFT model (the
    LoRA adapter, or for a full fine-tune the base itself as the SFT model)."""
    name = f"{objective}-{method}"
    stages = ["distill"] if objective == "distill" else ["sft"] if objective == "sft" else ["sft", objective]
    config = TrainingConfig.model_validate({
        "method": method, "stages": stages, "max_steps": METHOD_STEPS, "batch_size": 8, "eval_steps": METHOD_STEPS,
        "logging_steps": 2, "max_length": 256, "preference": {"max_steps": METHOD_STEPS},
        **({"teacher_model": paths["model"]} if objective == "distill" else {}),
    }).for_stage(objective)
    preference = objective in ("dpo", "orpo", "kto")
    spec = {
        "task": "gpu", "base_model_dir": paths["model"], "base_fingerprint": "gpu", "split_version": "gpu",
        "train_path": str(root / ("train_preferences.parquet" if preference else "train.parquet")),
        "eval_path": str(root / ("eval_preferences.parquet" if preference else "eval.parquet")),
        "output_dir": str(root / name / "out"), "checkpoint_dir": str(root / name / "checkpoints"),
        "training": config.model_dump(), "mlflow": {"experiment": "gpu", "run_name": name},
        **({"start_adapter": paths["sft"] if method != "full" else paths["model"]} if preference else {}),
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def run_method(root: Path, paths: dict[str, str], objective: str, method: str) -> dict:
    spec = method_spec(root, paths, objective, method)
    log = root / f"{spec.stem}.log"
    with log.open("w") as out:
        env = {**train.child_env(root), "FTPIPE_HOME": str(root / spec.stem / "home")}  # an MLflow store each
        status = subprocess.run([sys.executable, "-m", "ftpipe.core.training", str(spec)], cwd=REPO_ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    result = read_result(Path(json.loads(spec.read_text())["output_dir"]))
    if status.returncode != 0 or result is None:
        return {"objective": objective, "method": method, "status": f"exit {status.returncode}",
                "error": log.read_text()[-1500:]}
    return {"objective": objective, "method": method, "status": "ok", **{
        key: result.metadata.get(key) for key in ("method", "train_loss", "eval_loss", "reward_accuracy",
                                                  "tokens_per_second", "peak_memory_mb")}}


def cell(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def check_methods(root: Path, tokenizer_dir: Path, objectives=OBJECTIVES, methods=METHODS) -> list[dict]:
    paths = method_workspace(root, random_model(root / "model", "SmolLM2-135M", tokenizer_dir))
    runs = [(objective, method) for objective in objectives for method in methods]
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(lambda run: run_method(root, paths, *run), runs))
    print(f"\n1. every objective with every method, {METHOD_STEPS} steps on a random SmolLM2-135M "
          f"(bf16; qlora: NF4 weights), {PARALLEL} trainings at once")
    print(f"{'objective':<10}{'method':<7}{'status':<9}{'train loss':>11}{'eval loss':>11}{'reward acc':>11}"
          f"{'tokens/s':>10}{'peak MB':>9}")
    for r in results:
        figures = "".join(f"{cell(r.get(key)):>{width}}" for key, width in (
            ("train_loss", 11), ("eval_loss", 11), ("reward_accuracy", 11), ("tokens_per_second", 10),
            ("peak_memory_mb", 9)))
        print(f"{r['objective']:<10}{r['method']:<7}{r['status']:<9}{figures}")
    for r in results:
        if r["status"] != "ok":
            print(f"\n--- {r['objective']} {r['method']} failed:\n{r['error']}")
    return results


# ---------------------------------------------------------------- 2. train, 3. dpo


def compare_training(root: Path, model: Path, quantization: str, steps: int, repeats: int = 1) -> None:
    args = train.parse_args(["--model", str(model), "--long", "--steps", str(steps), "--repeats", str(repeats),
                             "--quantization", quantization])
    paths = train.prepare(root, args)
    train.print_same_settings(train.compare_same_settings(root, paths, args), args)


def compare_dpo(root: Path, model: Path, steps: int, repeats: int = 1) -> None:
    dpo.run(root, dpo.parse_args(["--model", str(model), "--steps", str(steps), "--repeats", str(repeats)]),
            "random SmolLM2-1.7B")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, help="a model folder whose tokenizer the random models take")
    parser.add_argument("--parts", nargs="+", default=["methods", "train", "dpo"], choices=["methods", "train", "dpo"])
    parser.add_argument("--objectives", nargs="+", default=OBJECTIVES, choices=OBJECTIVES, help="of the methods part")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="of the methods part")
    parser.add_argument("--quantizations", nargs="+", default=["none", "4bit"], choices=["none", "4bit"],
                        help="of the train part, in this order (none: LoRA, 4bit: QLoRA)")
    parser.add_argument("--steps", type=int, default=20, help="steps of the train and dpo comparisons")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per side of the train and dpo comparisons (median)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    tokenizer_dir = args.tokenizer or default_tokenizer()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ftpipe-bench-gpu-") as tmp:
        root = Path(tmp)
        if "methods" in args.parts:
            check_methods(root / "methods", tokenizer_dir, args.objectives, args.methods)
        if {"train", "dpo"} & set(args.parts):
            model = random_model(root / "model-1.7b", "SmolLM2-1.7B", tokenizer_dir)
            for quantization in args.quantizations if "train" in args.parts else ():
                print(f"\n2. training, {'QLoRA' if quantization == '4bit' else 'LoRA'}:", flush=True)
                compare_training(root / f"train-{quantization}", model, quantization, args.steps, args.repeats)
            if "dpo" in args.parts:
                print("\n3. DPO:", flush=True)
                compare_dpo(root / "dpo", model, args.steps, args.repeats)
    print(f"\n(bench wall time {time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
