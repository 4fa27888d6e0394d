"""Hub model ids in `from_pretrained`: download through huggingface_hub's cache, convert once, reuse.

    FlaxBlipDiffusionPipeline.from_pretrained("Salesforce/blipdiffusion")

The converted copy lives in `$BLIPDIFF_JAX_CACHE` (default `~/.cache/blipdiff-jax`), under
`converted/<org>--<name>/<commit>`; a later call, online or offline, reuses it.
"""

from __future__ import annotations

import os
import re

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> str:
    return os.path.expanduser(os.environ.get("BLIPDIFF_JAX_CACHE", os.path.join("~", ".cache", "blipdiff-jax")))


def is_hub_id(path: str) -> bool:
    return not os.path.exists(path) and bool(_HUB_ID.match(path))


def _snapshot(repo_id: str) -> str | None:
    """The local snapshot of `repo_id`: from the cache, else downloaded; None when neither works."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached (huggingface_hub raises several error types here)
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return None
    try:
        return snapshot_download(repo_id)
    except Exception:
        return None


def resolve_hub_model(repo_id: str, *, qformer_tokenizer: str | None = None, log=print) -> str:
    """A converted directory for Hub model `repo_id`, converting (once) if needed."""
    from .checkpoint import is_converted_directory, save_converted

    model_cache = os.path.join(cache_root(), "converted", repo_id.replace("/", "--"))
    latest_file = os.path.join(model_cache, "latest")
    snapshot = _snapshot(repo_id)
    if snapshot is None:
        if os.path.isfile(latest_file):
            with open(latest_file) as f:
                cached = os.path.join(model_cache, f.read().strip())
            if is_converted_directory(cached):
                return cached
        raise FileNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache and could not be downloaded (offline?); "
            f"download it where there is network and pass its local directory instead, e.g. "
            f"from_pretrained('/path/to/{repo_id.split('/')[-1]}', from_pt=True)."
        )
    revision = os.path.basename(os.path.normpath(snapshot))
    converted = os.path.join(model_cache, revision)
    if not is_converted_directory(converted):
        from convert.pytorch_dir import read_pytorch_directory

        log(f"converting {repo_id} ({revision[:12]}) once into {converted}")
        model = read_pytorch_directory(snapshot, qformer_tokenizer=qformer_tokenizer, log=log, progress=True)
        save_converted(model, converted, overwrite=True)
    os.makedirs(model_cache, exist_ok=True)
    with open(latest_file, "w") as f:
        f.write(revision)
    return converted
