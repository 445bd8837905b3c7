"""The TensorRT path: its logic with the library absent (a recording fake), and a real-GPU test.

`tensorrt` cannot be installed on the CPU machines; the fake below stands in for the parts of its
documented Python API that `build_tensorrt_engine` uses, so that the profile shapes, the fp16 flag,
the atomic write and the error messages are checked here. The `gpu` test builds and runs a real
engine where a CUDA GPU and tensorrt exist, and skips elsewhere.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from auditor.cli import run
from auditor.zoo.build import CONFIG_PATH, checkpoint_path
from engines import EngineError
from engines.export import build_tensorrt_engine, tensorrt_profile
from engines.runners import TENSORRT_INSTALL, TensorRTRunner, import_tensorrt


def test_profile_covers_batch_one_to_the_largest():
    assert tensorrt_profile((-1, 3, 224, 224), (1, 32)) == (
        (1, 3, 224, 224),
        (32, 3, 224, 224),
        (32, 3, 224, 224),
    )
    assert tensorrt_profile((-1, 77), (64, 8)) == ((1, 77), (64, 77), (64, 77))
    with pytest.raises(EngineError, match="only the batch axis"):
        tensorrt_profile((-1, 3, -1, -1), (1, 32))
    with pytest.raises(EngineError, match=">= 1"):
        tensorrt_profile((-1, 77), (0,))


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_absent_tensorrt_is_an_environment_error_with_the_install_line(no_tensorrt, tmp_path, capsys):
    with pytest.raises(EngineError, match="TensorRT is not installed") as info:
        import_tensorrt()
    assert info.value.hint == TENSORRT_INSTALL
    with pytest.raises(EngineError):
        TensorRTRunner(str(tmp_path / "x.engine")).activate()
    base = [str(checkpoint_path("patch-random")), "--arch", str(CONFIG_PATH)]
    assert run(["export", *base, "--engine", "tensorrt"]) == 3
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "clip-audit[gpu]" in err and "Traceback" not in err


def test_scan_with_tensorrt_engine_absent_is_exit_3(no_tensorrt, test_data, capsys):
    code = run(
        [
            "scan",
            str(checkpoint_path("patch-random")),
            str(test_data),
            "--arch",
            str(CONFIG_PATH),
            "--engine",
            "tensorrt",
        ]
    )
    assert code == 3
    assert "pip install" in capsys.readouterr().err


class FakeTensorRT(types.ModuleType):
    """Records what the builder asks of TensorRT's API; `parse_ok` / `build_ok` steer failures."""

    def __init__(
        self, input_shapes: dict[str, tuple[int, ...]], parse_ok: bool = True, build_ok: bool = True
    ):
        super().__init__("tensorrt")
        self.calls: dict[str, object] = {"flags": [], "shapes": {}}
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level: int) -> None:
                self.level = level

        class Tensor:
            def __init__(self, name: str, shape: tuple[int, ...]) -> None:
                self.name, self.shape = name, shape

        class Network:
            num_inputs = len(input_shapes)

            def get_input(self, i: int) -> Tensor:
                name = list(input_shapes)[i]
                return Tensor(name, input_shapes[name])

        class OnnxParser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network: Network, logger: Logger) -> None:
                pass

            def parse_from_file(self, path: str) -> bool:
                fake.calls["parsed"] = path
                return parse_ok

            def get_error(self, i: int) -> str:
                return "Unsupported operator: FancyOp"

        class Profile:
            def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:  # type: ignore[type-arg]
                fake.calls["shapes"][name] = (low, opt, high)  # type: ignore[index]

        class Config:
            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                fake.calls["workspace"] = size

            def set_flag(self, flag: str) -> None:
                fake.calls["flags"].append(flag)  # type: ignore[attr-defined]

            def add_optimization_profile(self, profile: Profile) -> None:
                fake.calls["profile"] = profile

        class Builder:
            def __init__(self, logger: Logger) -> None:
                pass

            def create_network(self, flags: int) -> Network:
                return Network()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
                return b"serialized-engine" if build_ok else None

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.BuilderFlag = types.SimpleNamespace(FP16="fp16")


@pytest.mark.parametrize("fp16", [True, False])
def test_builder_sets_profile_and_precision_and_writes_atomically(monkeypatch, tmp_path, fp16):
    fake = FakeTensorRT({"pixels": (-1, 3, 64, 64)})
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    target = tmp_path / "image.engine"
    assert build_tensorrt_engine(Path("image.onnx"), target, fp16=fp16, batches=(1, 64)) == target
    assert target.read_bytes() == b"serialized-engine"
    assert [p.name for p in tmp_path.iterdir()] == ["image.engine"]  # no temp file left behind
    assert fake.calls["flags"] == (["fp16"] if fp16 else [])
    assert fake.calls["shapes"] == {"pixels": ((1, 3, 64, 64), (64, 3, 64, 64), (64, 3, 64, 64))}
    assert fake.calls["parsed"] == "image.onnx"


def test_builder_failures_name_the_cause_and_leave_nothing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT({"tokens": (-1, 77)}, parse_ok=False))
    with pytest.raises(EngineError, match="Unsupported operator: FancyOp"):
        build_tensorrt_engine(Path("text.onnx"), tmp_path / "text.engine", fp16=True)
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT({"tokens": (-1, 77)}, build_ok=False))
    with pytest.raises(EngineError, match="could not build"):
        build_tensorrt_engine(Path("text.onnx"), tmp_path / "text.engine", fp16=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_real_tensorrt_engines_match_pytorch(test_data, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from auditor.data import open_dataset
    from auditor.models import load_model
    from auditor.runtime import build_engines, check_engines, make_probe

    loaded = load_model(checkpoint_path("patch-random"), CONFIG_PATH)
    probe = make_probe(loaded, open_dataset(test_data))
    for precision in ("fp32", "fp16"):
        engines = build_engines(loaded, "tensorrt", precision, tmp_path)
        image, text = engines.runners()
        with image, text:
            assert image.provider == "TensorRT"
            checks = check_engines(loaded, (image, text), precision, probe)
            big = image.infer({"pixels": np.concatenate([probe.pixels] * 2)})["embeddings"]
        assert checks.top1_agreement is not None and checks.top1_agreement >= 0.99
        assert big.shape[0] == 2 * len(probe.pixels)  # batches above the profile are chunked


def test_sam_decoder_profile_covers_the_generators_prompt_batches(monkeypatch, tmp_path):
    from engines.export import sam_decoder_profile

    inputs = {"image_embeddings": (1, 256, 64, 64), "point_coords": (-1, -1, 2), "point_labels": (-1, -1)}
    fake = FakeTensorRT(inputs)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    target = tmp_path / "sam-decoder.engine"
    build_tensorrt_engine(
        Path("sam-decoder.onnx"), target, False, shapes=sam_decoder_profile((1, 256, 64, 64))
    )
    shapes = fake.calls["shapes"]
    assert shapes["image_embeddings"] == ((1, 256, 64, 64),) * 3  # type: ignore[index]
    # segment-anything's automatic mask generator sends 1..64 prompts of one point each.
    assert shapes["point_coords"] == ((1, 1, 2), (64, 1, 2), (64, 1, 2))  # type: ignore[index]
    assert shapes["point_labels"] == ((1, 1), (64, 1), (64, 1))  # type: ignore[index]
    # Without explicit shapes, a graph with two dynamic axes is refused, not silently mis-profiled.
    with pytest.raises(EngineError, match="only the batch axis may be dynamic"):
        build_tensorrt_engine(Path("sam-decoder.onnx"), target, False)


def test_sam_oracle_on_tensorrt_absent_is_exit_3_before_any_export(no_tensorrt, tmp_path, monkeypatch):
    from auditor.oracle import sam_engine

    def exported(*_args):  # the expensive ONNX export must not start
        raise AssertionError("exported before TensorRT was found")

    monkeypatch.setattr(sam_engine, "build_sam_engines", exported)
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        sam_engine.open_engine_predictor(None, "vit_b", tmp_path / "sam.pth", "tensorrt", tmp_path, None)


@pytest.mark.gpu
def test_real_tensorrt_sam_matches_pytorch_sam(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("tensorrt")
    modeling = pytest.importorskip("segment_anything.modeling")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from auditor.oracle.sam_engine import build_sam_tensorrt, check_sam_engines, stored_mask_parity

    torch.manual_seed(0)
    sam = modeling.Sam(
        modeling.ImageEncoderViT(
            img_size=128, patch_size=16, embed_dim=48, depth=2, num_heads=2, out_chans=32
        ),
        modeling.PromptEncoder(
            embed_dim=32, image_embedding_size=(8, 8), input_image_size=(128, 128), mask_in_chans=8
        ),
        modeling.MaskDecoder(
            transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2),
            transformer_dim=32,
        ),
    ).eval()
    engines = build_sam_tensorrt(sam, "tiny", "4" * 64, tmp_path)
    assert engines.runtime == "tensorrt"
    masks = stored_mask_parity(engines)  # measured against PyTorch SAM before it was cached
    assert masks.passes() and masks.mean_mask_iou >= 0.95
    numbers, provider = check_sam_engines(sam, engines)
    assert provider == "TensorRT" and numbers["encoder_max_abs_diff"] <= 1e-4
