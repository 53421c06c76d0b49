"""A model named by a local folder or by a Hugging Face hub id (``org/name`` and a revision).

Every key that names a model (``model.model_path``, ``prm.init_args.model_path``,
``engine.init_args.model_path``) goes through :func:`resolve_model`: a folder that exists is
used as it is; a hub id is resolved by ``huggingface_hub.snapshot_download``, so the local
cache (``HF_HOME`` / ``HF_HUB_CACHE``), ``HF_HUB_OFFLINE=1`` and ``HF_TOKEN`` behave as in
transformers, and the result is the snapshot folder the rest of the package reads like any
other. Anything else is one ``ConfigError`` naming the key and the value.

A name is read as a hub id only when no such path exists and it has the hub's shape: one
``/`` between two names (``Qwen/Qwen2.5-0.5B-Instruct``). A local folder still to be made
(``stepwise_init``) is written with a ``./`` or more than one ``/`` (``checkpoints/tiny/m0``).
"""

from __future__ import annotations

import re
from pathlib import Path

from hs_star_pl.infra.errors import ConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Weight formats transformers and vLLM never read from a hub repo when safetensors or .bin
# files are there: left in the hub.
SKIPPED_FILES = ["*.pth", "*.pt", "*.gguf", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.ot", "original/*", "onnx/*"]


def is_hub_id(name: str | Path) -> bool:
    """``name`` has a hub id's shape (``org/name``) and no such local path exists."""
    text = str(name)
    return bool(_HUB_ID.match(text)) and not Path(text).exists() and ".." not in text


def resolve_model(name: str | Path, revision: str | None = None, key: str = "model.model_path",
                  revision_key: str | None = None) -> str:
    """The local folder of the model ``name``: ``name`` itself when it exists, else the hub
    snapshot of ``name`` at ``revision`` (downloaded unless cached or ``HF_HUB_OFFLINE=1``).

    Raises:
        ConfigError: naming ``key`` (and ``revision_key``) when ``name`` is neither an existing
            folder nor a hub id that resolves.
    """
    revision_key = revision_key or key.rsplit(".", 1)[0] + ".revision"
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{key}={text} is a file: a Hugging Face model folder (config.json, weights, tokenizer "
                              "files) or a hub id (org/name) is expected")
        if revision is not None:
            raise ConfigError(f"{revision_key}={revision} is for a hub id, but {key}={text} is a local folder")
        return text
    if not is_hub_id(text):
        raise ConfigError(f"{key}={text} does not exist: a local Hugging Face model folder is expected (config.json, "
                          "weights, tokenizer files), e.g. an hf/policy_NNN export, or a hub id (org/name)")
    return _snapshot(text, revision, key, revision_key)


def _snapshot(repo_id: str, revision: str | None, key: str, revision_key: str) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    at = f" ({revision_key}={revision})" if revision is not None else ""
    try:
        return snapshot_download(repo_id, revision=revision, ignore_patterns=SKIPPED_FILES)
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE=1, so nothing is downloaded" if constants.is_offline_mode()
               else "and the hub could not be reached")
        raise ConfigError(f"{key}={repo_id}{at} is not a local folder, and the hub id is not in the cache "
                          f"{constants.HF_HUB_CACHE} ({why})") from None
    except (HfHubHTTPError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{key}={repo_id}{at} is not a local folder, and the hub did not give it: {first}") from None


def hub_source(folder: str | Path) -> str | None:
    """``org/name@<commit>`` when ``folder`` is a snapshot in a hub cache, else ``None``: a name
    for the model that does not depend on where the cache is (fingerprints, LoRA bases)."""
    parts = Path(folder).resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/", 1) + "@" + parts[-1]
    return None
