"""Export and runtimes for bulk scoring. Never imports `auditor` (dependencies run one way)."""

from engines.errors import EngineError
from engines.runners import OnnxRuntimeRunner, Runner, TensorRTRunner, TorchRunner

__all__ = ["EngineError", "OnnxRuntimeRunner", "Runner", "TensorRTRunner", "TorchRunner"]
