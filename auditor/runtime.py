"""Which runtime scores images and prompts: `--engine auto|onnx|torch`.

`onnx` exports both towers once per checkpoint (cached outside the source tree, see
`engines.cache`), validates them against PyTorch on real inputs from the data and the class
prompts (a failure is exit 3 with the numbers), and runs them with ONNX Runtime. `auto` is
`onnx` when onnxruntime is installed, else `torch`. PyTorch stays the reference and the repair.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np

from auditor.data import Dataset, iter_batches
from auditor.errors import InputError
from auditor.models import LoadedModel
from auditor.scoring import DEFAULT_TEMPLATES, torch_runners
from engines.runners import Runner

ENGINES = ("auto", "onnx", "torch")


def resolve_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise InputError(f"unknown --engine '{engine}'", hint="use " + ", ".join(ENGINES))
    if engine == "auto":
        return "onnx" if importlib.util.find_spec("onnxruntime") is not None else "torch"
    return engine


def make_runners(
    loaded: LoadedModel, dataset: Dataset, engine: str = "auto", engine_dir: Path | None = None
) -> tuple[Runner, Runner]:
    """(image runner, text runner) for `engine`, built or taken from the cache."""
    if resolve_engine(engine) == "torch":
        return torch_runners(loaded)
    from engines.cache import EngineCache, EngineKey, runtime_versions
    from engines.runners import OnnxRuntimeRunner

    key = EngineKey(
        checkpoint_sha256=loaded.sha256 or "",
        arch=loaded.arch.name,
        arch_config_sha256=hashlib.sha256(
            json.dumps(loaded.arch.model_cfg, sort_keys=True).encode()
        ).hexdigest(),
        precision="fp32",
        runtime="onnxruntime",
        versions=tuple(sorted(runtime_versions().items())),
    )
    files, _ = EngineCache(engine_dir).get_or_build(
        key, lambda folder: _export_validated(loaded, dataset, folder)
    )
    return OnnxRuntimeRunner(str(files["image"])), OnnxRuntimeRunner(str(files["text"]))


def _export_validated(loaded: LoadedModel, dataset: Dataset, folder: Path) -> dict[str, Path]:
    """Export both towers into `folder` and check them against PyTorch on real inputs."""
    import torch

    from engines.export import export_onnx, tower
    from engines.runners import OnnxRuntimeRunner
    from engines.validate import require_parity

    pixels = _sample_pixels(loaded, dataset)
    prompts = [t.format(c) for c in dataset.classes[:8] for t in DEFAULT_TEMPLATES[:2]]
    tokens = loaded.tokenizer(prompts).numpy()
    image = export_onnx(
        tower(loaded.model, "image"), torch.from_numpy(pixels[:2]), folder / "image.onnx", "pixels"
    )
    text = export_onnx(
        tower(loaded.model, "text"), torch.from_numpy(tokens[:2]), folder / "text.onnx", "tokens"
    )
    torch_image, torch_text = torch_runners(loaded)
    with (
        torch_image,
        torch_text,
        OnnxRuntimeRunner(str(image)) as onnx_image,
        OnnxRuntimeRunner(str(text)) as onnx_text,
    ):
        require_parity(
            "ONNX image tower",
            torch_image.infer({"pixels": pixels})["embeddings"],
            onnx_image.infer({"pixels": pixels})["embeddings"],
        )
        require_parity(
            "ONNX text tower",
            torch_text.infer({"tokens": tokens})["embeddings"],
            onnx_text.infer({"tokens": tokens})["embeddings"],
        )
    return {"image": image, "text": text}


def _sample_pixels(loaded: LoadedModel, dataset: Dataset, count: int = 8) -> np.ndarray:
    """The first `count` decodable images of the data, preprocessed: float32 (n, 3, S, S)."""
    indices = list(range(min(len(dataset.samples), 4 * count)))
    for batch in iter_batches(dataset, loaded.preprocess, count, indices=indices):
        return batch.pixels.numpy()
    size = loaded.arch.image_size
    return np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
