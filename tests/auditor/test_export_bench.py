"""`clip-audit export` and `bench` on the tiny zoo model, and SAM's encoder/decoder export.

Parity is measured against PyTorch on the zoo's held-out scenes; SAM uses a tiny random-init SAM
of segment-anything's own modules, and its ONNX decoder is checked against SAM's own prompt
encoder and mask decoder (not against the wrapper that was exported).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from auditor.cli import run
from auditor.zoo.build import CONFIG_PATH, checkpoint_path

MODEL = [str(checkpoint_path("patch-random")), "--arch", str(CONFIG_PATH)]


def test_export_builds_checks_and_caches(test_data, tmp_path, capsys):
    args = ["export", *MODEL, "--engine-dir", str(tmp_path), "--data", str(test_data), "--format", "json"]
    assert run(args) == 0
    first = json.loads(capsys.readouterr().out)["engines"]
    assert [(e["part"], e["precision"], e["cache_hit"]) for e in first] == [
        ("image", "fp32", False),
        ("text", "fp32", False),
    ]
    image = first[0]
    assert image["provider"] == "CPUExecutionProvider"
    assert image["checks"]["image_max_abs_diff"] <= 1e-4 and image["checks"]["image_min_cosine"] >= 0.9999
    manifests = list(tmp_path.glob("*/manifest.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["key"]["precision"] == "fp32"
    assert run(args) == 0
    assert all(e["cache_hit"] for e in json.loads(capsys.readouterr().out)["engines"])


def test_export_int8_needs_data_and_agrees_with_fp32(test_data, tmp_path, capsys):
    base = ["export", *MODEL, "--engine-dir", str(tmp_path), "--precision", "int8"]
    assert run(base) == 2
    assert "pass --data" in capsys.readouterr().err
    assert run([*base, "--data", str(test_data), "--format", "json"]) == 0
    image, text = json.loads(capsys.readouterr().out)["engines"]
    assert image["checks"]["top1_agreement"] >= 0.99
    # Only the image tower is quantized: the text tower runs once per vocabulary.
    assert (image["precision"], text["precision"]) == ("int8", "fp32")
    assert text["checks"]["text_max_abs_diff"] <= 1e-4
    assert image["bytes"] < 0.6 * next(tmp_path.glob("*/image.onnx")).stat().st_size


def test_int8_keeps_the_patch_convolution_in_fp32(test_data, tmp_path):
    import onnx

    from auditor.models import load_model
    from auditor.runtime import build_engines

    engines = build_engines(load_model(*MODEL[::2]), "onnx", "int8", tmp_path)
    ops = {node.op_type for node in onnx.load(str(engines.files["image"])).graph.node}
    assert "ConvInteger" not in ops and "Conv" in ops
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}


def test_fp16_on_a_cpu_is_exit_3_before_anything_is_built(test_data, tmp_path, capsys):
    # ONNX Runtime's CPU provider crashes the process on an fp16 graph: it must never be opened.
    code = run(
        ["export", *MODEL, "--engine-dir", str(tmp_path), "--precision", "fp16", "--data", str(test_data)]
    )
    assert code == 3
    assert "CUDA / TensorRT providers only" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*fp16*"))


def test_bench_measures_every_engine_side_by_side(test_data, tmp_path, capsys):
    args = [
        "bench",
        *MODEL,
        "--engines",
        "onnx,onnx-int8",
        "--batch",
        "1,4",
        "--repeats",
        "3",
        "--oracle-images",
        "3",
    ]
    assert run([*args, "--data", str(test_data), "--engine-dir", str(tmp_path), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = {(r["engine"], r["batch"]): r for r in result["throughput"]}
    assert set(rows) == {(e, b) for e in ("torch", "onnx", "onnx-int8") for b in (1, 4)}
    for (engine, _), row in rows.items():
        assert row["images_per_second"] > 0
        assert row["provider"] == ("torch-cpu" if engine == "torch" else "CPUExecutionProvider")
        expected = rows[("torch", row["batch"])]["median_seconds"] / row["median_seconds"]
        assert row["speedup_vs_torch"] == pytest.approx(expected, rel=0.02)
        # Latency per call: the median is the same measurement as median_seconds.
        assert row["p50_ms"] == pytest.approx(1000 * row["median_seconds"], abs=0.02)
        assert row["p95_ms"] >= row["p50_ms"]
    # One image at a time: the classic oracle, and Algorithm 1 with its crops scored on each engine.
    per_image = {r["engine"]: r for r in result["per_image"]}
    assert set(per_image) == {"torch", "onnx", "onnx-int8"}
    for row in per_image.values():
        assert row["oracle"] == "classic on scikit-image" and row["images"] == 3
        assert (
            0 < row["oracle_p50_ms"] <= row["oracle_p95_ms"]
            and 0 < row["check_p50_ms"] <= row["check_p95_ms"]
        )
        assert row["scorings"] >= 1  # every test scene holds objects whose crops are scored
    assert result["checks"]["onnx"]["image_min_cosine"] >= 0.9999
    assert result["checks"]["onnx-int8"]["top1_agreement"] >= 0.99
    assert run([*args, "--engines", "onnx,warp-drive"]) == 2
    assert run([*args, "--batch", "0"]) == 2


@pytest.fixture(scope="module")
def tiny_sam():
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("segment_anything.modeling")
    torch.manual_seed(0)
    width = 32
    encoder = modeling.ImageEncoderViT(
        img_size=128,
        patch_size=16,
        embed_dim=48,
        depth=2,
        num_heads=2,
        out_chans=width,
        window_size=4,
        global_attn_indexes=(1,),
        use_rel_pos=True,
    )
    prompts = modeling.PromptEncoder(
        embed_dim=width, image_embedding_size=(8, 8), input_image_size=(128, 128), mask_in_chans=8
    )
    decoder = modeling.MaskDecoder(
        num_multimask_outputs=3,
        transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=width, mlp_dim=64, num_heads=2),
        transformer_dim=width,
        iou_head_depth=2,
        iou_head_hidden_dim=32,
    )
    return modeling.Sam(encoder, prompts, decoder).eval()


def test_sam_encoder_and_decoder_export_with_parity(tiny_sam, tmp_path, test_data):
    import torch
    from PIL import Image

    from auditor.oracle.sam_engine import build_sam_engines, check_sam_engines
    from engines.runners import OnnxRuntimeRunner

    engines = build_sam_engines(tiny_sam, "tiny", "0" * 64, tmp_path)
    assert set(engines.files) == {"encoder", "decoder", "parity"}
    image = np.asarray(Image.open(next(test_data.rglob("*.png"))).convert("RGB"))
    numbers, provider = check_sam_engines(tiny_sam, engines, image)
    assert provider == "CPUExecutionProvider"
    assert numbers["encoder_max_abs_diff"] <= 1e-4 and numbers["decoder_masks_min_cosine"] >= 0.9999
    # The ONNX decoder against SAM's own prompt encoder + mask decoder, with mixed labels and
    # a different number of prompts and points than it was exported with.
    embeddings = torch.randn(1, 32, 8, 8)
    coords = torch.rand(5, 2, 2) * 128
    labels = torch.tensor([[1.0, -1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, -1.0]])
    with torch.no_grad():
        sparse, dense = tiny_sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        masks, iou = tiny_sam.mask_decoder(
            image_embeddings=embeddings,
            image_pe=tiny_sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
    with OnnxRuntimeRunner(str(engines.files["decoder"])) as decoder:
        out = decoder.infer(
            {
                "image_embeddings": embeddings.numpy(),
                "point_coords": coords.numpy(),
                "point_labels": labels.numpy(),
            }
        )
    assert np.abs(out["masks"] - masks.numpy()).max() <= 1e-4
    assert np.abs(out["iou_predictions"] - iou.numpy()).max() <= 1e-4


def test_sam_parity_failure_is_an_error(tiny_sam, tmp_path):
    import torch

    from auditor.oracle.sam_engine import build_sam_engines, check_sam_engines
    from engines import EngineError

    engines = build_sam_engines(tiny_sam, "tiny", "1" * 64, tmp_path)
    with torch.no_grad():  # the engine no longer matches the model it is checked against
        tiny_sam.mask_decoder.iou_prediction_head.layers[-1].bias.add_(0.5)
    try:
        with pytest.raises(EngineError, match="SAM decoder iou: parity check failed"):
            check_sam_engines(tiny_sam, engines)
    finally:
        with torch.no_grad():
            tiny_sam.mask_decoder.iou_prediction_head.layers[-1].bias.sub_(0.5)


def test_sam_mask_resize_is_sams_postprocess(tiny_sam):
    import torch

    from auditor.oracle.sam_engine import resize_matrix

    low = torch.randn(4, 3, 32, 32)
    # Square, landscape and portrait images, upscaled and downscaled (input frame -> image).
    for input_size, image_size in (((128, 128), (64, 64)), ((128, 96), (224, 168)), ((96, 128), (60, 80))):
        expected = tiny_sam.postprocess_masks(low, input_size, image_size)
        rows = resize_matrix(32, 128, input_size[0], image_size[0])
        cols = resize_matrix(32, 128, input_size[1], image_size[1])
        assert torch.allclose(rows @ low @ cols.T, expected, atol=1e-5)


def test_sam_engine_masks_match_pytorch_sam(tiny_sam, tmp_path, test_data):
    import torch
    from PIL import Image
    from segment_anything import SamAutomaticMaskGenerator

    from auditor.oracle import tidy_segments
    from auditor.oracle.sam_engine import _runners, build_sam_engines, engine_predictor, stored_mask_parity

    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(test_data.rglob("*.png"))[:4]]
    engines = build_sam_engines(tiny_sam, "tiny", "2" * 64, tmp_path, images)
    built = stored_mask_parity(engines)  # measured when the pair was built, before it was cached
    assert built.images == 4 and built.prompts == 4 * 64
    assert built.mean_mask_iou >= 0.95 and built.torch_segments > 0
    assert abs(built.engine_segments - built.torch_segments) <= 0.05 * built.torch_segments
    # The scan's own generator settings (quality filters on), image by image.
    settings = {"points_per_side": 8, "pred_iou_thresh": 0.5, "stability_score_thresh": 0.5}
    reference = SamAutomaticMaskGenerator(tiny_sam, **settings)
    candidate = SamAutomaticMaskGenerator(tiny_sam, **settings)
    with _runners(engines.files) as (encoder, decoder), torch.inference_mode():
        candidate.predictor = engine_predictor(tiny_sam, encoder, decoder)
        for image in images:
            ours, theirs = ([m["segmentation"] for m in g.generate(image)] for g in (candidate, reference))
            assert len(ours) == len(theirs)
            for a, b in zip(tidy_segments(ours), tidy_segments(theirs), strict=True):
                assert (a.mask & b.mask).sum() >= 0.95 * (a.mask | b.mask).sum()


def test_sam_engines_that_change_masks_are_not_cached(tiny_sam, tmp_path):
    import torch

    from auditor.oracle import sam_engine
    from engines import EngineError

    export = sam_engine._export_sam

    flips = []

    def flip_masks():  # negates every mask's logits: a decoder that no longer matches
        flips.append(1)
        with torch.no_grad():
            for mlp in tiny_sam.mask_decoder.output_hypernetworks_mlps:
                mlp.layers[-1].weight.neg_()
                mlp.layers[-1].bias.neg_()

    def export_then_drift(sam, folder):  # the graphs are written, then the model moves away
        files = export(sam, folder)
        flip_masks()
        return files

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sam_engine, "_export_sam", export_then_drift)
            with pytest.raises(EngineError, match="mask parity check failed"):
                sam_engine.build_sam_engines(tiny_sam, "tiny", "3" * 64, tmp_path)
        assert not any(tmp_path.iterdir())  # nothing half-built or unchecked left in the cache
    finally:
        if len(flips) % 2:
            flip_masks()


def test_export_oracle_needs_sam_weights(tmp_path, capsys):
    assert run(["export", *MODEL, "--what", "oracle"]) == 2
    assert "--oracle-checkpoint" in capsys.readouterr().err


def test_eval_on_the_int8_image_tower_matches_fp32(test_data, tmp_path, capsys):
    args = ["eval", *MODEL[:1], str(test_data), *MODEL[1:], "--engine-dir", str(tmp_path), "--format", "json"]
    assert run([*args, "--engine", "torch"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert run([*args, "--engine", "onnx", "--precision", "int8"]) == 0
    int8 = json.loads(capsys.readouterr().out)
    assert abs(int8["clean_accuracy"] - fp32["clean_accuracy"]) <= 0.01
    assert run([*args, "--engine", "torch", "--precision", "int8"]) == 2
    assert "needs --engine onnx or tensorrt" in capsys.readouterr().err
