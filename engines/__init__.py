"""Export and runtimes for bulk scoring. Never imports `auditor` (dependencies run one way)."""

from engines.errors import EngineError
from engines.runners import Runner, TorchRunner

__all__ = ["EngineError", "Runner", "TorchRunner"]
