"""The tiny stand-in model directory the runtime tests use: SAM 2's names, shapes and manifest, loaded like an export."""

from __future__ import annotations

import numpy as np

from sam2rt.manifest import Manifest, sha256_file


def test_tiny_dir_has_the_exports_interface(tiny_model_dir, model_dir):
    """Same graph roles, variants, input/output names and shapes as a real export's manifest."""
    tiny, real = Manifest.load(tiny_model_dir), Manifest.load(model_dir)
    assert tiny.random_weights and tiny.model["synthetic"] is True
    def same_interface(a: list[dict], b: list[dict]) -> bool:
        """Same names and ranks; equal sizes where both record a fixed size (inferred dims get odd names)."""
        return [v["name"] for v in a] == [v["name"] for v in b] and all(
            len(x["shape"]) == len(y["shape"])
            and all(p == q for p, q in zip(x["shape"], y["shape"]) if isinstance(p, int) and isinstance(q, int))
            for x, y in zip(a, b))

    for role in ("encoder", "decoder"):
        for key in ("inputs", "outputs"):
            assert same_interface(tiny.graph(role)[key], real.graph(role)[key]), (role, key)
        assert set(tiny.graph(role).get("variants", {})) <= set(real.graph(role).get("variants", {}))
    enc = {v["name"]: v["shape"] for v in tiny.graph("encoder")["outputs"]}
    assert enc == {"image_embed": [1, 256, 64, 64], "high_res_feats_0": [1, 32, 256, 256], "high_res_feats_1": [1, 64, 128, 128]}
    for name in ("nomask", "prep", "fast", "fast_device"):
        for key in ("inputs", "outputs"):
            assert [v["name"] for v in tiny.variant("decoder", name)[key]] == \
                   [v["name"] for v in real.variant("decoder", name)[key]], (name, key)
    for role in ("encoder", "decoder"):
        for entry in [tiny.graph(role), *tiny.graph(role).get("variants", {}).values()]:
            assert sha256_file(tiny_model_dir / entry["file"]) == entry["sha256"]


def test_tiny_graphs_depend_on_every_prompt_input(tiny_model):
    """Masks follow the points, labels and mask_input; scores follow the negative points."""
    from sam2rt.runtime import Prompt

    emb = tiny_model.embed(np.full((200, 300, 3), 90, np.uint8))
    left = tiny_model.decode(emb, Prompt(points=np.array([[60.0, 100.0]]), labels=np.array([1])))
    right = tiny_model.decode(emb, Prompt(points=np.array([[240.0, 100.0]]), labels=np.array([1])))
    assert left.masks[0, :, 100, 60].all() and not left.masks[0, :, 100, 240].any()
    assert right.masks[0, :, 100, 240].all() and not right.masks[0, :, 100, 60].any()
    with_neg = tiny_model.decode(emb, Prompt(points=np.array([[60.0, 100.0], [240.0, 100.0]]), labels=np.array([1, 0])))
    np.testing.assert_array_equal(with_neg.masks, left.masks)  # the negative point moves no blob ...
    assert (with_neg.scores < left.scores).all()  # ... but lowers the predicted IoU
    box = tiny_model.decode(emb, Prompt(box=np.array([200.0, 50.0, 280.0, 150.0])))
    assert box.masks[0, :, 100, 240].all()
    prior = np.full((256, 256), -20.0, np.float32)
    masked = tiny_model.decode(emb, Prompt(points=np.array([[60.0, 100.0]]), labels=np.array([1]), mask_input=prior))
    assert not masked.masks.any()


def test_tiny_graphs_are_rebuilt_identically(tmp_path, tiny_model_dir):
    from sam2rt.export.tiny_model import build_tiny_model_dir

    again = build_tiny_model_dir(tmp_path / "again")
    first = Manifest.load(tiny_model_dir)
    for role in ("encoder", "decoder"):
        assert again.graph(role)["sha256"] == first.graph(role)["sha256"]
