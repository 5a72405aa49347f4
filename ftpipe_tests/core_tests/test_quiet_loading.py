"""Loading models on a CPU prints nothing that tells a user nothing: no bitsandbytes kernel notice, no deprecation
notice from inside peft, no progress bars of the GGUF conversion, loading or saving, nor of packaging a model in the
code location's processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ftpipe.core.storage import REPO_ROOT
from ftpipe_tests.trained_models import lora_adapter

NOISE = ("gemm_4bit_forward", "is_gradient_checkpointing", "Converting and de-quantizing", "Loading weights",
         "Writing model shards")
LOAD = """
import sys
from pathlib import Path
from ftpipe.core.evaluation.generation import load_finetuned, load_model
from ftpipe.core.modeling import resolve_base_model

model, _ = load_finetuned(sys.argv[1], lambda: load_model(sys.argv[2]))
print(type(model).__name__)
print(resolve_base_model(sys.argv[3], Path(sys.argv[4]))["architecture"])
"""
PACKAGE = """
import sys
import ftpipe.definitions  # what the run workers and `ftpipe run` load first
from ftpipe.core.merging import package_model

package_model(base_model_dir=sys.argv[1], finetuned_dir=sys.argv[2], out_dir=sys.argv[3], eval_path=sys.argv[4],
              card={"task": "toy"}, reuse_key="key")
print("packaged")
"""


@pytest.fixture(scope="module")
def default_gguf() -> Path:
    """The default base model's GGUF file, the download `make run` uses (before a test moves FTPIPE_HOME)."""
    from ftpipe.core.layout import downloads_dir
    from ftpipe.core.modeling import fetch_default_gguf

    return fetch_default_gguf(downloads_dir())


@pytest.mark.slow
def test_loading_an_adapter_and_converting_the_gguf_base_print_no_noise(default_gguf: Path, tiny_model_dir: Path,
                                                                         tmp_path: Path) -> None:
    adapter = lora_adapter(tiny_model_dir, tmp_path / "adapter", random_weights=True)
    done = subprocess.run([sys.executable, "-c", LOAD, str(adapter), str(tiny_model_dir), str(default_gguf),
                           str(tmp_path / "models")], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["PeftModelForCausalLM", "LlamaForCausalLM"]
    assert not [noise for noise in NOISE if noise in done.stderr], done.stderr[-3000:]


@pytest.mark.slow
def test_packaging_a_model_in_the_code_location_prints_no_progress_bar(tiny_model_dir: Path, tmp_path: Path) -> None:
    from ftpipe_tests.tiny_model import toy_rows, write_chat_parquet

    adapter = lora_adapter(tiny_model_dir, tmp_path / "adapter", random_weights=True)
    eval_path = write_chat_parquet(tmp_path / "eval.parquet", toy_rows(4))
    done = subprocess.run([sys.executable, "-c", PACKAGE, str(tiny_model_dir), str(adapter), str(tmp_path / "merged"),
                           str(eval_path)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["packaged"], done.stderr[-3000:]
    assert not [noise for noise in NOISE if noise in done.stderr], done.stderr[-3000:]
