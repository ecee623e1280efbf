"""manifest.json: what a model directory holds, how it was built, and checks that its files match."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GraphNotExportedError, ManifestError, ModelFileError
from .graph_table import BACKEND_TARGETS, GRAPHS, TARGETS, targets_writing

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    """The parsed manifest of a model directory; `data` is the JSON document itself."""

    directory: Path
    data: dict[str, Any] = field(default_factory=dict)

    # --- reading -----------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        """Read DIR/manifest.json, raising ManifestError/ModelFileError with a fix when it cannot."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelFileError(
                f"model directory {str(directory)!r} does not exist: export one with "
                "`sam2rt export --model hiera_tiny --out DIR` and pass that DIR"
            )
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(
                f"{path} is missing: {directory} is not a sam2rt model directory; "
                "re-run `sam2rt export --out DIR` to create one"
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path} is not valid JSON ({exc}); re-run `sam2rt export` to rewrite it") from exc
        if not isinstance(data, dict) or data.get("format") != "sam2rt" or "graphs" not in data:
            raise ManifestError(f"{path} is not a sam2rt manifest; re-run `sam2rt export` to rewrite it")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ManifestError(
                f"{path} has format_version {data.get('format_version')}, newer than this sam2rt reads "
                f"({FORMAT_VERSION}); upgrade sam2rt"
            )
        return cls(directory, data)

    def save(self) -> Path:
        path = self.directory / MANIFEST_NAME
        path.write_text(json.dumps(self.data, indent=2, sort_keys=False) + "\n")
        return path

    # --- accessors -------------------------------------------------------------------
    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def model_name(self) -> str:
        return self.data["model"]["name"]

    @property
    def random_weights(self) -> bool:
        return bool(self.data["model"]["weights"]["random"])

    @property
    def image_size(self) -> int:
        return int(self.data["image_size"])

    @property
    def mask_threshold(self) -> float:
        return float(self.data["mask_threshold"])

    @property
    def normalization(self) -> dict[str, Any]:
        return self.data["normalization"]

    @property
    def decoder_config(self) -> dict[str, Any]:
        return self.data["decoder"]

    def graph(self, role: str) -> dict[str, Any]:
        try:
            return self.data["graphs"][role]
        except KeyError:
            raise ManifestError(f"{self.directory / MANIFEST_NAME} has no '{role}' graph entry; re-run `sam2rt export`") from None

    def graph_path(self, role: str) -> Path:
        return self.directory / self.graph(role)["file"]

    def describe_weights(self) -> str:
        """A one-line, honest description of where the weights came from."""
        w = self.data["model"]["weights"]
        if w["random"]:
            return f"RANDOM weights (seed {w.get('seed')}): not a trained model, masks are meaningless"
        return f"checkpoint {w.get('checkpoint')} (sha256 {str(w.get('checkpoint_sha256'))[:12]}...)"

    def variant(self, role: str, name: str) -> dict[str, Any] | None:
        """The entry of graph variant `name` of `role` (graphs.<role>.variants.<name>), or None."""
        return (self.graph(role).get("variants") or {}).get(name)

    def entry(self, role: str, variant: str | None = None) -> dict[str, Any] | None:
        """The entry of a graph_table row: graphs.<role> (variant None) or one of its variants; None if absent."""
        base = self.data["graphs"].get(role)
        if base is None or variant is None:
            return base
        return (base.get("variants") or {}).get(variant)

    # --- lean exports (`sam2rt export --target`) ---------------------------------------------------
    @property
    def targets(self) -> tuple[str, ...] | None:
        """The export targets this directory was written for; None for exports made before targets (every graph)."""
        targets = (self.data.get("export") or {}).get("targets")
        return None if targets is None else tuple(targets)

    @staticmethod
    def is_stored(entry: dict[str, Any]) -> bool:
        """Whether an entry's file is in the directory: a lean export records the graphs it made and then left out
        (e.g. encoder.fused.onnx, made for encoder.opt.onnx) with `"stored": false`."""
        return entry.get("stored", True) is not False

    def export_command(self, targets: tuple[str, ...] | list[str]) -> str:
        """The `sam2rt export` command that rewrites this directory for `targets`, from the same weights."""
        model, weights = self.data["model"], self.data["model"]["weights"]
        cmd = f"sam2rt export --model {model['name']}"
        if str(model.get("version", "2.1")) != "2.1":
            cmd += f" --version {model['version']}"
        if weights.get("checkpoint"):
            cmd += f" --checkpoint {weights['checkpoint']}"
        elif weights.get("random"):
            cmd += f" --random-weights {weights.get('seed')}"
        return f"{cmd} --target {','.join(targets)} --out {self.directory}"

    def left_out_error(self, file: str) -> GraphNotExportedError:
        """The error for a graph file of the table that this lean export does not store, naming the export that does."""
        rows = [g for g in GRAPHS if g.file == file]
        targets = targets_writing(rows[0]) if rows else tuple(TARGETS)
        have = self.targets or ()
        wanted = tuple(t for t in TARGETS if t in have or t == targets[0])
        return GraphNotExportedError(
            f"{self.directory / file} is not in this export: {self.directory} was exported with --target "
            f"{','.join(have)}, which leaves it out ({file} is written for --target {' or '.join(targets)}); "
            f"export again with `{self.export_command(wanted)}` (or --target all)"
        )

    def require_backend(self, backend: str) -> None:
        """GraphNotExportedError naming the fix when this directory was exported for targets `backend` does not run."""
        have, accepted = self.targets, BACKEND_TARGETS.get(backend.split(":")[0])
        if have is None or accepted is None or set(have) & set(accepted):
            return
        wanted = tuple(t for t in TARGETS if t in have or t == accepted[0])
        raise GraphNotExportedError(
            f"{self.directory} was exported with --target {','.join(have)}, whose graphs {backend} does not run "
            f"(it runs --target {' or '.join(accepted)}); export them with `{self.export_command(wanted)}` "
            "(or --target all)"
        )

    # --- checks ----------------------------------------------------------------------
    def verify_file(self, entry: dict[str, Any]) -> Path:
        """Check that the file of a graph or variant entry exists and matches its sha256; return its path."""
        path = self.directory / entry["file"]
        if not self.is_stored(entry):
            raise self.left_out_error(entry["file"])
        if not path.is_file():
            raise ModelFileError(f"{path} is missing; re-run `sam2rt export` into {self.directory}")
        expected = entry.get("sha256")
        actual = sha256_file(path)
        if expected != actual:
            raise ManifestError(
                f"{path} does not match {MANIFEST_NAME} (sha256 {actual[:12]}... != {str(expected)[:12]}...): "
                "the file was changed or the manifest belongs to another export; re-run `sam2rt export`"
            )
        return path

    def verify_graph(self, role: str) -> Path:
        """Check that a graph file exists and its sha256 matches the manifest; return its path."""
        return self.verify_file(self.graph(role))

    def verify_stored_graphs(self, roles: tuple[str, ...] = ("encoder", "decoder")) -> None:
        """Check the base graphs of `roles` that this export stores (a lean export's others are left out on
        purpose: the backend that would need one says so)."""
        for role in roles:
            if self.is_stored(self.graph(role)):
                self.verify_graph(role)
