"""The video graphs export, and agree with PyTorch, for every official config: four sizes, SAM 2.0 and 2.1.

The image graphs' export is exercised on hiera_tiny 2.1 (conftest's session export); what differs between
the configs on the video side is read from the config (SAM 2.1's signed temporal encodings for pointers,
`no_obj_embed_spatial`, ...), so each config's video graphs are exported and verified against the
reference's own methods (export_video_graphs refuses a graph that disagrees by more than 1e-3). The
memory path takes the image encoder's features as inputs: random features of the right shapes stand in
for them, which keeps hiera_large's encoder out of a 2-core test run. Slow: ~20-40 s per config.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sam2rt.model_specs import get_spec

CONFIGS = [(name, version) for version in ("2.0", "2.1")
           for name in ("hiera_tiny", "hiera_small", "hiera_base_plus", "hiera_large")]


@pytest.mark.slow
@pytest.mark.parametrize("name,version", CONFIGS, ids=[f"{n}-{v}" for n, v in CONFIGS])
def test_video_graphs_export_and_verify_for_every_config(name: str, version: str, tmp_path: Path):
    import onnx
    import torch

    from sam2rt.export.checkpoint import build_model
    from sam2rt.export.video_export import VIDEO_TOLERANCE, export_video_graphs

    model = build_model(get_spec(name, version), seed=0)
    g = torch.Generator().manual_seed(1)
    feats = (torch.randn(1, 256, 64, 64, generator=g), torch.randn(1, 32, 256, 256, generator=g),
             torch.randn(1, 64, 128, 128, generator=g))
    out = export_video_graphs(model, tmp_path, feats)

    assert set(out["graphs"]) == {"memory_encoder", "memory_attention", "track_decoder", "mask_downsample",
                                  "video_constants"}
    for entry in out["graphs"].values():
        assert (tmp_path / entry["file"]).is_file()
    assert out["verification"] and all(0 <= d <= VIDEO_TOLERANCE for d in out["verification"].values())
    s = out["video"]
    # what the config says, as the built reference model holds it
    assert s["use_signed_tpos_enc_to_obj_ptrs"] == bool(model.use_signed_tpos_enc_to_obj_ptrs)
    assert s["no_obj_embed_spatial"] == (model.no_obj_embed_spatial is not None)
    assert s["num_maskmem"] == model.num_maskmem == 7 and s["fill_hole_area"] == 8
    # SAM 2.1 added signed pointer temporal encodings and the spatial no-object embedding; 2.0 has neither
    assert s["use_signed_tpos_enc_to_obj_ptrs"] is (version == "2.1")
    assert s["no_obj_embed_spatial"] is (version == "2.1")
    # the memory attention's inputs are static: no dimension grows with the stream
    attn = onnx.load(str(tmp_path / out["graphs"]["memory_attention"]["file"]), load_external_data=False)
    for inp in attn.graph.input:
        dims = inp.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), f"{inp.name} has a dynamic dimension"
