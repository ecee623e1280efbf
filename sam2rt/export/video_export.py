"""Exporting SAM 2's video graphs (memory encoder, memory attention, tracking decoder, mask downsampling)
and checking each against the reference's own methods on the same model before they are recorded."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ExportError
from ..graph_table import CUDA, graph_file, row
from .cuda_matmul import refuse_cuda_problems
from .parity import check_close
from .encoder_fusion import MHA_DOMAIN
from ..manifest import sha256_file
from ..runtime.video.heads import NO_POINTS_COORDS, NO_POINTS_LABELS, select_track_output, use_multimask
from ..runtime.video.sessions import create_session, run
from ..runtime.video.memory import (
    FrameOutput, ObjectMemory, SlotLayout, compact_feeds, memory_feeds, round_bf16,
)
from .video_graphs import (
    MASK_DOWNSAMPLE_INPUTS, MASK_DOWNSAMPLE_OUTPUTS, MEMORY_ATTENTION_COMPACT_AXES, MEMORY_ATTENTION_COMPACT_INPUTS,
    MEMORY_ATTENTION_INPUTS, MEMORY_ATTENTION_OUTPUTS,
    MEMORY_ENCODER_INPUTS, MEMORY_ENCODER_OUTPUTS, TRACK_DECODER_INPUTS, TRACK_DECODER_OUTPUTS,
    CompactMemoryAttentionGraph, MaskDownsampleGraph, MemoryAttentionGraph, MemoryEncoderGraph, TrackDecoderGraph, video_settings,
)

MEMORY_ENCODER_FILE = graph_file("memory_encoder").file
MEMORY_ATTENTION_FILE = graph_file("memory_attention").file
MEMORY_ATTENTION_FUSED_FILE = graph_file("memory_attention", "fused").file
MEMORY_ATTENTION_DEVICE_FILE = graph_file("memory_attention", "device").file
TRACK_DECODER_FILE = graph_file("track_decoder").file
MASK_DOWNSAMPLE_FILE = graph_file("mask_downsample").file
VIDEO_CONSTANTS_FILE = "video_constants.npz"

# Conditioning-frame slots of the memory attention. In a stream every object has exactly one conditioning
# frame (the frame of its first prompt; later prompts on tracked frames are corrections, which the
# reference keeps as non-conditioning frames), so one slot computes exactly what the reference does.
DEFAULT_COND_SLOTS = 1
# Largest differences tolerated against PyTorch before an export is refused, relative to the reference's magnitude
# (export/parity.py).
VIDEO_TOLERANCE = 1e-3


def _check(name: str, ours: np.ndarray, ref: np.ndarray, tol: float = VIDEO_TOLERANCE) -> float:
    return check_close(name, ours, ref, tol)


def _io_spec(session) -> dict[str, list[dict]]:
    def one(v) -> dict:
        return {"name": v.name, "shape": [d if isinstance(d, int) else str(d) for d in v.shape], "dtype": v.type}

    return {"inputs": [one(v) for v in session.get_inputs()], "outputs": [one(v) for v in session.get_outputs()]}


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(1,C,H,W) -> (HW,1,C), the reference's sequence-first layout."""
    return x.flatten(2).permute(2, 0, 1)


def export_video_graphs(
    model: torch.nn.Module,
    out_dir: str | Path,
    image_feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    opset: int = 17,
    cond_slots: int = DEFAULT_COND_SLOTS,
) -> dict[str, Any]:
    """Export the video graphs into out_dir, verify them against PyTorch, and return manifest entries.

    `image_feats`: the image encoder graph's features of one image (image_embed, high_res_feats_0,
    high_res_feats_1), used as realistic inputs. Returns {"graphs": {role: entry}, "video": settings,
    "verification": {name: max_abs_diff}}; each graph entry has file, sha256 and io like the image graphs.
    """
    import onnx
    import onnxruntime as ort


    if not (model.use_mask_input_as_output_without_sam and model.directly_add_no_mem_embed and model.num_maskmem > 0):
        raise ExportError("this SAM 2 config is not supported by the video export (all official configs are)")
    out = Path(out_dir)
    settings = video_settings(model)
    c, mem_dim = int(model.hidden_dim), int(model.mem_dim)
    feat = model.image_size // model.backbone_stride
    layout = SlotLayout(cond_slots, settings["num_maskmem"] - 1, cond_slots + settings["max_obj_ptrs_in_encoder"] - 1,
                        mem_dim, c, (feat, feat))
    image_embed, hr0, hr1 = (t.detach() for t in image_feats)
    low = 4 * feat
    g = torch.Generator().manual_seed(0)

    enc, attn = MemoryEncoderGraph(model).eval(), MemoryAttentionGraph(model, (feat, feat)).eval()
    attn_fused = MemoryAttentionGraph(model, (feat, feat), fused=True).eval()
    attn_device = CompactMemoryAttentionGraph(model, (feat, feat)).eval()
    dec, down = TrackDecoderGraph(model).eval(), MaskDownsampleGraph(model).eval()
    mask_logits = torch.randn(1, 1, low, low, generator=g) * 4
    enc_args = (image_embed, mask_logits, torch.tensor([[1.5]]), torch.tensor([1.0]))
    m = layout.mem_slots
    attn_args = (
        image_embed, torch.randn(m, mem_dim, feat, feat, generator=g), torch.zeros(m, dtype=torch.int64),
        torch.ones(m), torch.randn(layout.ptr_slots, c, generator=g), torch.rand(layout.ptr_slots, generator=g),
        torch.ones(layout.ptr_slots),
    )
    dec_args = (image_embed, hr0, hr1, torch.tensor([[[100.0, 200.0], [0.0, 0.0]]]), torch.tensor([[1.0, -1.0]]),
                mask_logits, torch.tensor([1.0]))
    paths = {
        "memory_encoder": out / MEMORY_ENCODER_FILE, "memory_attention": out / MEMORY_ATTENTION_FILE,
        "track_decoder": out / TRACK_DECODER_FILE, "mask_downsample": out / MASK_DOWNSAMPLE_FILE,
        "memory_attention.fused": out / MEMORY_ATTENTION_FUSED_FILE,
        "memory_attention.device": out / MEMORY_ATTENTION_DEVICE_FILE,
    }
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(enc, enc_args, str(paths["memory_encoder"]), input_names=MEMORY_ENCODER_INPUTS,
                          output_names=MEMORY_ENCODER_OUTPUTS, opset_version=opset, dynamo=False)
        torch.onnx.export(attn, attn_args, str(paths["memory_attention"]), input_names=MEMORY_ATTENTION_INPUTS,
                          output_names=MEMORY_ATTENTION_OUTPUTS, opset_version=opset, dynamo=False)
        torch.onnx.export(attn_fused, attn_args, str(paths["memory_attention.fused"]),
                          input_names=MEMORY_ATTENTION_INPUTS, output_names=MEMORY_ATTENTION_OUTPUTS,
                          opset_version=opset, custom_opsets={MHA_DOMAIN: 1}, dynamo=False)
        compact_args = tuple(a for a, name in zip(attn_args, MEMORY_ATTENTION_INPUTS) if name in MEMORY_ATTENTION_COMPACT_INPUTS)
        torch.onnx.export(attn_device, compact_args, str(paths["memory_attention.device"]),
                          input_names=MEMORY_ATTENTION_COMPACT_INPUTS, output_names=MEMORY_ATTENTION_OUTPUTS,
                          opset_version=opset, custom_opsets={MHA_DOMAIN: 1}, dynamo=False,
                          dynamic_axes=MEMORY_ATTENTION_COMPACT_AXES)
        torch.onnx.export(dec, dec_args, str(paths["track_decoder"]), input_names=TRACK_DECODER_INPUTS,
                          output_names=TRACK_DECODER_OUTPUTS, opset_version=opset, dynamo=False,
                          dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}})
        torch.onnx.export(down, (torch.zeros(1, 1, model.image_size, model.image_size),), str(paths["mask_downsample"]),
                          input_names=MASK_DOWNSAMPLE_INPUTS, output_names=MASK_DOWNSAMPLE_OUTPUTS,
                          opset_version=opset, dynamo=False)
    for key, path in paths.items():
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:
            raise ExportError(f"{path} fails onnx.checker: {exc}") from exc
        if CUDA in row(key).runs_on:
            refuse_cuda_problems(path)
    const_path = out / VIDEO_CONSTANTS_FILE
    with open(const_path, "wb") as f:
        np.savez(f, no_mem_embed=model.no_mem_embed.detach().reshape(-1).numpy().astype(np.float32),
                 no_obj_ptr=model.no_obj_ptr.detach().reshape(-1).numpy().astype(np.float32))

    sessions = {role: create_session(p, "onnxruntime-cpu") for role, p in paths.items()}
    diffs = _verify(model, sessions, settings, layout, image_embed, hr0, hr1, g)
    del ort
    graphs = {
        role: {"file": p.name, "sha256": sha256_file(p), "precision": "fp32", **_io_spec(sessions[role])}
        for role, p in paths.items() if "." not in role
    }
    graphs["memory_attention"]["variants"] = {
        row.variant: {
            "file": row.file, "sha256": sha256_file(paths[row.key]), "precision": row.precision,
            "derived_from_sha256": graphs["memory_attention"]["sha256"], "use": row.use, **_io_spec(sessions[row.key]),
        } for row in (graph_file("memory_attention", "fused"), graph_file("memory_attention", "device"))
    }
    graphs["memory_attention"]["slots"] = {
        "cond": layout.cond_slots, "recent": layout.recent_slots, "pointers": layout.ptr_slots,
        "use": "conditioning-frame slots (a cap: in a stream each object has exactly one), the num_maskmem - 1 "
               "most recent frames, object pointers; invalid slots are masked out (mem_valid / ptr_valid)",
    }
    graphs["video_constants"] = {"file": const_path.name, "sha256": sha256_file(const_path),
                                 "use": "no_mem_embed and no_obj_ptr (float32), for mask prompts"}
    return {"graphs": graphs, "video": settings, "verification": diffs}


def _verify(model, sessions, settings, layout: SlotLayout, image_embed, hr0, hr1, g) -> dict[str, float]:
    """Each graph against the reference method it replaces, on the runtime's own slot assembly and token choice."""
    diffs: dict[str, float] = {}
    feat = layout.feat_hw[0]
    low = 4 * feat
    raw = image_embed - model.no_mem_embed.reshape(1, -1, 1, 1)
    np_feats = {"image_embed": image_embed.numpy(), "high_res_feats_0": hr0.numpy(), "high_res_feats_1": hr1.numpy()}
    saved_binarize = model.binarize_mask_from_pts_for_mem_enc
    model.binarize_mask_from_pts_for_mem_enc = settings["binarize_mask_from_pts_for_mem_enc"]
    try:
        with torch.no_grad():
            # memory encoder: prompted (binarised) and tracked frames, object present and absent
            for binarize, score in ((1.0, 2.0), (0.0, 2.0), (0.0, -3.0)):
                logits = torch.randn(1, 1, low, low, generator=g) * 6
                hi = F.interpolate(logits, size=(model.image_size,) * 2, mode="bilinear", align_corners=False)
                ref, _ = model._encode_new_memory([_flat(raw)], [(feat, feat)], hi, torch.tensor([[score]]), bool(binarize))
                got = run(sessions["memory_encoder"], {
                    "image_embed": np_feats["image_embed"], "mask_logits": logits.numpy(),
                    "object_score_logits": np.array([[score]], np.float32), "binarize": np.array([binarize], np.float32),
                })[0]
                diffs[f"memory_encoder[binarize={int(binarize)},score={score:g}]"] = _check("memory_encoder", got, ref.numpy())

            # memory attention: a full bank (frame 20 of 100) and an early frame of a short clip (pointers clamped)
            pos = model.memory_encoder.position_encoding(torch.zeros(1, layout.mem_dim, feat, feat))
            curr_pos = model.image_encoder.neck.position_encoding(torch.zeros(1, layout.hidden_dim, feat, feat))
            for frame_idx, cond_t, non_cond_ts, num_frames in ((20, [0], range(1, 20), 100), (2, [0], [1], 4)):
                mem = ObjectMemory()
                ref_dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
                for t in [*cond_t, *non_cond_ts]:
                    feats_bf16 = (torch.randn(1, layout.mem_dim, feat, feat, generator=g)).to(torch.bfloat16)
                    ptr = torch.randn(1, layout.hidden_dim, generator=g)
                    entry = FrameOutput(np.zeros((0, 0), np.float32), ptr[0].numpy(), 1.0,
                                        round_bf16(feats_bf16.float()[0].numpy()))
                    key = "cond_frame_outputs" if t in cond_t else "non_cond_frame_outputs"
                    (mem.cond if t in cond_t else mem.non_cond)[t] = entry
                    ref_dict[key][t] = {"maskmem_features": feats_bf16, "maskmem_pos_enc": [pos], "obj_ptr": ptr}
                assert np.array_equal(entry.maskmem, feats_bf16.float()[0].numpy())  # the tracker's rounding is torch's
                ref = model._prepare_memory_conditioned_features(
                    frame_idx, False, [_flat(raw)], [_flat(curr_pos)], [(feat, feat)], ref_dict, num_frames
                )
                feeds = memory_feeds(mem, frame_idx, settings, layout, num_frames)
                for key in ("memory_attention", "memory_attention.fused", "memory_attention.device"):
                    given = compact_feeds(feeds) if key.endswith(".device") else feeds  # the valid slots only
                    got = run(sessions[key], {"image_embed": np_feats["image_embed"], **given})[0]
                    diffs[f"{key}[frame={frame_idx},num_frames={num_frames}]"] = _check(key, got, ref.numpy())

            # tracking decoder: a click on an initial frame, a box with a mask input, tracking (no prompt)
            cases = [
                (image_embed, [[300.0, 400.0]], [1], None, True),
                (raw, [[100.0, 120.0], [700.0, 800.0]], [2, 3], torch.randn(1, 1, low, low, generator=g) * 3, False),
                (raw + 0.1 * torch.randn(raw.shape, generator=g), [], [], None, False),
            ]
            for i, (pix, pts, labels, mask_in, is_init) in enumerate(cases):
                n = len(pts)
                point_inputs = None
                if n:
                    point_inputs = {"point_coords": torch.tensor([pts], dtype=torch.float32),
                                    "point_labels": torch.tensor([labels], dtype=torch.int32)}
                multimask = use_multimask(settings, is_init, n)
                _, _, _, ref_mask, _, ref_ptr, ref_score = model._forward_sam_heads(
                    pix, point_inputs, mask_in, [hr0, hr1], multimask
                )
                coords = np.array([pts + [[0.0, 0.0]]], np.float32) if n else NO_POINTS_COORDS
                labs = np.array([labels + [-1]], np.float32) if n else NO_POINTS_LABELS
                lr, iou, ptrs, score = run(sessions["track_decoder"], {
                    "pix_feat": pix.numpy(), "high_res_feats_0": np_feats["high_res_feats_0"],
                    "high_res_feats_1": np_feats["high_res_feats_1"], "point_coords": coords, "point_labels": labs,
                    "mask_input": (mask_in if mask_in is not None else torch.zeros(1, 1, low, low)).numpy(),
                    "has_mask_input": np.array([1.0 if mask_in is not None else 0.0], np.float32),
                })
                mask, ptr = select_track_output(settings, lr, iou, ptrs, multimask)
                diffs[f"track_decoder[{i}].low_res_mask"] = _check("track_decoder mask", mask, ref_mask[0, 0].numpy())
                diffs[f"track_decoder[{i}].obj_ptr"] = _check("track_decoder obj_ptr", ptr, ref_ptr[0].numpy())
                diffs[f"track_decoder[{i}].object_score"] = _check("track_decoder score", score, ref_score.numpy())

            binary = (torch.rand(1, 1, model.image_size, model.image_size, generator=g) > 0.5).float()
            got = run(sessions["mask_downsample"], {"mask": binary.numpy()})[0]
            diffs["mask_downsample"] = _check("mask_downsample", got, model.mask_downsample(binary).numpy())
    finally:
        model.binarize_mask_from_pts_for_mem_enc = saved_binarize
    return diffs
