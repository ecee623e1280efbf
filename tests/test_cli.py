"""The command line: segment end to end (on the tiny stand-in model), info, export, and clean errors.

The session's one real export runs through `sam2rt export` (tests/conftest.py, `model_dir`); its output
is checked here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import photo


def sam2rt(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sam2rt", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "coffee.png"
    cv2.imwrite(str(path), photo("coffee")[..., ::-1])
    return path


def test_segment_writes_annotated_png_and_json(tiny_model_dir, image_file, tmp_path):
    out = tmp_path / "annotated.png"
    res = sam2rt("segment", "--model-dir", str(tiny_model_dir), "--image", str(image_file), "--point", "300,200",
                 "--point", "100,100,0", "--box", "50,50,500,350", "--box", "10,10,200,200", "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert len(info["objects"]) == 2 and info["image_size"] == [400, 600]
    assert info["weights"].startswith("RANDOM weights") and info["backend"] == "onnxruntime-cpu"
    assert set(info["timings"]) == {"load_s", "embed_s", "decode_s"}
    annotated = cv2.imread(str(out))
    assert annotated.shape == (400, 600, 3)
    assert not np.array_equal(annotated[..., ::-1], photo("coffee")), "nothing was drawn"
    from sam2rt.annotate import BANNER_COLOR

    banner = np.all(annotated[:30, :, ::-1] == np.array(BANNER_COLOR, np.uint8), axis=-1)
    assert banner.mean() > 0.5, "a random-weight model's picture carries the RANDOM WEIGHTS banner"


def test_segment_checks_prompts_before_the_encoder(tiny_model_dir, image_file, monkeypatch, capsys):
    """A point outside the image is refused before the (seconds-long) embed."""
    from sam2rt.cli import main
    from sam2rt.runtime import Sam2Model

    def embed(*args, **kwargs):
        raise AssertionError("embed ran before the prompts were checked")

    monkeypatch.setattr(Sam2Model, "embed", embed)
    assert main(["segment", "--model-dir", str(tiny_model_dir), "--image", str(image_file), "--point", "601,10"]) == 2
    assert "outside the image" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--point", "5000,10"], "outside the image"),
        (["--box", "300,10,100,200"], "reversed"),
        (["--point", "nan,10"], "NaN"),
        (["--point", "10,10,9"], "point_labels must be in"),
        ([], "at least one --point"),
    ],
)
def test_segment_bad_prompts_exit_cleanly(tiny_model_dir, image_file, args, fragment):
    res = sam2rt("segment", "--model-dir", str(tiny_model_dir), "--image", str(image_file), *args)
    assert res.returncode == 2
    assert fragment in res.stderr and "Traceback" not in res.stderr


def test_segment_missing_model_and_bad_image(tmp_path, tiny_model_dir):
    res = sam2rt("segment", "--model-dir", str(tmp_path / "none"), "--image", "x.png", "--point", "1,1")
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    res = sam2rt("segment", "--model-dir", str(tiny_model_dir), "--image", str(bad), "--point", "1,1")
    assert res.returncode == 2 and "could not be decoded" in res.stderr and "Traceback" not in res.stderr


def test_bad_arguments():
    res = sam2rt("segment", "--model-dir", "x", "--image", "y", "--point", "1;2")
    assert res.returncode == 2 and "--point expects" in res.stderr
    res = sam2rt("export", "--model", "hiera_tiny", "--checkpoint", "a.pt", "--random-weights", "1", "--out", "o")
    assert res.returncode == 2 and "not allowed with" in res.stderr
    res = sam2rt("export", "--model", "hiera_giant", "--out", "o")
    assert res.returncode == 2 and "invalid choice" in res.stderr
    res = sam2rt("export", "--model", "hiera_tiny", "--out", "o", "--target", "gpu")
    assert res.returncode == 2 and "unknown export target gpu; choose from cpu, cuda, tensorrt, all" in res.stderr


def test_info_lists_backends():
    res = sam2rt("info", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["backends"]["onnxruntime-cpu"] == "available"
    assert "onnxruntime" in info["versions"]


def test_export_offline_fails_clearly(tmp_path):
    env = {**__import__("os").environ, "SAM2RT_CHECKPOINT_URL_BASE": "http://127.0.0.1:9/", "SAM2RT_CACHE": str(tmp_path)}
    res = sam2rt("export", "--model", "hiera_tiny", "--out", str(tmp_path / "m"), "--quiet", env=env)
    assert res.returncode == 2
    assert "--checkpoint" in res.stderr and "--random-weights" in res.stderr and "Traceback" not in res.stderr


def test_session_export_ran_through_the_cli(model_dir, checkpoint_path):
    """The session's model directory was made by `sam2rt export --checkpoint` (conftest): what it printed."""
    out, err = (model_dir.parent / "export_stdout.txt").read_text(), (model_dir.parent / "export_stderr.txt").read_text()
    assert out.startswith("exported sam2.1_hiera_tiny to ") and "largest ONNX-vs-PyTorch difference" in out
    # conftest's checkpoint carries the record of its random weights (export.checkpoint.random_checkpoint): the
    # export says RANDOM, and no warning about --random-weights was printed
    assert "weights: RANDOM weights (seed 1234)" in out and "WARNING" not in err
    assert "--target cpu,cuda,tensorrt: 27 graphs" in out  # the table's rows but INT8 and three older forms
    assert "decoder_fast.device.multi.onnx" in out and "decoder_fast.device.single.onnx" in out
    assert "decoder_fast.device.multi.fp16.onnx" in out and "decoder_fast.device.single.fp16.onnx" in out


def test_hiera_b_plus_is_accepted_as_a_model_name():
    from sam2rt.cli import build_parser
    from sam2rt.model_specs import get_spec

    for name in ("hiera_b_plus", "hiera_base_plus"):
        args = build_parser().parse_args(["export", "--model", name, "--out", "o"])
        assert get_spec(args.model).name == "hiera_base_plus" and get_spec(args.model).serve_id == "hiera_b_plus"


def test_every_command_is_one_module_imported_only_when_named(monkeypatch):
    """One table of commands; `sam2rt --help` imports none of their modules, naming one imports only it."""
    import importlib
    import sys as _sys

    from sam2rt import cli

    for name, (module, _) in cli.COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.run), name
    code = ("import sys; from sam2rt.cli import build_parser, COMMANDS; build_parser(['--help']); "
            "print(sorted(m for m, _ in COMMANDS.values() if m in sys.modules))")
    res = subprocess.run([_sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr
    code = ("import sys; from sam2rt.cli import build_parser, COMMANDS; build_parser(['info', '--json']); "
            "print(sorted(m for m, _ in COMMANDS.values() if m in sys.modules))")
    res = subprocess.run([_sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "['sam2rt.info_cli']", res.stdout + res.stderr


def test_a_command_whose_module_is_missing_fails_clearly(monkeypatch, capsys):
    from sam2rt import cli

    monkeypatch.setitem(cli.COMMANDS, "ghost", ("sam2rt.no_such_module", "a command whose extra is not installed"))
    assert "ghost" in cli.build_parser(["--help"]).format_help()
    assert cli.main(["ghost", "--any", "thing"]) == 2
    err = capsys.readouterr().err
    assert "`sam2rt ghost` is not available: module sam2rt.no_such_module is missing" in err and "Traceback" not in err
