"""Export and runtimes for bulk scoring. Never imports `auditor` (dependencies run one way)."""

from engines.errors import EngineError
from engines.runners import OnnxRuntimeRunner, Runner, TorchRunner

__all__ = ["EngineError", "OnnxRuntimeRunner", "Runner", "TorchRunner"]
