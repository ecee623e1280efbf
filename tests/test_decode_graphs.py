"""The merged decode graphs (export/decode_graphs.py: the GPU fast decoder and the device postprocessing in one graph,
so that a decode to masks is one ONNX Runtime run, one CUDA-graph replay on a GPU), on the CPU provider.

- the export writes them for the cuda target, checked against the two graphs, and the check catches a merge that
  computes something else;
- the device backend decodes through them exactly as through the two graphs: one click and a batch of boxes, three
  masks and one, bool and float masks and logits, with fixed buffers (the GPU's flow) and without;
- a merged graph made with another postprocessing than the package's, or a fixed-buffer signature of it that is
  refused, leaves the decodes to the two graphs, with the same results.
tests/test_gpu.py runs the same comparison on CUDA with graph capture.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sam2rt.manifest import Manifest

MERGED_FILES = ("decoder_fast.device.multi.onnx", "decoder_fast.device.single.onnx")
N_CASES = 6  # _decode_all's


def _cases():
    from sam2rt.runtime import Prompt

    click = Prompt(points=np.array([[200.0, 150.0]]), labels=np.array([1]))
    clicks = Prompt(points=np.array([[120.0, 90.0], [40.0, 30.0]]), labels=np.array([1, 0]))
    boxes = [Prompt(box=np.array([10.0 + 7 * i, 20.0, 150.0 + 9 * i, 180.0])) for i in range(16)]
    return [(click, {}), (clicks, {"multimask_output": False}), (click, {"return_logits": True}),
            (boxes, {"multimask_output": False}), (boxes[:3], {})]


def _decode_all(model, emb) -> list:
    """Every case of _cases (each run twice: the second run of a shape replays its fixed buffers), then one click as
    the Predictor asks for it: float 0/1 masks (decode_batch, coordinates in the input frame)."""
    out = []
    for prompts, kw in _cases():
        for _ in range(2):
            got = model.decode(emb, prompts, **kw)
        out.append(got)
    request = model.mask_request(emb.original_size, True, False, None, float_masks=True)
    xy, labels = np.array([[[500.0, 400.0], [0.0, 0.0]]], np.float32), np.array([[1.0, -1.0]], np.float32)
    for _ in range(2):
        got = model.decode_batch(emb, xy, labels, None, request)
    out.append(got)
    return out


def _assert_same(got: list, want: list) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.masks.dtype == w.masks.dtype and g.masks.shape == w.masks.shape
        np.testing.assert_array_equal(g.masks, w.masks)
        np.testing.assert_array_equal(g.scores, w.scores)
        np.testing.assert_array_equal(g.low_res_logits, w.low_res_logits)


def test_the_export_writes_the_merged_decode_graphs_checked_against_the_two(tiny_model_dir: Path):
    from sam2rt.export.decode_graphs import postprocess_sha256
    from sam2rt.graph_table import CUDA, graph_file

    m = Manifest.load(tiny_model_dir)
    for variant, multimask in (("decode_multi", True), ("decode_single", False)):
        entry = m.variant("decoder", variant)
        assert entry["file"] == graph_file("decoder", variant).file and CUDA in graph_file("decoder", variant).runs_on
        assert m.verify_file(entry).exists()
        assert entry["source"] == "fast_device"
        assert entry["derived_from_sha256"] == m.variant("decoder", "fast_device")["sha256"]
        assert entry["postprocess_sha256"] == postprocess_sha256(multimask)
        assert set(entry["check_max_abs_diff"]) == {"low_res_logits", "scores", "upsampled", "mask_values"}
        names = [i["name"] for i in entry["inputs"]]
        assert names[:2] == ["prep_keys0", "prep_t2i_k0"] and "c0" in names and "low_res_masks" not in names
        # the prompts in one input (one upload a decode): (B,N,3) x, y, label
        assert "point_prompts" in names and "point_coords" not in names and "point_labels" not in names
        [packed] = [i for i in entry["inputs"] if i["name"] == "point_prompts"]
        assert packed["shape"] == ["num_prompts", "num_points", 3]
        assert ("stability_thresh" in names) == (not multimask)
        assert [o["name"] for o in entry["outputs"]] == ["low_res_logits", "scores", "upsampled", "masks", "mask_values"]


def test_the_merge_check_catches_a_graph_that_computes_otherwise(tiny_model_dir: Path, tmp_path: Path):
    """The export's check runs the merged graph against the decoder and the postprocessing run one after the other:
    a merged graph whose clamp of the logits is off (32 -> 0.5) is refused, with what differs."""
    import onnx
    from onnx import numpy_helper

    from sam2rt.errors import ExportError
    from sam2rt.export.decode_graphs import POST_PREFIX, check_decode_graph

    m = Manifest.load(tiny_model_dir)
    decoder = m.verify_file(m.variant("decoder", "fast_device"))
    merged = onnx.load(str(m.verify_file(m.variant("decoder", "decode_multi"))))
    assert check_decode_graph(decoder, tiny_model_dir / MERGED_FILES[0], multimask=True)["low_res_logits"] == 0.0
    [clamp] = [t for t in merged.graph.initializer if t.name == f"{POST_PREFIX}clamp_hi"]
    clamp.CopyFrom(numpy_helper.from_array(np.array(0.5, np.float32), clamp.name))
    onnx.save(merged, str(tmp_path / "wrong.onnx"))
    with pytest.raises(ExportError, match="low_res_logits differ"):
        check_decode_graph(decoder, tmp_path / "wrong.onnx", multimask=True)


@pytest.mark.parametrize("fixed_buffers", [True, False])
def test_decodes_through_the_merged_graph_equal_the_two_graphs(tiny_model_dir: Path, fixed_buffers: bool):
    from conftest import photo
    from sam2rt.runtime import Sam2Model
    from sam2rt.runtime.backends.ort_device_backend import OrtDeviceBackend

    m = Manifest.load(tiny_model_dir)
    image = photo("coffee")
    results = {}
    for merged in (False, True):
        backend = OrtDeviceBackend(m, "onnxruntime-cpu", fixed_buffers=fixed_buffers)
        assert backend.merged_decode == "on"
        backend.use_merged_decode = merged
        with Sam2Model(m, backend) as model:
            emb = model.embed(image)
            results[merged] = _decode_all(model, emb)
            graphs = dict(backend.pipeline_graphs)
            replays = backend._pipeline.replay_seconds
    _assert_same(results[True], results[False])
    assert results[True][0].masks.shape == (1, 3, *image.shape[:2]) and results[True][3].masks.shape[:2] == (16, 1)
    assert results[True][2].masks.dtype == np.float32  # return_logits: the upsampled logits
    assert any(r.masks.any() and not r.masks.all() for r in results[True])  # masks that say something
    if fixed_buffers:  # every case ran from the merged graphs' fixed buffers, none through the postprocessing's
        merged_status = {**graphs.get("decode_multi", {}), **graphs.get("decode_single", {})}
        assert len(merged_status) == N_CASES and set(merged_status.values()) == {"fixed buffers"}, graphs
        assert not graphs.get("postprocess_multi") and not graphs.get("postprocess_single"), graphs
        assert replays["decode_multi"][1] + replays["decode_single"][1] == N_CASES  # the second run of each


def test_a_merged_graph_made_with_another_postprocessing_is_not_used(tiny_model_dir: Path, tmp_path: Path):
    """The merged graph holds a copy of the postprocessing: where the package's graph is another (another sam2rt
    made the export), the backend decodes in two graphs and says why."""
    from conftest import photo
    from sam2rt.runtime import Sam2Model
    from sam2rt.runtime.backends.ort_device_backend import OrtDeviceBackend

    stale = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    data = json.loads((stale / "manifest.json").read_text())
    data["graphs"]["decoder"]["variants"]["decode_single"]["postprocess_sha256"] = "0" * 64
    (stale / "manifest.json").write_text(json.dumps(data))
    image = photo("coffee")
    results = []
    for directory in (tiny_model_dir, stale):
        m = Manifest.load(directory)
        backend = OrtDeviceBackend(m, "onnxruntime-cpu", fixed_buffers=True)
        with Sam2Model(m, backend) as model:
            results.append(_decode_all(model, model.embed(image)))
            graphs = dict(backend.pipeline_graphs)
    assert backend.merged_decode.startswith("off: decoder_fast.device.single.onnx made with another sam2rt's"), \
        backend.merged_decode
    assert not backend.use_merged_decode and "decode_multi" not in backend.files
    # the postprocessing graphs ran (their fixed-shape sessions exist), the merged ones did not
    assert "decode_multi" not in graphs and {"postprocess_single", "postprocess_multi"} <= set(graphs), graphs
    _assert_same(results[1], results[0])


def test_a_refused_merged_signature_decodes_in_two_graphs_from_then_on(tiny_model_dir: Path, monkeypatch):
    """A merged graph's fixed-buffer session whose first replay disagrees with its plain session (a fusion computing
    otherwise on some GPU) is not used; that prompt shape then decodes through the two captured graphs, not through
    the merged graph's plain (uncaptured) session, and the results stay the plain ones."""
    from conftest import photo
    from sam2rt.runtime import Sam2Model
    from sam2rt.runtime.backends import fixed_shapes
    from sam2rt.runtime.backends.ort_device_backend import OrtDeviceBackend

    m = Manifest.load(tiny_model_dir)
    image = photo("coffee")
    with Sam2Model(m, OrtDeviceBackend(m, "onnxruntime-cpu", fixed_buffers=False)) as plain:
        want = _decode_all(plain, plain.embed(image))
    real = fixed_shapes.FixedShapeSession._disagreement

    def disagree(self, got, ref):
        return "differs by 1 (forced)" if self.name.startswith("decode_") else real(self, got, ref)

    monkeypatch.setattr(fixed_shapes.FixedShapeSession, "_disagreement", disagree)
    backend = OrtDeviceBackend(m, "onnxruntime-cpu", fixed_buffers=True)
    with Sam2Model(m, backend) as model:
        got = _decode_all(model, model.embed(image))
        graphs = dict(backend.pipeline_graphs)
        replays = backend._pipeline.replay_seconds
    _assert_same(got, want)
    assert len(backend._merged_refused) == N_CASES, backend._merged_refused
    assert all(v.startswith("rejected") for v in backend._merged_refused.values())
    assert replays["decode_multi"][1] + replays["decode_single"][1] == 0
    assert {"postprocess_single", "postprocess_multi"} <= set(graphs), graphs  # the two-graph path took over


FP16_FILES = ("decoder_fast.device.multi.fp16.onnx", "decoder_fast.device.single.fp16.onnx")


def test_the_export_writes_fp16_merged_graphs_checked_against_the_fp32_ones(model_dir: Path):
    """`sam2rt export` (fp16 on) writes the merged graphs' FP16 copies for onnxruntime-cuda:fp16: made from the FP32
    merged graphs, their decoder in FP16 weights, their postprocessing (everything from the decoder's outputs on)
    FP32, inputs and outputs FP32, and the export's check against the FP32 graph within the FP16 bounds."""
    import onnx
    from onnx import TensorProto

    from sam2rt.export.decode_graphs import DECODER_OUTPUTS, FP16_BOUNDS
    from sam2rt.export.fp16 import downstream_nodes
    from sam2rt.graph_table import CUDA, graph_file

    m = Manifest.load(model_dir)
    for variant, source, name in (("decode_multi_fp16", "decode_multi", FP16_FILES[0]),
                                  ("decode_single_fp16", "decode_single", FP16_FILES[1])):
        entry = m.variant("decoder", variant)
        assert entry["file"] == name == graph_file("decoder", variant).file and graph_file("decoder", variant).runs_on == (CUDA,)
        assert entry["source"] == source and entry["derived_from_sha256"] == m.variant("decoder", source)["sha256"]
        assert entry["postprocess_sha256"] == m.variant("decoder", source)["postprocess_sha256"]
        check = entry["check"]
        assert check["refused"] is None and check["best_token_same"] == 1.0
        assert all(check[k] <= bound for k, bound in FP16_BOUNDS.items()), check
        assert 0 < check["low_res_logits_max"]  # it is FP16: it rounds
        g = onnx.shape_inference.infer_shapes(onnx.load(str(m.verify_file(entry)))).graph
        weights = [t for t in g.initializer if len(t.dims) == 2 and min(t.dims) >= 32]
        assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)
        assert all(o.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.BOOL) for o in g.output)
        types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.output]}
        post = [n for n in g.node if n.name in set(downstream_nodes(g, DECODER_OUTPUTS))]
        assert len(post) >= 15 and entry["fp32_summary"]["after the FP16 part"] > 0
        # the postprocessing computes in FP32 from the decoder's outputs on: no FP16 value in it
        assert not [o for n in post for o in n.output if types.get(o) == TensorProto.FLOAT16]
        assert any(t == TensorProto.FLOAT16 for t in types.values())  # while the decoder's values are FP16


def _parity_stats(got: list, want: list) -> dict[str, float]:
    low = [np.abs(g.low_res_logits.astype(np.float64) - w.low_res_logits).mean() for g, w in zip(got, want)]
    scores = [np.abs(g.scores - w.scores).max() for g, w in zip(got, want)]
    same = np.concatenate([g.scores.argmax(-1) == w.scores.argmax(-1) for g, w in zip(got, want) if w.scores.shape[-1] > 1])
    flips = sum(int(np.count_nonzero(g.masks != w.masks)) for g, w in zip(got, want))  # of all pixels: stricter
    pixels = sum(w.masks.size for w in want)  # than the issue's, which counts confident pixels only
    return {"logits_mean": float(max(low)), "scores_max": float(max(scores)), "same_choice": float(same.mean()),
            "flipped": flips / pixels}


def test_fp16_mode_decodes_through_the_fp16_merged_graphs_within_the_bounds(model_dir: Path):
    """The device backend in fp16 (on the CPU provider, fixed buffers: the GPU's data flow) decodes plain prompts
    through the FP16 merged graphs, and the whole fp16 mode (encoder and decoder) keeps issue 11's bounds against
    FP32 on two photos: clicks, clicks with a negative point and boxes. With `use_fp16_decoder` off it decodes
    through the FP32 merged graphs."""
    from conftest import photo
    from sam2rt.runtime import Prompt, Sam2Model
    from sam2rt.runtime.backends.ort_device_backend import OrtDeviceBackend

    m = Manifest.load(model_dir)
    results: dict[str, list] = {}
    for mode in ("fp32", "fp16", "fp16, FP32 decoder"):
        backend = OrtDeviceBackend(m, "onnxruntime-cpu", precision=mode.split(",")[0], fixed_buffers=True)
        assert backend.use_fp16_decoder == (mode != "fp32")
        backend.use_fp16_decoder = mode == "fp16"
        with Sam2Model(m, backend) as model:
            out = []
            for name in ("astronaut", "coffee"):
                image = photo(name)
                h, w = image.shape[:2]
                emb = model.embed(image)
                clicks = [Prompt(points=[[x * w, y * h]], labels=[1]) for x, y in ((0.3, 0.4), (0.6, 0.5), (0.5, 0.8))]
                out += [model.decode(emb, p) for p in clicks]
                out.append(model.decode(emb, Prompt(points=[[0.4 * w, 0.4 * h], [0.7 * w, 0.7 * h]], labels=[1, 0])))
                out.append(model.decode(emb, [Prompt(box=[0.1 * w, 0.1 * h, (0.3 + 0.1 * i) * w, 0.8 * h]) for i in range(6)],
                                        multimask_output=False))
            results[mode] = out
            used = set(backend.pipeline_graphs)
        fp16_graphs, fp32_graphs = {"decode_multi_fp16", "decode_single_fp16"}, {"decode_multi", "decode_single"}
        if mode == "fp16":
            assert fp16_graphs <= used and not used & fp32_graphs, used
        else:
            assert fp32_graphs <= used and not used & fp16_graphs, used
    stats = _parity_stats(results["fp16"], results["fp32"])
    assert stats["logits_mean"] <= 0.05 and stats["scores_max"] <= 0.02, stats
    assert stats["same_choice"] >= 0.95 and stats["flipped"] <= 0.01, stats
    # the FP16 decoder is a change of its own: the fp16 mode with it and without it differ
    assert any(not np.array_equal(a.low_res_logits, b.low_res_logits)
               for a, b in zip(results["fp16"], results["fp16, FP32 decoder"]))


def test_an_fp16_copy_that_fails_its_check_is_not_written_and_fp16_decodes_in_fp32(tiny_model_dir: Path, tmp_path: Path,
                                                                                     monkeypatch):
    """Weights whose FP16 decoder would pass the bounds (forced here: bounds of 0) get no FP16 copy: the manifest
    says why, the file is not left behind, and a device backend finds the FP32 merged graphs alone (the fp16 mode
    then decodes with them: test_fp16_mode_decodes_through_the_fp16_merged_graphs_within_the_bounds)."""
    from sam2rt.export import decode_graphs
    from sam2rt.export.optimize import add_variants
    from sam2rt.graph_table import DEVICE_SLOTS
    from sam2rt.runtime.backends.onnxruntime_backend import slot_entries

    d = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    monkeypatch.setattr(decode_graphs, "FP16_BOUNDS", {"low_res_logits_mean": 0.0, "scores_max": 1.0, "confident_flipped": 1.0})
    with pytest.warns(UserWarning, match="decoder_fast.device.multi.fp16.onnx is not usable"):
        m = add_variants(d, optimized=False, fp16=True)
    entry = m.variant("decoder", "decode_multi_fp16")
    assert entry["stored"] is False and entry["refused"].startswith("low_res_logits_mean")
    assert not (d / FP16_FILES[0]).exists() and not (d / FP16_FILES[1]).exists()
    slots = slot_entries(m, DEVICE_SLOTS)  # what a device backend loads: the FP32 merged graphs, no FP16 copy
    assert {"decode_multi", "decode_single"} <= set(slots) and not {"decode_multi_fp16", "decode_single_fp16"} & set(slots)
