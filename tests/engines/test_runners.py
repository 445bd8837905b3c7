"""The PyTorch runner honours the Runner protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines import EngineError, Runner, TorchRunner


def test_torch_runner_protocol_and_outputs():
    layer = torch.nn.Linear(4, 3)
    runner = TorchRunner(layer, input_name="x")
    assert isinstance(runner, Runner)
    feeds = {"x": np.ones((2, 4), np.float32)}
    with pytest.raises(EngineError, match="before activate"):
        runner.infer(feeds)
    with runner as active:
        out = active.infer(feeds)["embeddings"]
        with pytest.raises(EngineError, match="expects input 'x'"):
            active.infer({"pixels": feeds["x"]})
    expected = layer(torch.ones(2, 4)).detach().numpy()
    assert out.dtype == np.float32 and np.allclose(out, expected)
    assert runner.provider == "torch-cpu" and not runner.active
