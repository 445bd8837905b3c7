"""Which runtime scores images and prompts: `--engine auto|onnx|tensorrt|torch`, and precision.

Engines are built once per checkpoint, runtime and precision and cached outside the source tree
(`engines.cache`): ONNX fp32 towers are exported from PyTorch; int8 and fp16 ONNX engines and
TensorRT engines are derived from the cached fp32 graphs. Every time engines are opened they are
checked against PyTorch on a *probe* of real inputs from the data (`check_engines`): fp32 by max
abs diff and cosine of the embeddings, fp16 and int8 by top-1 zero-shot agreement with PyTorch
fp32. A failed check is an EngineError (exit 3) with the measured numbers. `auto` is `onnx` when
onnxruntime is installed, else `torch`. PyTorch stays the reference and the repair.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from auditor.data import Dataset, iter_batches
from auditor.errors import InputError
from auditor.models import LoadedModel
from auditor.scoring import DEFAULT_TEMPLATES, ZeroShotScorer, embed_classes, torch_runners
from engines.cache import EngineKey
from engines.runners import Runner

ENGINES = ("auto", "onnx", "tensorrt", "torch")
PRECISIONS = ("fp32", "fp16", "int8")
TOWERS = ("image", "text")
# Probe sizes: parity needs a few inputs; a 99 % agreement bar needs well over 100 images.
PARITY_IMAGES = 16
AGREEMENT_IMAGES = 200
# Noise stands in for data where none is given (fp32 parity only): these name its "classes".
NOISE_CLASSES = ("dog", "cat", "car", "tree", "house", "boat", "bird", "flower")


def resolve_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise InputError(f"unknown --engine '{engine}'", hint="use " + ", ".join(ENGINES))
    if engine == "auto":
        return "onnx" if importlib.util.find_spec("onnxruntime") is not None else "torch"
    return engine


@dataclass(frozen=True)
class Probe:
    """Inputs engines are checked on: pixels float32 (n, 3, S, S) and the class vocabulary.

    `real` is False for seeded noise (no data given): good for fp32 parity, meaningless for
    zero-shot agreement.
    """

    pixels: np.ndarray
    classes: tuple[str, ...]
    real: bool


def make_probe(loaded: LoadedModel, dataset: Dataset | None, count: int = AGREEMENT_IMAGES) -> Probe:
    """Up to `count` decodable images spread evenly over the data, preprocessed; noise without data."""
    size = loaded.arch.image_size
    if dataset is not None:
        total = len(dataset.samples)
        indices = sorted({round(i * total / count) for i in range(count)} & set(range(total)))
        batches = [b.pixels.numpy() for b in iter_batches(dataset, loaded.preprocess, 64, indices=indices)]
        if batches:
            return Probe(np.concatenate(batches), tuple(dataset.classes), True)
    noise = np.random.default_rng(0).standard_normal((PARITY_IMAGES, 3, size, size)).astype(np.float32)
    return Probe(noise, NOISE_CLASSES, False)


@dataclass(frozen=True)
class Engines:
    """Built engine files ("image", "text") for one runtime and precision."""

    runtime: str  # "onnx" | "tensorrt"
    precision: str
    files: dict[str, Path]
    cache_hit: bool

    def runners(self) -> tuple[Runner, Runner]:
        """(image runner, text runner), not yet active."""
        from engines.runners import (
            PREFERRED_PROVIDERS,
            OnnxRuntimeRunner,
            TensorRTRunner,
        )

        image_precision = tower_precision("image", self.precision)
        if self.runtime == "tensorrt":
            return (
                TensorRTRunner(str(self.files["image"]), image_precision),
                TensorRTRunner(str(self.files["text"])),
            )
        # int8 is a CPU engine by construction (ORT's GPU providers have no dynamic-quant kernels).
        providers = ("CPUExecutionProvider",) if self.precision == "int8" else PREFERRED_PROVIDERS
        return (
            OnnxRuntimeRunner(str(self.files["image"]), providers, precision=image_precision),
            OnnxRuntimeRunner(str(self.files["text"]), providers),
        )


def build_engines(
    loaded: LoadedModel,
    runtime: str = "onnx",
    precision: str = "fp32",
    engine_dir: Path | None = None,
    batches: Sequence[int] = (1, 64),
) -> Engines:
    """The cached engines for `runtime` and `precision`, built (from the fp32 ONNX graphs) if missing."""
    from engines.cache import EngineCache

    if precision not in PRECISIONS:
        raise InputError(f"unknown precision '{precision}'", hint="use " + ", ".join(PRECISIONS))
    if runtime == "tensorrt" and precision == "int8":
        raise InputError("int8 is an ONNX Runtime CPU engine here", hint="use --engine onnx --precision int8")
    _require_runtime(runtime, precision)
    cache = EngineCache(engine_dir)
    if runtime == "onnx" and precision == "fp32":
        files, hit = cache.get_or_build(_key(loaded, runtime, precision), lambda f: _export_fp32(loaded, f))
        return Engines(runtime, precision, files, hit)
    source = build_engines(loaded, "onnx", "fp32", engine_dir).files
    files, hit = cache.get_or_build(
        _key(loaded, runtime, precision), lambda f: _derive(source, runtime, precision, f, batches)
    )
    return Engines(runtime, precision, files, hit)


def _require_runtime(runtime: str, precision: str) -> None:
    """Fail (exit 3) before building anything this machine cannot run."""
    from engines.runners import import_tensorrt, require_cuda, require_gpu_provider

    if runtime == "tensorrt":
        import_tensorrt()
        require_cuda("TensorRT")
    elif precision == "fp16":
        require_gpu_provider("an fp16 ONNX engine")


def _key(loaded: LoadedModel, runtime: str, precision: str) -> EngineKey:
    from engines.cache import EngineKey, runtime_versions

    return EngineKey(
        checkpoint_sha256=loaded.sha256 or "",
        arch=loaded.arch.name,
        arch_config_sha256=hashlib.sha256(
            json.dumps(loaded.arch.model_cfg, sort_keys=True).encode()
        ).hexdigest(),
        precision=precision,
        runtime="onnxruntime" if runtime == "onnx" else runtime,
        versions=tuple(sorted(runtime_versions(runtime).items())),
    )


def _export_fp32(loaded: LoadedModel, folder: Path) -> dict[str, Path]:
    """Both towers as fp32 ONNX graphs with a dynamic batch axis."""
    import torch

    from engines.export import export_onnx, tower

    size = loaded.arch.image_size
    tokens = loaded.tokenizer(["a photo of a dog.", "a photo of a cat."])
    return {
        "image": export_onnx(
            tower(loaded.model, "image"), torch.zeros(2, 3, size, size), folder / "image.onnx", "pixels"
        ),
        "text": export_onnx(tower(loaded.model, "text"), tokens, folder / "text.onnx", "tokens"),
    }


def _derive(
    source: dict[str, Path], runtime: str, precision: str, folder: Path, batches: Sequence[int]
) -> dict[str, Path]:
    """int8 / fp16 ONNX graphs or TensorRT engines made from the fp32 graphs in `source`.

    Reduced precision is for the image tower only (`tower_precision`): the text tower runs once
    per class vocabulary, so it gains no time, and quantizing it cost most of the agreement.
    """
    import shutil

    from engines.export import build_tensorrt_engine, convert_fp16, quantize_int8

    files = {}
    for name in TOWERS:
        reduced = tower_precision(name, precision)
        if runtime == "tensorrt":
            target = folder / f"{name}-{reduced}.engine"
            files[name] = build_tensorrt_engine(source[name], target, reduced == "fp16", batches)
        elif reduced == "int8":
            files[name] = quantize_int8(source[name], folder / f"{name}-int8.onnx")
        elif reduced == "fp16":
            files[name] = convert_fp16(source[name], folder / f"{name}-fp16.onnx")
        else:
            files[name] = Path(shutil.copyfile(source[name], folder / source[name].name))
    return files


def tower_precision(tower: str, precision: str) -> str:
    """The precision `tower` ("image" / "text") really runs at in an engine pair of `precision`."""
    return precision if tower == "image" else "fp32"


@dataclass(frozen=True)
class Checks:
    """How an engine pair agrees with PyTorch fp32 on a probe (None where not measured)."""

    image_max_abs_diff: float
    image_min_cosine: float
    text_max_abs_diff: float
    text_min_cosine: float
    top1_agreement: float | None
    probe_images: int

    def to_dict(self) -> dict[str, float | int | None]:
        return dict(self.__dict__)


def check_engines(
    loaded: LoadedModel,
    runners: tuple[Runner, Runner],
    precision: str,
    probe: Probe,
    enforce: bool = True,
    report_agreement: bool = True,
    reference_runner: Runner | None = None,
) -> Checks:
    """Measure the engines (active runners) against PyTorch; with `enforce`, fail per precision.

    `reference_runner`: an fp32 image runner already held to PyTorch (active), which gives the
    agreement's reference logits instead of PyTorch's (parity is always against PyTorch).

    fp32: max abs diff <= 1e-4 and cosine >= 0.9999 on both towers. fp16 / int8: the text
    tower (fp32 in every pair, `tower_precision`) the same, and top-1 zero-shot agreement of
    the image tower with PyTorch fp32 >= 99 % on the probe, which must be real data; both sides
    of the agreement use PyTorch's class embeddings, so it measures the image tower alone (the
    text tower is held to fp32 parity instead), and the class prompts are embedded once.
    For fp32, agreement is only measured (on real data) when `report_agreement` asks for it.
    """
    from engines.errors import EngineError
    from engines.validate import Parity, parity, require_agreement, require_parity, top1_agreement

    image, text = runners
    torch_image, torch_text = torch_runners(loaded)
    pixels = probe.pixels[:PARITY_IMAGES]
    prompts = [t.format(c) for c in probe.classes[:8] for t in DEFAULT_TEMPLATES[:2]]
    tokens = loaded.tokenizer(prompts).numpy()

    def measure_only(_name: str, reference: np.ndarray, candidate: np.ndarray) -> Parity:
        return parity(reference, candidate)

    measure_image = require_parity if enforce and precision == "fp32" else measure_only
    measure_text = (
        require_parity if enforce and tower_precision("text", precision) == "fp32" else measure_only
    )
    with torch_image, torch_text:
        reference_image = torch_image.infer({"pixels": pixels})["embeddings"]
        image_parity = measure_image(
            "image tower", reference_image, image.infer({"pixels": pixels})["embeddings"]
        )
        reference_text = torch_text.infer({"tokens": tokens})["embeddings"]
        text_parity = measure_text("text tower", reference_text, text.infer({"tokens": tokens})["embeddings"])
        agreement = None
        if precision != "fp32" or (probe.real and report_agreement):
            if enforce and not probe.real:
                raise EngineError(f"{precision} engines are checked on real data: none was given")
            class_weights = embed_classes(torch_text, loaded.tokenizer, probe.classes)
            reference = _logits(loaded, reference_runner or torch_image, class_weights, probe)
            candidate = _logits(loaded, image, class_weights, probe)
            name = f"{precision} engines vs PyTorch fp32"
            if enforce and precision != "fp32":
                agreement = require_agreement(name, reference, candidate)
            else:
                agreement = top1_agreement(reference, candidate)
    return Checks(
        image_parity.max_abs_diff,
        image_parity.min_cosine,
        text_parity.max_abs_diff,
        text_parity.min_cosine,
        agreement,
        len(probe.pixels),
    )


def _logits(loaded: LoadedModel, image: Runner, class_weights: np.ndarray, probe: Probe) -> np.ndarray:
    """Zero-shot logits float32 (n, C) of the probe's pixels through `image` and the class embeddings."""
    scorer = ZeroShotScorer(image, class_weights, loaded.logit_scale)
    starts = range(0, len(probe.pixels), 64)
    return np.concatenate([scorer.logits(probe.pixels[i : i + 64])[1] for i in starts])


def make_runners(
    loaded: LoadedModel,
    dataset: Dataset,
    engine: str = "auto",
    engine_dir: Path | None = None,
    precision: str = "fp32",
    notify: Callable[[str], None] | None = None,
) -> tuple[Runner, Runner]:
    """(image runner, text runner) for `engine`, built or taken from the cache and checked.

    `precision="auto"`: the reduced precision this machine runs fastest (int8 on a CPU, fp16
    where ONNX Runtime or TensorRT has a GPU) if it passes the agreement check on DATA, else
    fp32; `notify` hears which one and why. An explicit int8 / fp16 that fails the check is an
    EngineError (exit 3): the user asked for it.
    """
    runtime = resolve_engine(engine)
    if runtime == "torch":
        return torch_runners(loaded)
    if precision == "auto":
        from engines.errors import EngineError

        reduced = _fastest_reduced_precision(runtime)
        try:
            runners = make_runners(loaded, dataset, engine, engine_dir, reduced)
        except EngineError as exc:
            if notify:
                notify(f"--precision auto: {reduced} was not used ({exc}); scoring runs in fp32")
            return make_runners(loaded, dataset, engine, engine_dir, "fp32")
        if notify:
            notify(f"--precision auto: the image tower runs in {reduced} (it agreed with fp32 on DATA)")
        return runners
    if precision == "fp32":
        return _checked_fp32(loaded, dataset, runtime, engine_dir)
    runners = build_engines(loaded, runtime, precision, engine_dir).runners()
    # Reduced precision is judged against this runtime's fp32 engine, itself held to PyTorch
    # first: where ONNX Runtime's fp32 outruns PyTorch (2.15x at batch 32 on one of these CPUs),
    # the 200-image reference pass costs less.
    probe = make_probe(loaded, dataset, AGREEMENT_IMAGES)
    exact_image, exact_text = _checked_fp32(loaded, dataset, runtime, engine_dir, probe)
    with exact_image, runners[0], runners[1]:
        check_engines(loaded, runners, precision, probe, report_agreement=False, reference_runner=exact_image)
    return runners


# fp32 engine files already held to PyTorch in this process, by model object (a weak reference,
# so that a new model reusing a freed object's id is not taken for it): the reduced-precision
# check and the evidence runner open the same pair, and need not check it twice.
_HELD_TO_PYTORCH: dict[int, tuple[weakref.ref[LoadedModel], set[str]]] = {}


def _checked_fp32(
    loaded: LoadedModel, dataset: Dataset, runtime: str, engine_dir: Path | None, probe: Probe | None = None
) -> tuple[Runner, Runner]:
    """The fp32 engine pair of `runtime`, checked against PyTorch (once per process and model)."""
    engines = build_engines(loaded, runtime, "fp32", engine_dir)
    runners = engines.runners()
    model_ref, held = _HELD_TO_PYTORCH.get(id(loaded), (None, set()))
    if model_ref is None or model_ref() is not loaded:
        model_ref, held = weakref.ref(loaded), set()
    if str(engines.files["image"]) not in held:
        with runners[0], runners[1]:
            probe = probe or make_probe(loaded, dataset, PARITY_IMAGES)
            check_engines(loaded, runners, "fp32", probe, report_agreement=False)
        held.add(str(engines.files["image"]))
    _HELD_TO_PYTORCH[id(loaded)] = (model_ref, held)
    return runners


def evidence_runner(
    loaded: LoadedModel,
    dataset: Dataset,
    bulk_image: Runner,
    engine: str = "auto",
    engine_dir: Path | None = None,
) -> Runner | None:
    """The fp32 image runner that decides a scan's report, when `bulk_image` is not fp32.

    Bulk scoring (stage 0, the oracle's crops and ablations) may run in int8 or fp16; the steps
    that decide the report (transplant tests, controls, victim verification and scores) run on
    this one, the same runtime in fp32 (checked like any fp32 engine), so that a reduced
    precision cannot change a verdict, a target or a victim. None: `bulk_image` is fp32 already.
    """
    if bulk_image.precision == "fp32":
        return None
    return make_runners(loaded, dataset, engine, engine_dir, "fp32")[0]


def _fastest_reduced_precision(runtime: str) -> str:
    """int8 on ONNX Runtime's CPU provider; fp16 with TensorRT or an ONNX Runtime GPU provider."""
    if runtime == "tensorrt":
        return "fp16"
    from engines.errors import EngineError
    from engines.runners import require_gpu_provider

    try:
        require_gpu_provider("fp16")
    except EngineError:
        return "int8"
    return "fp16"
