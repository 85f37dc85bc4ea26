"""Hugging Face Hub repo ids as model paths: `vivo-ai/BlueLM-7B-Chat` -> a local snapshot directory.

Wherever a Hugging Face directory is accepted (`load()`, `--model`, `--hf-dir`), a Hub repo
id may stand instead. An existing local path always wins. Only the files the loader reads
are fetched: config.json, tokenizer.model, and one weight format (safetensors when the repo
has it, else the PyTorch .bin shards) with its index. `huggingface_hub` keeps them in its
cache (HF_HUB_CACHE / HF_HOME) and honours its offline mode (HF_HUB_OFFLINE=1), in which a
cached snapshot is used without any network access.
"""

from __future__ import annotations

import os
import re

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "org/name", as on a model card
ALWAYS = ("config.json", "tokenizer.model")
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors")
PYTORCH = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin")


class HubError(ValueError):
    """A model path that is neither a local directory nor a Hub repo that can be had; one line."""


def is_repo_id(name: str) -> bool:
    """Whether `name` has the form of a Hub repo id and names no local file or directory."""
    return bool(REPO_ID.fullmatch(name)) and not os.path.lexists(name) and ".." not in name.split("/")


def resolve(path: str | os.PathLike) -> str:
    """`path` itself when it exists locally; for a Hub repo id, the directory of its snapshot
    (fetched when needed, or taken from the cache). Raises HubError with one line otherwise."""
    path = os.fspath(path)
    if not is_repo_id(path):
        return path  # a local path (the caller reports it if it is missing)
    try:
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise HubError(f"{path}: not a local directory; to fetch it from the Hugging Face Hub, "
                       f"install huggingface_hub") from None
    try:
        return huggingface_hub.snapshot_download(path, allow_patterns=[*ALWAYS, *_weight_patterns(path)])
    except LocalEntryNotFoundError:
        raise HubError(f"{path}: not a local directory, not in the Hugging Face cache, and the Hub cannot be "
                       f"reached{' (HF_HUB_OFFLINE is set)' if _offline() else ''}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:200]
        raise HubError(f"{path}: not a local directory, and fetching it from the Hugging Face Hub failed "
                       f"({type(e).__name__}: {reason})") from None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _weight_patterns(repo_id: str) -> tuple[str, ...]:
    """The one weight format to fetch: safetensors if the repo lists any, else .bin; offline
    (or when the listing fails), both, so that whichever the cache holds is used."""
    if _offline():
        return SAFETENSORS + PYTORCH
    try:
        from huggingface_hub import HfApi

        files = [s.rfilename for s in HfApi().model_info(repo_id, expand=["siblings"]).siblings or []]
    except Exception:  # noqa: BLE001 - unreachable or unknown: let snapshot_download say why
        return SAFETENSORS + PYTORCH
    return SAFETENSORS if any(f.endswith(".safetensors") for f in files) else PYTORCH
