"""One runner protocol for every backend (PyTorch now; ONNX Runtime and TensorRT next).

A runner maps named numpy inputs to named numpy outputs:

    with TorchRunner(model.encode_image, input_name="pixels") as run:
        out = run.infer({"pixels": batch})["embeddings"]   # (B, D) float32

`activate` loads whatever the backend needs, `deactivate` frees it; the context manager does
both. `provider` says what really runs the computation, so that a silent fallback is visible.
"""

from __future__ import annotations

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

    @property
    def provider(self) -> str: ...

    def activate(self) -> None: ...

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def deactivate(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class BaseRunner:
    """Context-manager plumbing and the active/inactive state check."""

    name = "base"

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


class OnnxRuntimeRunner(BaseRunner):
    """ONNX Runtime over one ONNX file with one input and one output ("embeddings").

    `provider` is the provider the session actually runs on, read from `get_providers()` after
    the session is created — not the one that was asked for.
    """

    name = "onnxruntime"

    def __init__(self, path: str, providers: tuple[str, ...] = PREFERRED_PROVIDERS, threads: int = 0) -> None:
        super().__init__()
        self.path = path
        self.requested = providers
        self.threads = threads
        self.session: Any = None
        self._provider = "inactive"

    @property
    def provider(self) -> str:
        return self._provider

    def activate(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineError("onnxruntime is not installed", hint="pip install onnxruntime") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        providers = choose_providers(ort.get_available_providers(), self.requested)
        try:
            session = ort.InferenceSession(self.path, sess_options=options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise EngineError(f"ONNX Runtime cannot load {self.path}: {exc}") from exc
        self.session = session
        self._provider = session.get_providers()[0]
        self.input_name = session.get_inputs()[0].name
        super().activate()

    def deactivate(self) -> None:
        self.session = None
        super().deactivate()

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._require_active()
        if self.input_name not in feeds:
            raise EngineError(f"ONNX model expects input '{self.input_name}', got {sorted(feeds)}")
        outputs = self.session.run(None, {self.input_name: feeds[self.input_name]})
        return {"embeddings": np.asarray(outputs[0], dtype=np.float32)}
