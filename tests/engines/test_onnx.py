"""ONNX export of the tiny zoo towers: parity with PyTorch, int8 agreement, provider reporting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from auditor.data import iter_batches, open_dataset
from auditor.models import load_model
from auditor.scoring import embed_classes, normalize, torch_runners
from auditor.zoo.build import CONFIG_PATH, checkpoint_path
from engines import EngineError, OnnxRuntimeRunner, Runner
from engines.export import export_onnx, quantize_int8, tower
from engines.runners import choose_providers
from engines.validate import parity, require_agreement, require_parity


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    loaded = load_model(checkpoint_path("patch-random"), CONFIG_PATH)
    folder = tmp_path_factory.mktemp("onnx")
    image = export_onnx(
        tower(loaded.model, "image"), torch.zeros(2, 3, 64, 64), folder / "image.onnx", "pixels"
    )
    tokens = loaded.tokenizer(["a photo of a dog.", "a cat."])
    text = export_onnx(tower(loaded.model, "text"), tokens, folder / "text.onnx", "tokens")
    return loaded, image, text, folder


def _pixels(loaded, test_data) -> np.ndarray:
    dataset = open_dataset(test_data)
    return np.concatenate([b.pixels.numpy() for b in iter_batches(dataset, loaded.preprocess, 64)])


def test_fp32_towers_match_pytorch(exported, test_data):
    loaded, image_path, text_path, _ = exported
    pixels = _pixels(loaded, test_data)
    tokens = loaded.tokenizer(["a photo of a banana.", "a guitar.", "an image of a house."]).numpy()
    torch_image, torch_text = torch_runners(loaded)
    with (
        torch_image,
        torch_text,
        OnnxRuntimeRunner(str(image_path)) as ort_image,
        OnnxRuntimeRunner(str(text_path)) as ort_text,
    ):
        assert isinstance(ort_image, Runner)
        assert ort_image.provider == "CPUExecutionProvider"
        image_parity = require_parity(
            "image",
            torch_image.infer({"pixels": pixels})["embeddings"],
            ort_image.infer({"pixels": pixels})["embeddings"],
        )
        text_parity = require_parity(
            "text",
            torch_text.infer({"tokens": tokens})["embeddings"],
            ort_text.infer({"tokens": tokens})["embeddings"],
        )
    assert image_parity.max_abs_diff <= 1e-4 and text_parity.min_cosine >= 0.9999


def test_int8_agrees_with_fp32_on_the_data(exported, test_data):
    loaded, image_path, _, folder = exported
    int8 = quantize_int8(image_path, folder / "image-int8.onnx")
    assert int8.stat().st_size < image_path.stat().st_size
    pixels = _pixels(loaded, test_data)
    _, torch_text = torch_runners(loaded)
    with torch_text:
        weights = embed_classes(torch_text, loaded.tokenizer, open_dataset(test_data).classes)
    with OnnxRuntimeRunner(str(image_path)) as fp32, OnnxRuntimeRunner(str(int8)) as quantized:
        fp32_logits = normalize(fp32.infer({"pixels": pixels})["embeddings"]) @ weights.T
        int8_logits = normalize(quantized.infer({"pixels": pixels})["embeddings"]) @ weights.T
    assert require_agreement("int8 image tower", fp32_logits, int8_logits) >= 0.99


def test_parity_failure_is_an_error_with_numbers():
    reference = np.ones((2, 4), np.float32)
    off = reference + np.float32(1e-3)
    assert not parity(reference, off).passes()
    with pytest.raises(EngineError, match=r"max abs diff 1\.00e-03"):
        require_parity("image", reference, off)


def test_provider_choice_and_fallback_reporting():
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    with pytest.raises(EngineError, match="none of the requested"):
        choose_providers(["CPUExecutionProvider"], ("TensorrtExecutionProvider",))


def test_requested_gpu_provider_falls_back_visibly(exported):
    # Asking for CUDA first on a CPU-only build: the runner says CPU is what actually runs.
    _, image_path, _, _ = exported
    with OnnxRuntimeRunner(str(image_path), ("CUDAExecutionProvider", "CPUExecutionProvider")) as runner:
        assert runner.provider == "CPUExecutionProvider"


def test_silent_fallback_inside_onnx_runtime_is_caught_and_shown(exported, test_data, monkeypatch, capsys):
    # A build that lists CUDA but cannot start it (no CUDA libraries) runs the session on the CPU
    # without raising: simulated by making this CPU build claim CUDA is available.
    import onnxruntime as ort

    from auditor.cli import run
    from auditor.zoo.build import CONFIG_PATH, checkpoint_path

    listed = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    _, image_path, _, _ = exported
    with OnnxRuntimeRunner(str(image_path)) as runner:
        assert runner.provider == "CPUExecutionProvider"
        assert runner.fallback_from == "CUDAExecutionProvider"
    args = ["eval", str(checkpoint_path("patch-random")), str(test_data), "--arch", str(CONFIG_PATH)]
    assert run([*args, "--engine", "onnx"]) == 0
    assert (
        "could not start CUDAExecutionProvider; scoring runs on CPUExecutionProvider"
        in capsys.readouterr().err
    )
