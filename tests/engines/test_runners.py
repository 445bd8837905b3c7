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


def test_onnx_runtime_keeps_to_the_threads_its_process_was_given(tmp_path, monkeypatch):
    # ORT ignores OMP_NUM_THREADS; the runner passes it on, so a worker given one core uses one.
    from engines import OnnxRuntimeRunner

    path = tmp_path / "linear.onnx"
    torch.onnx.export(torch.nn.Linear(4, 3), (torch.ones(1, 4),), str(path), dynamo=False)
    for value, expected in (("1", 1), ("3", 3), ("", 0), ("two", 0)):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        with OnnxRuntimeRunner(str(path)) as runner:
            assert runner.session.get_session_options().intra_op_num_threads == expected
