"""Building the official SAM 2 model and loading its weights: a checkpoint file, a download, or a random seed."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..manifest import sha256_file
from ..models import ModelSpec


def cache_dir() -> Path:
    """Where downloaded checkpoints live: $SAM2RT_CACHE, else $XDG_CACHE_HOME/sam2rt, else ~/.cache/sam2rt."""
    if os.environ.get("SAM2RT_CACHE"):
        return Path(os.environ["SAM2RT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sam2rt"


def build_model(spec: ModelSpec, seed: int | None = None) -> torch.nn.Module:
    """Instantiate SAM2Base on the CPU from the `sam2` package's bundled config (no weights loaded).

    With `seed`, torch's RNG is seeded first, so the random initial weights are reproducible.
    """
    from sam2.build_sam import build_sam2

    if seed is not None:
        torch.manual_seed(seed)
    return build_sam2(spec.config_name, ckpt_path=None, device="cpu", mode="eval")


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Load an official checkpoint (a dict whose 'model' key holds the state dict) with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of an official SAM 2 .pt file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} could not be read as a PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
            "is the file complete? Download it again"
        ) from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not an official SAM 2 checkpoint: expected a dict with key 'model', got {keys}"
        )
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this model ({len(missing)} missing keys, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}): check --model and --version match the checkpoint"
        )


def save_checkpoint(model: torch.nn.Module, path: str | Path) -> Path:
    """Write `model`'s weights in the official checkpoint format ({'model': state_dict})."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path


def download_checkpoint(spec: ModelSpec, expected_sha256: str | None = None, progress: bool = True) -> Path:
    """Fetch the official checkpoint into cache_dir(), with a progress bar and a sha256 check.

    The digest of a completed download is recorded beside it and checked on every reuse; pass
    `expected_sha256` to pin a known digest. Raises CheckpointError when there is no network.
    """
    target = cache_dir() / "checkpoints" / spec.checkpoint_filename
    digest_file = target.with_suffix(".pt.sha256")
    if target.is_file() and digest_file.is_file():
        recorded = digest_file.read_text().strip()
        actual = sha256_file(target)
        if actual == recorded and expected_sha256 in (None, actual):
            return target
        target.unlink()  # corrupt or not what was pinned: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".pt.part")
    url = spec.checkpoint_url
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            h = hashlib.sha256()
            from tqdm import tqdm

            with open(partial, "wb") as f, tqdm(
                total=total or None, unit="B", unit_scale=True, desc=spec.checkpoint_filename, disable=not progress
            ) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        partial.unlink(missing_ok=True)
        raise CheckpointError(
            f"could not download the official {spec.model_id} checkpoint from {url} ({exc}). "
            f"Without network access, either download it elsewhere and pass --checkpoint PATH, "
            f"or export with --random-weights SEED (random weights: only for tests and benchmarks)"
        ) from exc
    size = partial.stat().st_size
    if total and size != total:
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"download of {url} was cut short ({size} of {total} bytes); run the export again")
    digest = h.hexdigest()
    if expected_sha256 and digest != expected_sha256:
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"{url} has sha256 {digest}, expected {expected_sha256}; the download is corrupt")
    partial.replace(target)
    digest_file.write_text(digest + "\n")
    return target
