"""What the server serves: every task's registered `champion` (as `<task>`) and `candidate` (as
`<task>@candidate`), read from the MLflow registry. A model merged from a LoRA adapter is served as that adapter on
its base model, loaded once for every task that shares it; a full fine-tune (or a model whose base is gone) is
served as its own model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftpipe.core.evaluation.generation import load_model, pad_id_of, stop_token_ids
from ftpipe.core.registry import CANDIDATE, CHAMPION, FILES_TAG, model_folder, registered_name
from ftpipe.core.results import read_result
from ftpipe.core.serving_files import ADAPTER_COPY
from ftpipe.core.tracking import mlflow_client

PREFIX = registered_name("")


@dataclass(frozen=True)
class Release:
    """One registered version to serve under `name`."""

    task: str
    alias: str
    version: int
    folder: Path  # the packaged model
    base: Path | None  # its base model, when it is served as the adapter in `folder/adapter`

    @property
    def name(self) -> str:
        return self.task if self.alias == CHAMPION else f"{self.task}@{self.alias}"

    @property
    def adapter_name(self) -> str:
        return f"{self.task}-v{self.version}"


@dataclass
class Route:
    """How a served name is decoded: the loaded model, the adapter in it, the release's own tokenizer (its chat
    template carries the task's system prompt)."""

    release: Release
    model: Any
    adapter: str | None
    tokenizer: Any
    stops: frozenset[int]
    pad_id: int
    context_length: int


def releases(tracking_uri: str | None = None) -> list[Release]:
    """Every task's champion and candidate whose files are still there (the candidate only when it differs)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri)
    found = []
    for registered in client.search_registered_models(filter_string=f"name LIKE '{PREFIX}%'"):
        versions = set()
        for alias in (CHAMPION, CANDIDATE):
            try:
                version = client.get_model_version_by_alias(registered.name, alias)
            except MlflowException:
                continue
            folder = Path(model_folder(version))
            if version.version in versions or version.tags.get(FILES_TAG) == "removed" or not folder.is_dir():
                continue
            versions.add(version.version)
            found.append(Release(registered.name.removeprefix(PREFIX), alias, int(version.version), folder,
                                 _lora_base(folder)))
    return sorted(found, key=lambda r: r.name)


def _lora_base(folder: Path) -> Path | None:
    """The base model a packaged model was merged from, when it and the adapter's copy are both there."""
    result = read_result(folder)
    base = (result.inputs.get("base_model") if result else None) or ""
    return Path(base) if base and Path(base).is_dir() and (folder / ADAPTER_COPY).is_dir() else None


class Catalog:
    """The loaded models and the route of every served name. `sync` changes them; the engine thread calls it."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self._bases: dict[Path, Any] = {}  # base folder -> PeftModel holding every adapter on it
        self._whole: dict[Path, tuple[Any, Any]] = {}  # model folder -> (model, tokenizer)
        self._retired: set[tuple[int, str]] = set()  # adapters no name routes to, still loaded
        self.lingering = False  # some are: a later sync unloads them

    def sync(self, wanted: list[Release], busy: set[tuple[int, str | None]] = frozenset()) -> dict[str, int]:
        """Serve exactly `wanted`: load what is new, route each name, unload what nothing routes to. An adapter on a
        model still served is unloaded by a later sync than the one that stopped routing to it, once no job of `busy`
        (model id, adapter) decodes or waits with it: a request routed just before a swap is answered with it.
        Returns the served names and versions."""
        routes = {release.name: self._route(release) for release in wanted}
        self.routes = routes
        self._unload_unused(busy)
        return {name: route.release.version for name, route in routes.items()}

    def _route(self, release: Release) -> Route:
        current = self.routes.get(release.name)
        if current is not None and current.release == release:
            return current
        from transformers import AutoTokenizer

        if release.base is None:
            if release.folder not in self._whole:
                self._whole[release.folder] = load_model(release.folder)
            model, tokenizer = self._whole[release.folder]
            adapter = None
        else:
            model, adapter = self._with_adapter(release), release.adapter_name
            tokenizer = AutoTokenizer.from_pretrained(str(release.folder))
        stops = stop_token_ids(model, tokenizer)
        return Route(release, model, adapter, tokenizer, frozenset(stops), pad_id_of(tokenizer, stops[0]),
                     int(getattr(model.config, "max_position_embeddings", 2048)))

    def _with_adapter(self, release: Release):
        from peft import PeftModel

        adapter_dir = str(release.folder / ADAPTER_COPY)
        model = self._bases.get(release.base)
        if model is None:
            base, _ = load_model(release.base)
            model = self._bases[release.base] = PeftModel.from_pretrained(base, adapter_dir,
                                                                          adapter_name=release.adapter_name).eval()
        elif release.adapter_name not in model.peft_config:
            model.load_adapter(adapter_dir, adapter_name=release.adapter_name)
            model.eval()
        return model

    def _unload_unused(self, busy: set[tuple[int, str | None]]) -> None:
        """Drop the models no name routes to (jobs still using one hold it until they end); retire the adapters no
        name routes to on the models kept, and delete those retired before that no job of `busy` uses."""
        routed = {(id(route.model), route.adapter) for route in self.routes.values()}
        for folder, model in list(self._bases.items()):
            if not any((id(model), name) in routed for name in model.peft_config):
                del self._bases[folder]
                continue
            for name in [n for n in model.peft_config if (id(model), n) in self._retired - routed - busy]:
                model.delete_adapter(name)
        for folder, (model, _) in list(self._whole.items()):
            if (id(model), None) not in routed:
                del self._whole[folder]
        self._retired = {(id(model), name) for model in self._bases.values() for name in model.peft_config} - routed
        self.lingering = bool(self._retired)
