"""One runner protocol for every backend: PyTorch, ONNX Runtime and TensorRT.

A runner maps named numpy inputs to named numpy outputs:

    with TorchRunner(model.encode_image, input_name="pixels") as run:
        out = run.infer({"pixels": batch})["embeddings"]   # (B, D) float32

`activate` loads whatever the backend needs, `deactivate` frees it; the context manager does
both. `provider` says what really runs the computation, so that a silent fallback is visible.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

import numpy as np

from engines.errors import EngineError

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Runner(Protocol):
    """What every backend implements."""

    name: str
    precision: str  # "fp32", "fp16" or "int8": what the runner computes in

    @property
    def provider(self) -> str: ...

    def activate(self) -> None: ...

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def deactivate(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class BaseRunner:
    """Context-manager plumbing and the active/inactive state check.

    `precision` is what the runner computes in ("fp32", "fp16", "int8"): a caller that must
    decide in fp32 can tell whether it needs a second runner.
    """

    name = "base"
    precision = "fp32"

    def __init__(self) -> None:
        self.active = False

    @property
    def provider(self) -> str:
        return self.name

    def activate(self) -> None:
        self.active = True

    def deactivate(self) -> None:
        self.active = False

    def __enter__(self) -> Self:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def _require_active(self) -> None:
        if not self.active:
            raise EngineError(f"{self.name} runner used before activate()")


class TorchRunner(BaseRunner):
    """PyTorch eager: calls `fn(tensor) -> tensor` under inference mode on the CPU or a GPU.

    Input `input_name` is a numpy array (float32 pixels of shape (B, 3, S, S) or int64 tokens of
    shape (B, L)); output "embeddings" is float32 of shape (B, D), not normalized.
    """

    name = "torch"

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        input_name: str,
        device: str = "cpu",
        output_name: str = "embeddings",
    ) -> None:
        super().__init__()
        self.fn = fn
        self.input_name = input_name
        self.output_name = output_name
        self.device = device

    @property
    def provider(self) -> str:
        return f"torch-{self.device}"

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        self._require_active()
        if self.input_name not in feeds:
            raise EngineError(f"torch runner expects input '{self.input_name}', got {sorted(feeds)}")
        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[self.input_name])).to(self.device)
            out = self.fn(tensor)
        return {self.output_name: out.float().cpu().numpy()}


# ONNX Runtime's providers, best first. ORT silently falls back to the next one that works,
# so the runner reads back what the session really uses.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(available: list[str], requested: tuple[str, ...] = PREFERRED_PROVIDERS) -> list[str]:
    """The requested providers that this onnxruntime build offers, in preference order."""
    chosen = [p for p in requested if p in available]
    if not chosen:
        raise EngineError(
            f"none of the requested ONNX Runtime providers {list(requested)} is available "
            f"(this build offers {available})",
            hint="pip install 'clip-audit[gpu]' for CUDA / TensorRT providers",
        )
    return chosen


def omp_threads() -> int:
    """OMP_NUM_THREADS when it is a positive integer, else 0 (ONNX Runtime's default: one
    thread per physical core). A process its scheduler gave N threads (a Ray actor, a Slurm
    task, a pytest-xdist worker) keeps ONNX Runtime to them, as PyTorch does; ORT itself ignores
    the variable, and its spinning threads on a shared core slow every process on it."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else 0


class OnnxRuntimeRunner(BaseRunner):
    """ONNX Runtime over one ONNX file; feeds and outputs are named as in the graph.

    The CLIP towers have one input and one output ("embeddings"); SAM's decoder has three and
    two. `provider` is the provider the session actually runs on, read from `get_providers()`
    after the session is created — not the one that was asked for.
    """

    name = "onnxruntime"

    def __init__(
        self,
        path: str,
        providers: tuple[str, ...] = PREFERRED_PROVIDERS,
        threads: int = 0,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        self.path = path
        self.precision = precision
        self.requested = providers
        self.threads = threads
        self.session: Any = None
        self._provider = "inactive"
        self.fallback_from: str | None = None

    @property
    def provider(self) -> str:
        return self._provider

    def activate(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineError("onnxruntime is not installed", hint="pip install onnxruntime") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads or omp_threads()
        providers = choose_providers(ort.get_available_providers(), self.requested)
        try:
            session = ort.InferenceSession(self.path, sess_options=options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise EngineError(f"ONNX Runtime cannot load {self.path}: {exc}") from exc
        self.session = session
        self._provider = session.get_providers()[0]
        # ORT drops a provider that fails to start (missing CUDA libraries, say) without a word.
        self.fallback_from = providers[0] if self._provider != providers[0] else None
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        super().activate()

    def deactivate(self) -> None:
        self.session = None
        super().deactivate()

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._require_active()
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise EngineError(f"ONNX model expects inputs {self.input_names}, got {sorted(feeds)}")
        outputs = self.session.run(None, {name: feeds[name] for name in self.input_names})
        return {name: np.asarray(out) for name, out in zip(self.output_names, outputs, strict=True)}


TENSORRT_INSTALL = (
    "pip install 'clip-audit[gpu]' (tensorrt wheels: --extra-index-url https://pypi.nvidia.com)"
)


def import_tensorrt() -> Any:
    """The `tensorrt` module, or EngineError (exit 3) with the line that installs it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineError("TensorRT is not installed", hint=TENSORRT_INSTALL) from exc
    return tensorrt


def require_cuda(what: str) -> None:
    """EngineError unless PyTorch sees a CUDA device (TensorRT runs its buffers through torch)."""
    import torch

    if not torch.cuda.is_available():
        raise EngineError(f"{what} needs a CUDA GPU and none is visible", hint="use --engine onnx or torch")


def require_gpu_provider(what: str, requested: tuple[str, ...] = PREFERRED_PROVIDERS) -> None:
    """EngineError unless ONNX Runtime offers a GPU provider to run `what` (an fp16 graph).

    ONNX Runtime's CPU provider crashes the whole process loading an fp16 graph (1.32), so this
    is checked before a session is ever created.
    """
    import onnxruntime as ort

    gpu = [p for p in requested if p != "CPUExecutionProvider" and p in ort.get_available_providers()]
    if not gpu:
        raise EngineError(
            f"{what} runs on CUDA / TensorRT providers only, and this onnxruntime "
            f"offers {ort.get_available_providers()}",
            hint="use fp32 or int8 on a CPU, or pip install 'clip-audit[gpu]'",
        )


class TensorRTRunner(BaseRunner):
    """A serialized TensorRT engine on the current GPU; feeds and outputs are named as in its graph.

    Inputs are numpy (float32 pixels (B, 3, S, S), int64 tokens (B, L), SAM's decoder's three
    float32 inputs). An engine with one input (the CLIP towers) runs batches larger than its
    optimization profile allows in chunks of its maximum batch; one with several (SAM's decoder)
    runs each call whole. Buffers are torch CUDA tensors, so no pycuda is needed.
    """

    name = "tensorrt"

    def __init__(self, path: str, precision: str = "fp32") -> None:
        super().__init__()
        self.path = path
        self.precision = precision
        self.engine: Any = None
        self.context: Any = None

    @property
    def provider(self) -> str:
        return "TensorRT" if self.active else "inactive"

    def activate(self) -> None:
        trt = import_tensorrt()
        require_cuda("the TensorRT runner")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with open(self.path, "rb") as fh:
            engine = runtime.deserialize_cuda_engine(fh.read())
        if engine is None:
            raise EngineError(f"TensorRT cannot deserialize {self.path} (built by another version?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        if not self.input_names or not self.output_names:
            raise EngineError(f"{self.path}: expected inputs and outputs, found {names}")
        # Profile 0's (min, opt, max) shapes of the first input; axis 0 is the batch.
        self.max_batch = int(engine.get_tensor_profile_shape(self.input_names[0], 0)[2][0])
        self.engine, self.context = engine, engine.create_execution_context()
        super().activate()

    def deactivate(self) -> None:
        self.engine = self.context = None
        super().deactivate()

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._require_active()
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise EngineError(f"TensorRT engine expects inputs {self.input_names}, got {sorted(feeds)}")
        if len(self.input_names) > 1:
            return self._run({name: feeds[name] for name in self.input_names})
        name = self.input_names[0]
        batch = feeds[name]
        chunks = [
            self._run({name: batch[i : i + self.max_batch]}) for i in range(0, len(batch), self.max_batch)
        ]
        return {out: np.concatenate([chunk[out] for chunk in chunks]) for out in self.output_names}

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        sources = {
            name: torch.from_numpy(np.ascontiguousarray(value)).cuda() for name, value in feeds.items()
        }
        for name, source in sources.items():
            self.context.set_input_shape(name, tuple(source.shape))
            self.context.set_tensor_address(name, source.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"TensorRT execution of {self.path} failed")
        stream.synchronize()
        return {name: output.cpu().numpy() for name, output in outputs.items()}
