"""Export: reading official checkpoints, downloading them, the manifest, and refusing bad exports."""

from __future__ import annotations

import functools
import http.server
import threading

import numpy as np
import pytest
import torch

from sam2rt.errors import CheckpointError, ExportError
from sam2rt.manifest import Manifest, sha256_file
from sam2rt.model_specs import get_spec


def test_manifest_records_the_export(model_dir, checkpoint_path):
    m = Manifest.load(model_dir)
    assert m.model["name"] == "hiera_tiny" and m.model["version"] == "2.1" and m.model["serve_id"] == "hiera_tiny"
    w = m.model["weights"]
    # conftest's checkpoint holds random weights and is marked so: the export says RANDOM, and records the file
    assert w["random"] is True and w["checkpoint_sha256"] == sha256_file(checkpoint_path)
    assert w["random_checkpoint"] == {"seed": 1234, "object_score_bias": 10.0}
    assert m.image_size == 1024 and m.mask_threshold == 0.0
    assert m.normalization["mean"] == [0.485, 0.456, 0.406] and m.normalization["std"] == [0.229, 0.224, 0.225]
    for role, names in (("encoder", ["image_embed", "high_res_feats_0", "high_res_feats_1"]),
                        ("decoder", ["low_res_masks", "iou_predictions"])):
        g = m.graph(role)
        assert g["sha256"] == sha256_file(model_dir / g["file"])
        assert [o["name"] for o in g["outputs"]] == names
    enc = {o["name"]: o["shape"] for o in m.graph("encoder")["outputs"]}
    assert enc == {"image_embed": [1, 256, 64, 64], "high_res_feats_0": [1, 32, 256, 256], "high_res_feats_1": [1, 64, 128, 128]}
    dec_in = {i["name"]: i["shape"] for i in m.graph("decoder")["inputs"]}
    assert dec_in["point_coords"] == ["num_prompts", "num_points", 2]
    assert dec_in["mask_input"] == ["num_prompts", 1, 256, 256] and dec_in["has_mask_input"] == ["num_prompts"]
    assert m.data["opset"] == 17
    assert m.data["exported_with"]["torch"] == torch.__version__ and m.data["exported_with"]["sam2"]
    assert max(m.data["verification"]["max_abs_diff"].values()) < 1e-3
    assert m.decoder_config["dynamic_multimask_via_stability"] is True


def test_graphs_pass_onnx_checker(model_dir):
    import onnx

    for name in ("encoder.onnx", "encoder.device.onnx", "decoder.onnx"):
        onnx.checker.check_model(str(model_dir / name), full_check=True)


def test_checkpoint_errors(tmp_path):
    from sam2rt.export import build_model, load_checkpoint

    model = build_model(get_spec("hiera_tiny"), seed=0)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(model, tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(model, tmp_path / "corrupt.pt")
    torch.save({"state_dict": {}}, tmp_path / "nokey.pt")
    with pytest.raises(CheckpointError, match="expected a dict with key 'model'"):
        load_checkpoint(model, tmp_path / "nokey.pt")
    torch.save({"model": {"image_encoder.bogus": torch.zeros(1)}}, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(model, tmp_path / "wrong.pt")


def test_checkpoint_weights_are_really_loaded(checkpoint_path):
    """Loading the file replaces a differently seeded model's weights with the checkpoint's."""
    from sam2rt.export import build_model, load_checkpoint

    model = build_model(get_spec("hiera_tiny"), seed=999)
    saved = torch.load(checkpoint_path, weights_only=True)["model"]
    key = "sam_mask_decoder.iou_token.weight"
    assert not torch.equal(model.state_dict()[key], saved[key])
    load_checkpoint(model, checkpoint_path)
    assert torch.equal(model.state_dict()[key], saved[key])


@pytest.fixture()
def checkpoint_server(checkpoint_path, tmp_path, monkeypatch):
    """Serve the test checkpoint under the official file name on loopback, as a mirror of the official host."""
    root = tmp_path / "mirror"
    root.mkdir()
    (root / "sam2.1_hiera_tiny.pt").write_bytes(checkpoint_path.read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("SAM2RT_CHECKPOINT_URL_BASE", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv("SAM2RT_CACHE", str(tmp_path / "cache"))
    yield root
    server.shutdown()


def test_download_checkpoint_with_checksum(checkpoint_server, checkpoint_path, tmp_path):
    from sam2rt.export import download_checkpoint

    spec = get_spec("hiera_tiny")
    path = download_checkpoint(spec, progress=False)
    assert path.read_bytes() == checkpoint_path.read_bytes()
    digest = sha256_file(path)
    assert path.with_suffix(".pt.sha256").read_text().strip() == digest
    # a cached file that no longer matches its recorded digest is fetched again
    path.write_bytes(b"truncated")
    assert sha256_file(download_checkpoint(spec, progress=False)) == digest
    # a pinned digest that the download does not match is refused
    path.unlink()
    with pytest.raises(CheckpointError, match="corrupt"):
        download_checkpoint(spec, expected_sha256="0" * 64, progress=False)


def test_download_failure_names_both_options(monkeypatch, tmp_path):
    from sam2rt.export import download_checkpoint

    monkeypatch.setenv("SAM2RT_CHECKPOINT_URL_BASE", "http://127.0.0.1:9/")  # nothing listens on the discard port
    monkeypatch.setenv("SAM2RT_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError) as info:
        download_checkpoint(get_spec("hiera_tiny"), progress=False)
    assert "--checkpoint" in str(info.value) and "--random-weights" in str(info.value)


@pytest.mark.slow
def test_export_refuses_disagreeing_graphs(monkeypatch, checkpoint_path, tmp_path):
    """If ONNX Runtime and PyTorch disagree beyond tolerance, export fails and names the largest difference.

    Slow: the check comes after every graph is exported (most of a second export)."""
    from sam2rt.export import export_model, onnx_export

    monkeypatch.setattr(onnx_export, "ENCODER_TOLERANCE", -1.0)
    with pytest.raises(ExportError, match="largest difference"):
        export_model(get_spec("hiera_tiny"), tmp_path / "m", checkpoint=checkpoint_path, progress=False)
    assert not (tmp_path / "m" / "manifest.json").exists()


def test_export_rejects_both_weight_sources(tmp_path, checkpoint_path):
    from sam2rt.export import export_model

    with pytest.raises(ExportError, match="at most one"):
        export_model(get_spec("hiera_tiny"), tmp_path, checkpoint=checkpoint_path, random_seed=1, progress=False)


def test_model_registry():
    from sam2rt.errors import Sam2rtError

    assert get_spec("hiera_base_plus", "2.0").config_name == "configs/sam2/sam2_hiera_b+.yaml"
    assert get_spec("hiera_large").checkpoint_filename == "sam2.1_hiera_large.pt"
    assert get_spec("hiera_base_plus").serve_id == "hiera_b_plus"
    assert get_spec("hiera_b_plus") == get_spec("hiera_base_plus")  # Roboflow's spelling, accepted everywhere
    assert get_spec("hiera_b_plus", "2.0").config_name == "configs/sam2/sam2_hiera_b+.yaml"
    with pytest.raises(Sam2rtError, match="choose one of"):
        get_spec("hiera_huge")


def test_encoder_fused_variant(model_dir):
    """encoder.onnx is standard ONNX; its ORT form `fused` (MultiHeadAttention) is recorded, verified and
    the source of the optimised encoder the CPU backend loads (and not kept beside it); the GPU's form `device`
    (MultiHeadAttention in every block) is recorded, verified and kept."""
    import onnx

    from sam2rt.runtime.backends.onnxruntime_backend import cpu_graph_entries

    m = Manifest.load(model_dir)
    base = onnx.load(str(model_dir / "encoder.onnx"), load_external_data=False)
    assert {n.domain for n in base.graph.node} <= {"", "ai.onnx"}
    assert not any(n.op_type == "Conv" and "neck" in n.name for n in base.graph.node)  # neck folded
    fused_entry = m.variant("encoder", "fused")
    assert fused_entry["derived_from_sha256"] == m.graph("encoder")["sha256"]
    assert fused_entry["stored"] is False and not (model_dir / fused_entry["file"]).exists()
    device_entry = m.variant("encoder", "device")
    assert device_entry["derived_from_sha256"] == m.graph("encoder")["sha256"]
    device = onnx.load(str(m.verify_file(device_entry)), load_external_data=False)
    mha = [n for n in device.graph.node if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"]
    blocks = {n.name.split("/")[2] for n in mha}  # "/trunk/blocks.N/..."
    assert blocks == {f"blocks.{i}" for i in range(12)} and len(mha) == 12  # one per block: no chunks
    diffs = m.data["verification"]["max_abs_diff"]
    assert {k for k in diffs if k.startswith("encoder_fused.")} and max(diffs.values()) < 1e-3
    assert {k for k in diffs if k.startswith("encoder_device.")}
    opt = m.variant("encoder", "optimized")
    assert opt["source"] == "fused" and opt["derived_from_sha256"] == fused_entry["sha256"]
    assert cpu_graph_entries(m)["encoder"] is opt


def test_exported_graphs_hold_no_float64(model_dir):
    """Weights folded at export (e.g. the fused encoder's value bias into its projection, formed in float64) are
    stored as the float32 constants they become, not as float64 copies of the weights with the arithmetic left
    for every load to redo (that was 19 MB of hiera_tiny's fused encoder, ~140 MB of hiera_large's)."""
    import onnx

    graphs = sorted(model_dir.glob("*.onnx"))
    assert len(graphs) > 10
    for path in graphs:
        graph = onnx.load(str(path), load_external_data=False).graph
        doubles = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.DOUBLE]
        doubles += [n.name for n in graph.node if n.op_type == "Constant"
                    and any(a.t.data_type == onnx.TensorProto.DOUBLE for a in n.attribute if a.HasField("t"))]
        assert not doubles, f"{path.name}: float64 tensors {doubles[:5]}"


def test_stale_fused_encoder_is_ignored(model_dir):
    """A replaced encoder.onnx makes its `fused` form, and the optimised graph made from it, stale."""
    from sam2rt.runtime.backends.onnxruntime_backend import cpu_graph_entries

    m = Manifest.load(model_dir)
    m.data["graphs"]["encoder"]["sha256"] = "0" * 64
    assert cpu_graph_entries(m)["encoder"] is m.graph("encoder")
    m = Manifest.load(model_dir)
    m.data["graphs"]["encoder"]["variants"]["fused"]["sha256"] = "1" * 64  # fused replaced, optimized not remade
    # `fused` itself is not kept (only its optimised copy): the CPU falls back to the base graph
    assert cpu_graph_entries(m)["encoder"] is m.graph("encoder")


def test_load_checkpoint_reports_a_random_weights_record(tmp_path):
    """A trained (unmarked) checkpoint loads as such; one written by random_checkpoint reports its record."""
    from sam2rt.export.checkpoint import RANDOM_WEIGHTS_KEY, load_checkpoint

    layer = torch.nn.Linear(3, 2)
    torch.save({"model": layer.state_dict()}, tmp_path / "trained.pt")
    torch.save({"model": layer.state_dict(), RANDOM_WEIGHTS_KEY: {"seed": 5, "object_score_bias": 0.0}},
               tmp_path / "random.pt")
    other = torch.nn.Linear(3, 2)
    assert load_checkpoint(other, tmp_path / "trained.pt") is None
    assert torch.equal(other.weight, layer.weight)
    assert load_checkpoint(torch.nn.Linear(3, 2), tmp_path / "random.pt") == {"seed": 5, "object_score_bias": 0.0}


def test_every_exported_image_graph_is_one_specification():
    """export_model's specifications are the table's torch.onnx image rows, in the table's order (a base graph
    before its variants); the video rows are video_export's."""
    from sam2rt.export.onnx_export import IMAGE_GRAPH_SPECS
    from sam2rt.graph_table import GRAPHS
    from sam2rt.runtime.video.graphs import VIDEO_ROLES

    assert [s.key for s in IMAGE_GRAPH_SPECS] == [g.key for g in GRAPHS if g.maker == "torch.onnx" and g.role not in VIDEO_ROLES]


def test_graph_chain_exports_checks_verifies_and_records(tmp_path):
    """One specification through export -> onnx.checker -> verify -> manifest entry, on a toy module; a failing
    verification stops the chain before anything is recorded."""
    from sam2rt.export import onnx_export as ox

    class Double(torch.nn.Module):
        def forward(self, image):
            return image * 2

    def verify(run, session):
        got = session.run(None, {"image": run.image.numpy()})[0]
        return {"toy": ox.check_close("toy", got, (run.image * 2).numpy(), 1e-6)}

    run = ox.ExportRun(None, tmp_path, 17, torch.ones(1, 3, 4, 4), ())
    run.graphs["encoder"] = {"file": "encoder.onnx", "sha256": "a" * 64}
    spec = ox.GraphSpec("encoder.fused", lambda r: Double(), lambda r: (r.image,), ["image"], ["doubled"], verify,
                        dynamic_axes={"image": {0: "batch"}}, record={"note": "toy"})
    entry = ox.make_graph(spec, run)
    assert run.graphs["encoder"]["variants"]["fused"] is entry and run.diffs == {"toy": 0.0}
    assert entry["file"] == "encoder.fused.onnx" and entry["sha256"] == sha256_file(tmp_path / "encoder.fused.onnx")
    assert entry["derived_from_sha256"] == "a" * 64 and entry["note"] == "toy" and entry["precision"] == "fp32"
    assert entry["inputs"][0]["shape"][0] == "batch" and entry["outputs"][0]["name"] == "doubled"

    def wrong(run, session):
        return {"toy": ox.check_close("toy", session.run(None, {"image": run.image.numpy()})[0], run.image.numpy(), 1e-6)}

    run.graphs["encoder"].pop("variants")
    with pytest.raises(ExportError, match="toy: ONNX Runtime and PyTorch disagree"):
        ox.make_graph(ox.GraphSpec("encoder.fused", lambda r: Double(), lambda r: (r.image,), ["image"], ["doubled"], wrong), run)
    assert "variants" not in run.graphs["encoder"]


def test_parity_check_scales_with_the_values():
    """The export's ONNX-vs-PyTorch check: float32 rounding in proportion to a trained model's large values passes
    (an absolute 1e-3 would refuse it), while a wrong result, NaN, or a missing part is refused with its numbers."""
    from sam2rt.export.parity import check_close

    rng = np.random.default_rng(0)
    logits = 30.0 * rng.standard_normal((2, 4, 64, 64)).astype(np.float32)  # trained logits reach tens
    rounded = logits * (1 + 2e-5 * rng.standard_normal(logits.shape))  # ~1e-5 relative: fused, reordered float32
    assert 1e-3 < check_close("logits", rounded, logits, 1e-3) < 1e-1
    small = 0.5 * logits / np.abs(logits).max()  # values within 1: the tolerance is absolute there
    assert check_close("small", small + 9e-4, small, 1e-3) == pytest.approx(9e-4, rel=1e-3)
    with pytest.raises(ExportError, match=r"small: ONNX Runtime and PyTorch disagree \(largest difference 0.0011 > "):
        check_close("small", small + 1.1e-3, small, 1e-3)
    wrong = logits.copy()
    wrong[0, 0, :8] = 0.0  # part of the output not computed: off by the values themselves
    with pytest.raises(ExportError, match="logits: ONNX Runtime and PyTorch disagree"):
        check_close("logits", wrong, logits, 1e-3)
    with pytest.raises(ExportError, match="disagree"):
        check_close("nan", np.full(3, np.nan), np.zeros(3), 1e-3)
    with pytest.raises(ExportError, match=r"shape \(3,\), PyTorch's \(4,\)"):
        check_close("short", np.zeros(3), np.zeros(4), 1e-3)
    assert check_close("score", np.array([[2.5]]), np.array(2.5), 1e-3) == 0.0  # same values, other shape
