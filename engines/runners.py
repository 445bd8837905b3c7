"""One runner protocol for every backend (PyTorch now; ONNX Runtime and TensorRT next).

A runner maps named numpy inputs to named numpy outputs:

    with TorchRunner(model.encode_image, input_name="pixels") as run:
        out = run.infer({"pixels": batch})["embeddings"]   # (B, D) float32

`activate` loads whatever the backend needs, `deactivate` frees it; the context manager does
both. `provider` says what really runs the computation, so that a silent fallback is visible.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, Self, runtime_checkable

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
