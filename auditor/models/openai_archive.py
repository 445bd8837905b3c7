"""OpenAI's released `.pt` files (TorchScript archives), read as tensors only.

A TorchScript archive is a zip: `<name>/data.pkl` pickles the module tree, `<name>/data/<key>`
holds each tensor's bytes, `<name>/code/` holds the program. `torch.jit.load` would compile and
run that program; this reader never looks at it. It unpickles `data.pkl` with a restricted
unpickler that knows a handful of globals: every `__torch__.*` module class becomes a plain
record of its attributes, tensors are rebuilt from their storage files as `torch.load` does,
and any other global (`os.system`, `builtins.eval`, ...) is refused, as `weights_only` refuses
it. The module tree is then flattened into a state dict with OpenAI's key names, and the
architecture is inferred from the shapes (`openai_config`), as open_clip does for OpenAI weights.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor.errors import CheckpointError

if TYPE_CHECKING:
    import torch

# Entries of OpenAI's archives that are not weights (open_clip drops the same ones).
NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
_LIST_BUILDERS = (
    "build_intlist",
    "build_doublelist",
    "build_boollist",
    "build_tensorlist",
    "build_genericlist",
)


def is_torchscript(path: Path) -> bool:
    """Whether a zip checkpoint is a TorchScript archive (it has a code/ folder or constants.pkl)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in n or n.endswith("/constants.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


class _Record:
    """A TorchScript module or object, reduced to its pickled attributes (never its code)."""

    type_name = ""

    def __setstate__(self, state: Any) -> None:
        self.attributes = state if isinstance(state, dict) else {}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.root, self.path = archive, root, path
        self.records: dict[str, type[_Record]] = {}

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self.records:
                self.records[qualified] = type(name, (_Record,), {"type_name": qualified})
            return self.records[qualified]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return name  # only a dtype tag: persistent_load reads the bytes
        if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
            return list
        raise CheckpointError(
            f"refused {self.path}: its TorchScript data names {module}.{name}, which is not a tensor or "
            "a module record and could run code when loaded",
            hint="only archives of tensors are read; convert others to .safetensors in a sandbox",
        )

    def persistent_load(self, pid: Any) -> Any:
        import torch

        if not (
            isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in _STORAGE_DTYPES
        ):
            raise CheckpointError(f"{self.path}: unexpected storage reference in its TorchScript data")
        _, dtype_name, key, _location, _numel = pid
        dtype = getattr(torch, _STORAGE_DTYPES[dtype_name])
        try:
            raw = self.archive.read(f"{self.root}/data/{key}")
        except KeyError as exc:
            raise CheckpointError(f"{self.path}: tensor data '{key}' is missing from the archive") from exc
        untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    """The archive's tensors as a state dict with the module tree's key names (nothing is run)."""

    try:
        with zipfile.ZipFile(path) as archive:
            data_files = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(data_files) != 1:
                raise CheckpointError(f"{path}: a TorchScript archive without one data.pkl")
            root = data_files[0].split("/")[0]
            unpickler = _RestrictedUnpickler(archive.read(data_files[0]), archive, root, path)
            tree = unpickler.load()
    except CheckpointError:
        raise
    except (
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        AttributeError,
        KeyError,
        RuntimeError,
        OSError,
    ) as exc:
        raise CheckpointError(
            f"{path}: not a readable TorchScript archive ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(tree, _Record):
        raise CheckpointError(f"{path}: its TorchScript data is not a module")
    state: dict[str, torch.Tensor] = {}
    _flatten(tree, "", state, depth=0)
    state = {k: v for k, v in state.items() if k not in NON_WEIGHTS and not k.endswith("attn_mask")}
    if not state:
        raise CheckpointError(f"{path}: a TorchScript archive that holds no weights")
    return state


def _flatten(record: _Record, prefix: str, out: dict[str, Any], depth: int) -> None:
    import torch

    if depth > 64:
        raise CheckpointError("TorchScript module tree nested deeper than 64 levels")
    for name, value in getattr(record, "attributes", {}).items():
        if not isinstance(name, str) or name.startswith("_") or name == "training":
            continue
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _Record):
            _flatten(value, f"{prefix}{name}.", out, depth + 1)


def openai_config(state: dict[str, Any]) -> dict[str, Any]:
    """An open_clip model config inferred from an OpenAI-layout state dict's shapes.

    Heads are not in the weights: OpenAI's rule (width / 64) is assumed for both towers, and a
    model that breaks it needs `--arch`. Raises CheckpointError when the keys are not OpenAI's.
    """
    try:
        text_width = int(state["ln_final.weight"].shape[0])
        text = {
            "context_length": int(state["positional_embedding"].shape[0]),
            "vocab_size": int(state["token_embedding.weight"].shape[0]),
            "width": text_width,
            "heads": max(1, text_width // 64),
            "layers": _count(state, "transformer.resblocks."),
        }
        embed_dim = int(state["text_projection"].shape[1])
        if "visual.proj" in state:  # a ViT image tower
            width = int(state["visual.conv1.weight"].shape[0])
            patch = int(state["visual.conv1.weight"].shape[-1])
            grid = round((int(state["visual.positional_embedding"].shape[0]) - 1) ** 0.5)
            vision: dict[str, Any] = {
                "image_size": patch * grid,
                "patch_size": patch,
                "width": width,
                "layers": _count(state, "visual.transformer.resblocks."),
                "head_width": 64,
            }
        else:  # a ModifiedResNet image tower
            width = int(state["visual.layer1.0.conv1.weight"].shape[0])
            grid = round((int(state["visual.attnpool.positional_embedding"].shape[0]) - 1) ** 0.5)
            vision = {
                "image_size": grid * 32,
                "layers": [_count(state, f"visual.layer{i}.") for i in range(1, 5)],
                "width": width,
                "head_width": 64,
            }
    except (KeyError, IndexError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"not an OpenAI CLIP layout (missing or odd {exc})") from exc
    return {"embed_dim": embed_dim, "quick_gelu": True, "vision_cfg": vision, "text_cfg": text}


def _count(state: dict[str, Any], prefix: str) -> int:
    """How many numbered blocks sit under `prefix` (prefix + '0.', prefix + '1.', ...)."""
    numbers = {k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)}
    return len({n for n in numbers if n.isdigit()})
