"""The fast mask-free decoder (decoder_prep + decoder_fast): used for plain prompts, equal to the reference.

Which graph runs when is checked on the tiny stand-in model; the numerics and the export on the real one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import photo
from sam2rt.runtime.embedding import FAST_MAX_POINTS, PREPARED_NAMES


class _Counting:
    """Wraps an onnxruntime session and counts its runs."""

    def __init__(self, session) -> None:
        self.session, self.runs = session, 0

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)


@pytest.fixture()
def counted(tiny_model_dir):
    """A fresh CPU model (the tiny stand-in graphs) whose three mask-free graphs count their runs."""
    from sam2rt.runtime import Sam2Model

    model = Sam2Model.from_dir(tiny_model_dir, backend="onnxruntime-cpu")
    b = model.backend
    # only what plain prompts need is loaded up front (the other decoders' weights would add to peak memory)
    assert set(b._sessions) == {"decoder_prep", "decoder_fast"}
    for slot in ("decoder_prep", "decoder_fast", "decoder_nomask"):
        b._sessions[slot] = _Counting(b._decoder_session(slot))
    b._prep, b._fast, b._decoder_nomask = (b._sessions[s] for s in ("decoder_prep", "decoder_fast", "decoder_nomask"))
    return model


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path):
    import shutil

    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture(scope="module")
def coffee_embedding(sam2rt_model):
    """The real export's embedding of one photo, shared by the numerical tests."""
    return sam2rt_model.embed(photo("coffee"))


def _points(n: int, rng: np.random.Generator, h: int, w: int):
    from sam2rt.runtime import Prompt

    return Prompt(points=rng.uniform(0, [w - 1, h - 1], size=(n, 2)), labels=rng.integers(0, 2, n))


def test_export_records_and_verifies_the_fast_decoder(model_dir):
    from sam2rt.manifest import Manifest, sha256_file

    m = Manifest.load(model_dir)
    for name in ("prep", "prep_optimized", "fast_optimized", "fast_device"):
        entry = m.variant("decoder", name)
        assert entry is not None, name
        assert sha256_file(model_dir / entry["file"]) == entry["sha256"]
    # the CPU-layout graph is made (and verified) as the source of its optimised copy, then not kept
    assert m.variant("decoder", "fast")["stored"] is False and m.variant("decoder", "fast")["sha256"]
    for name in ("fast", "fast_optimized", "fast_device"):
        assert m.variant("decoder", name)["max_points"] == FAST_MAX_POINTS
    assert [o["name"] for o in m.variant("decoder", "prep")["outputs"]] == list(PREPARED_NAMES)
    diffs = m.data["verification"]["max_abs_diff"]
    for label in ("decoder_fast.", "decoder_fast_device."):
        fast = {k: v for k, v in diffs.items() if k.startswith(label)}
        assert any(f"N={FAST_MAX_POINTS}" in k for k in fast), fast
        assert fast and max(fast.values()) < 1e-3


def test_embed_prepares_and_plain_prompts_use_the_fast_graph(counted):
    from sam2rt.runtime import Prompt

    image = photo("astronaut")
    emb = counted.embed(image)
    b = counted.backend
    assert b._prep.runs == 1 and set(emb.prepared) == set(PREPARED_NAMES)
    assert emb.nbytes > sum(v.nbytes for v in emb.features.values())  # the cache's byte accounting sees them
    counted.decode(emb, [Prompt(points=np.array([[100.0, 120.0]]), labels=np.array([1])), Prompt(box=np.array([5, 5, 200, 300]))])
    assert b._fast.runs == 2 and b._decoder_nomask.runs == 0 and b._prep.runs == 1
    # more points than the fast graph takes: the mask-free graph, same kind of result
    out = counted.decode(emb, _points(FAST_MAX_POINTS + 1, np.random.default_rng(0), *image.shape[:2]))
    assert b._decoder_nomask.runs == 1 and b._fast.runs == 2
    assert out.masks.shape == (1, 3, *image.shape[:2])


@pytest.mark.parametrize("n_points", [1, 4, FAST_MAX_POINTS - 1, FAST_MAX_POINTS + 3])
def test_fast_graph_equals_the_mask_free_graph(sam2rt_model, coffee_embedding, n_points):
    """Same prompts through decoder_fast (prepared tensors given) and decoder_nomask (not given)."""
    emb = coffee_embedding
    rng = np.random.default_rng(n_points)
    xy = rng.uniform(0, 1024, size=(3, n_points, 2)).astype(np.float32)
    lab = rng.integers(-1, 4, size=(3, n_points)).astype(np.float32)
    b = sam2rt_model.backend
    no_mask = np.zeros((3, 1, 256, 256), np.float32), np.zeros((3,), np.float32)
    fast = b.decode({**emb.features, **emb.prepared}, xy, lab, *no_mask)
    plain = b.decode(emb.features, xy, lab, *no_mask)
    np.testing.assert_allclose(fast[0], plain[0], atol=1e-4)
    np.testing.assert_allclose(fast[1], plain[1], atol=1e-5)


def test_saved_embedding_leaves_out_the_prepared_tensors(counted, tmp_path):
    """Embedding.save writes the encoder features only; a loaded one is prepared once, on its first decode."""
    from sam2rt.runtime import Embedding, Prompt

    emb = counted.embed(photo("chelsea"))
    path = emb.save(tmp_path / "e.npz")
    with np.load(path) as data:
        assert not set(PREPARED_NAMES) & set(data.files)
    loaded = Embedding.load(path)
    assert loaded.prepared == {}
    prompt = Prompt(box=np.array([20.0, 30.0, 200.0, 250.0]))
    a, b = counted.decode(emb, prompt), counted.decode(loaded, prompt)
    assert set(loaded.prepared) == set(PREPARED_NAMES) and counted.backend._prep.runs == 2
    counted.decode(loaded, prompt)
    assert counted.backend._prep.runs == 2 and counted.backend._fast.runs == 3
    np.testing.assert_array_equal(a.low_res_logits, b.low_res_logits)


def test_stale_fast_decoder_is_not_used(model_copy):
    """If decoder.onnx is replaced, decoder_fast (made with the old one) is ignored, not silently used."""
    import json

    from sam2rt.runtime import Sam2Model

    manifest = json.loads((model_copy / "manifest.json").read_text())
    manifest["graphs"]["decoder"]["sha256"] = "0" * 64  # as if decoder.onnx had been re-exported alone
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    model = Sam2Model.from_dir(model_copy, backend="onnxruntime-cpu", verify=False)
    assert "decoder_fast" not in model.backend.files and model.backend.prepare({}) == {}
    emb = model.embed(photo("chelsea"))
    assert emb.prepared == {}


def test_fast_decoder_can_be_turned_off(tiny_model_dir):
    from sam2rt.manifest import Manifest
    from sam2rt.runtime import Sam2Model
    from sam2rt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    manifest = Manifest.load(tiny_model_dir)
    model = Sam2Model(manifest, OnnxRuntimeBackend(manifest, "onnxruntime-cpu", fast_decoder=False))
    assert "decoder_fast" not in model.backend.files
    assert model.embed(photo("chelsea")).prepared == {}


def test_fast_graph_is_exported_for_one_prompt_without_slow_fusions(model_dir):
    """decoder_fast takes one prompt (only the point count is dynamic), its GPU form any number (prompts and points
    dynamic); the CPU's saved optimised copy keeps ORT's slower fusions (SkipLayerNormalization, MatMul + full-size
    Add -> Gemm) out, as the manifest says."""
    import onnx

    from sam2rt.export.fast_decoder import FAST_DISABLED_OPTIMIZERS
    from sam2rt.manifest import Manifest

    m = Manifest.load(model_dir)
    fast, opt = m.variant("decoder", "fast"), m.variant("decoder", "fast_optimized")
    assert fast["prompts_per_run"] == 1 and opt["prompts_per_run"] == 1
    assert fast["ort_disabled_optimizers"] == list(FAST_DISABLED_OPTIMIZERS) == opt["ort_disabled_optimizers"]
    for name, prompts in (("fast_optimized", 1), ("fast_device", "num_prompts")):
        graph = onnx.load(str(model_dir / m.variant("decoder", name)["file"])).graph
        dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
        assert dims["point_coords"] == [prompts, "num_points", 2], (name, dims["point_coords"])
    optimized = onnx.load(str(model_dir / opt["file"])).graph
    assert "SkipLayerNormalization" not in {n.op_type for n in optimized.node}
    init = {t.name: t for t in optimized.initializer}
    for n in optimized.node:  # MatMul + Add -> Gemm only where the Add was a weight's 1-D bias
        if n.op_type == "Gemm" and len(n.input) == 3:
            assert n.input[2] in init and len(init[n.input[2]].dims) <= 1, n.name


def test_a_batch_decodes_on_parallel_lanes_as_prompt_by_prompt(tiny_model):
    """A batch on the fast decoder runs on single-threaded sessions side by side; each prompt's result is
    the one the main session gives it alone."""
    emb = tiny_model.embed(photo("coffee"))
    b = tiny_model.backend
    if b.threads < 2:
        pytest.skip("one thread: batches run prompt by prompt on the main session")
    rng = np.random.default_rng(7)
    xy = rng.uniform(0, 1024, size=(5, 3, 2)).astype(np.float32)
    lab = np.tile(np.array([[2.0, 3.0, -1.0]], np.float32), (5, 1))
    no_mask = np.zeros((5, 1, 256, 256), np.float32), np.zeros((5,), np.float32)
    feats = {**emb.features, **emb.prepared}
    low_res, iou = b.decode(feats, xy, lab, *no_mask)
    assert b._fast_lanes is not None and len(b._fast_lanes) == min(b.threads, 8)
    for i in range(5):
        one = b.decode(feats, xy[i : i + 1], lab[i : i + 1], no_mask[0][:1], no_mask[1][:1])
        np.testing.assert_allclose(low_res[i : i + 1], one[0], atol=1e-5)
        np.testing.assert_allclose(iou[i : i + 1], one[1], atol=1e-6)


def test_an_export_without_the_new_manifest_keys_still_decodes_batches(model_copy):
    """A manifest from before `prompts_per_run` / `ort_disabled_optimizers` loads, and a batch gives each
    prompt's own result (it is decoded prompt by prompt, as the current graph is)."""
    import json

    from sam2rt.runtime import Prompt, Sam2Model

    path = model_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    variants = manifest["graphs"]["decoder"]["variants"]
    assert {"fast", "fast_optimized"} <= set(variants)
    for name in ("fast", "fast_optimized"):
        variants[name].pop("prompts_per_run")
        variants[name].pop("ort_disabled_optimizers")
    path.write_text(json.dumps(manifest))
    model = Sam2Model.from_dir(model_copy, backend="onnxruntime-cpu")
    assert model.backend.fast_batch == 1 and "decoder_fast" in model.backend.files
    emb = model.embed(photo("chelsea"))
    boxes = [Prompt(box=np.array([10.0 + 20 * i, 15.0, 200.0 + 10 * i, 260.0])) for i in range(3)]
    together = model.decode(emb, boxes)
    for i, prompt in enumerate(boxes):
        np.testing.assert_allclose(together.low_res_logits[i : i + 1], model.decode(emb, prompt).low_res_logits, atol=1e-5)


def _decoder_sessions(model_dir: Path, *files: str) -> list:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return [ort.InferenceSession(str(model_dir / f), so, providers=["CPUExecutionProvider"]) for f in files]


def test_the_gpu_form_decodes_a_whole_batch_in_one_run(model_dir):
    """decoder_fast.device.onnx, the GPU's fast decoder, takes any number of prompts per run (the manifest says
    so): 16 boxes, and clicks with padding and every label, give decoder_nomask's batched results, and each
    prompt's row equals a run of that prompt alone (no prompt sees another's tokens)."""
    from sam2rt.manifest import Manifest

    m = Manifest.load(model_dir)
    assert m.variant("decoder", "fast_device")["prompts_per_run"] == "any"
    assert m.variant("decoder", "fast_optimized")["prompts_per_run"] == 1
    prep, fast, nomask = _decoder_sessions(model_dir, "decoder_prep.onnx", "decoder_fast.device.onnx", "decoder_nomask.onnx")
    rng = np.random.default_rng(7)
    shapes = {o["name"]: o["shape"] for o in m.graph("encoder")["outputs"]}
    feats = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    prepared = dict(zip([o.name for o in prep.get_outputs()], prep.run(None, feats)))
    corners = np.sort(rng.uniform(0, 1024, size=(16, 2, 2)), axis=1).astype(np.float32)
    boxes = (np.concatenate([corners, np.zeros((16, 1, 2), np.float32)], axis=1),
             np.tile(np.array([[2, 3, -1]], np.float32), (16, 1)))
    clicks = (rng.uniform(0, 1024, size=(4, 5, 2)).astype(np.float32), rng.integers(-1, 4, size=(4, 5)).astype(np.float32))
    for coords, labels in (boxes, clicks):
        prompts = {"point_coords": coords, "point_labels": labels}
        got = fast.run(None, {**prepared, **prompts})
        ref = nomask.run(None, {**feats, **prompts})
        assert got[0].shape == ref[0].shape == (len(coords), 4, 256, 256)
        np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-4)
        np.testing.assert_allclose(got[1], ref[1], rtol=0, atol=1e-5)
        for i in (0, len(coords) - 1):
            alone = fast.run(None, {**prepared, **{k: v[i : i + 1] for k, v in prompts.items()}})
            np.testing.assert_allclose(alone[0][0], got[0][i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("batched", [True, False], ids=["batched-gpu-form", "one-prompt-form"])
def test_the_device_backend_serves_a_batch_from_the_fast_decoder_when_it_takes_one(model_dir, sam2rt_model, batched):
    """On the device backend (here on the CPU provider, fixed buffers on) 16 boxes run through the fast decoder in
    one run (its merged decode graph, with the postprocessing); an export whose GPU form takes one prompt per run (before batches) sends them to decoder_nomask. Both
    give the CPU backend's results."""
    from sam2rt.manifest import Manifest
    from sam2rt.runtime import Prompt, Sam2Model
    from sam2rt.runtime.backends import OrtDeviceBackend

    m = Manifest.load(model_dir)
    if not batched:
        m.data["graphs"]["decoder"]["variants"]["fast_device"]["prompts_per_run"] = 1
    image = photo("chelsea")
    h, w = image.shape[:2]
    rng = np.random.default_rng(3)
    boxes = [Prompt(box=np.concatenate([np.sort(rng.uniform(0, w, 2)), np.sort(rng.uniform(0, h, 2))])[[0, 2, 1, 3]])
             for _ in range(16)]
    ref = sam2rt_model.decode(sam2rt_model.embed(image), boxes, multimask_output=False)
    with Sam2Model(m, OrtDeviceBackend(m, "onnxruntime-cpu", fixed_buffers=True)) as model:
        assert model.backend.fast_decoder_check.startswith("on"), model.backend.fast_decoder_check
        emb = model.embed(image)
        for _ in range(2):  # the second run replays the fixed buffers
            got = model.decode(emb, boxes, multimask_output=False)
            np.testing.assert_allclose(got.low_res_logits, ref.low_res_logits, rtol=0, atol=1e-4)
            np.testing.assert_allclose(got.scores, ref.scores, rtol=0, atol=1e-5)
            assert (got.masks != ref.masks).mean() < 1e-4
        slots = {key[0] for key in model.backend._captured if isinstance(key, tuple)}
        graphs = model.backend.pipeline_graphs
        if batched:  # the fast decoder and the postprocessing in one graph (export/decode_graphs.py)
            assert list(graphs["decode_single"].values()) == ["fixed buffers"] and not slots, (graphs, slots)
        else:
            assert slots == {"decoder_nomask"} and "decode_single" not in graphs, (graphs, slots)
