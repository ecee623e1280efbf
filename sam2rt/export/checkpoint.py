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
from ..model_specs import ModelSpec


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


# Key of the record a checkpoint of random weights carries (see random_checkpoint): an export from such a file
# is labelled random, like one made with --random-weights.
RANDOM_WEIGHTS_KEY = "sam2rt_random_weights"


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> dict | None:
    """Load an official checkpoint (a dict whose 'model' key holds the state dict) with weights_only=True.

    Returns the file's random-weights record (random_checkpoint) or None for a trained checkpoint.
    """
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
    record = ckpt.get(RANDOM_WEIGHTS_KEY)
    return dict(record) if isinstance(record, dict) else None


def save_checkpoint(model: torch.nn.Module, path: str | Path) -> Path:
    """Write `model`'s weights in the official checkpoint format ({'model': state_dict})."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path


def random_checkpoint(spec: ModelSpec, seed: int, path: str | Path, object_score_bias: float = 0.0) -> Path:
    """Save seeded random weights in the official format, marked as random, for tests and benchmarks.

    With random weights SAM 2.1's object-score head scores every object just below 0, so video tracking
    declares it absent and its masks empty; `object_score_bias` is added to that head's output so tracked
    objects stay present (the image path never reads the head). The record under RANDOM_WEIGHTS_KEY makes
    every export from the file say RANDOM WEIGHTS.
    """
    model = build_model(spec, seed=seed)
    if object_score_bias:
        with torch.no_grad():
            model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += object_score_bias
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"seed": int(seed), "object_score_bias": float(object_score_bias)}
    torch.save({"model": model.state_dict(), RANDOM_WEIGHTS_KEY: record}, path)
    return path


def reference_checkpoint(manifest, workdir: str | Path) -> Path:
    """The checkpoint file a model directory was exported from, for the PyTorch reference to load as a user would.

    A directory exported with --random-weights has none: the same seeded weights are rebuilt and saved to
    `workdir` (as an official-format .pt, marked random).
    """
    from ..model_specs import get_spec

    weights = manifest.model["weights"]
    if weights.get("checkpoint"):
        ckpt = Path(weights["checkpoint"])
        if not ckpt.is_file():
            raise CheckpointError(f"the reference needs the checkpoint {ckpt} that {manifest.directory} was exported from")
        return ckpt
    if not weights.get("random") or weights.get("seed") is None:
        raise CheckpointError(f"{manifest.directory} records neither a checkpoint nor a random seed")
    spec = get_spec(manifest.model_name, manifest.model.get("version", "2.1"))
    return random_checkpoint(spec, int(weights["seed"]), Path(workdir) / f"{spec.model_id}_random.pt")


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
