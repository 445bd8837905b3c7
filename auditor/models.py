"""Checkpoint + architecture -> CLIP model, preprocessing and tokenizer, loaded safely.

A checkpoint under audit is untrusted. It is read as tensors only: `.safetensors`, or a torch
file through `torch.load(weights_only=True)`, which refuses any pickled object that is not a
tensor or a plain container. The format is sniffed from the file's bytes, not its extension.

The architecture is an open_clip model name (`ViT-B-32`) or a path to an open_clip config JSON
(`{"embed_dim", "vision_cfg", "text_cfg"}`, optionally wrapped as `{"model_cfg": ...}` beside a
`preprocess_cfg`). Heavy imports (torch, open_clip) happen inside functions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor.errors import CheckpointError, EnvironmentProblem, InputError
from engines.cache import file_sha256 as sha256_file

if TYPE_CHECKING:
    import torch
    from PIL import Image

# Never reach a model hub: the tool only loads the files it is given (DESIGN §2).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Keys that OpenAI's released state dicts carry beside the weights.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ArchSpec:
    """A resolved architecture: its display name, open_clip model config and preprocessing."""

    name: str
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        size = self.model_cfg["vision_cfg"].get("image_size", 224)
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def context_length(self) -> int:
        return int(self.model_cfg["text_cfg"].get("context_length", 77))


@dataclass
class LoadedModel:
    """A CLIP model ready for inference, with what it needs around it.

    `preprocess` maps a PIL image to a float32 tensor of shape (3, S, S); `tokenizer` maps a list
    of n strings to an int64 tensor of shape (n, context_length).
    """

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    arch: ArchSpec
    path: Path | None = None
    sha256: str | None = None
    checkpoint_format: str = "safetensors"  # or "torch"
    wrapped_state_dict: bool = False  # saved as {"state_dict": ...}
    key_prefix: str = ""  # e.g. "module." as DataParallel / CleanCLIP save it
    half_precision: bool = False  # the checkpoint stored its floating weights as fp16

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())  # type: ignore[operator]


def resolve_arch(arch: str | os.PathLike[str]) -> ArchSpec:
    """Resolve `--arch`: an open_clip model name or a path to a model config JSON."""
    path = Path(arch)
    if path.suffix.lower() == ".json" or path.is_file():
        return _arch_from_json(path)
    import open_clip

    cfg = open_clip.get_model_config(str(arch))
    if cfg is None:
        known = open_clip.list_models()
        close = [m for m in known if str(arch).lower().replace("/", "-") in m.lower()][:5]
        raise InputError(
            f"unknown --arch '{arch}': not an open_clip model name nor a config JSON file",
            hint=f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()",
        )
    return ArchSpec(name=str(arch), model_cfg=dict(cfg), preprocess_cfg={})


def _arch_from_json(path: Path) -> ArchSpec:
    if not path.is_file():
        raise InputError(f"--arch config file not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"--arch {path} is not a readable JSON file: {exc}") from exc
    if not isinstance(raw, dict):
        raise InputError(f"--arch {path}: expected a JSON object")
    model_cfg = raw.get("model_cfg", raw)
    if not isinstance(model_cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_cfg):
        raise InputError(f"--arch {path}: an open_clip model config needs embed_dim, vision_cfg and text_cfg")
    return ArchSpec(name=path.stem, model_cfg=model_cfg, preprocess_cfg=raw.get("preprocess_cfg", {}))


def build_model(arch: ArchSpec) -> torch.nn.Module:
    """A randomly initialised CLIP of the given architecture, in eval mode (float32, CPU)."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = dict(arch.model_cfg)
    if "multimodal_cfg" in cfg:
        raise InputError(f"--arch {arch.name}: CoCa models are not supported (no contrastive head)")
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    try:
        model = (CustomTextCLIP if custom_text else CLIP)(**cfg)
    except (TypeError, ValueError, KeyError) as exc:
        raise InputError(f"--arch {arch.name}: invalid model config ({exc})") from exc
    except (ImportError, OSError) as exc:  # hf / timm towers that would need a download
        raise EnvironmentProblem(f"--arch {arch.name} cannot be built offline: {exc}") from exc
    return model.eval()


def make_preprocess(arch: ArchSpec) -> Callable[[Image.Image], torch.Tensor]:
    """Eval-time image transform as open_clip defines it for this config."""
    import open_clip

    vision = arch.model_cfg["vision_cfg"]
    pp = arch.preprocess_cfg
    return open_clip.image_transform(
        pp.get("size", arch.image_size),
        is_train=False,
        mean=tuple(pp.get("mean", vision.get("image_mean", _OPENAI_MEAN))),
        std=tuple(pp.get("std", vision.get("image_std", _OPENAI_STD))),
        resize_mode=pp.get("resize_mode", vision.get("image_resize_mode")),
        interpolation=pp.get("interpolation", vision.get("image_interpolation")),
    )


def make_tokenizer(arch: ArchSpec) -> Callable[[list[str]], torch.Tensor]:
    """The tokenizer the config names: open_clip's BPE tokenizer unless an HF one is named."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    text = arch.model_cfg["text_cfg"]
    if "hf_tokenizer_name" in text:
        try:
            return HFTokenizer(text["hf_tokenizer_name"], context_length=arch.context_length)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds offline
            raise EnvironmentProblem(
                f"tokenizer '{text['hf_tokenizer_name']}' is not available offline: {exc}"
            ) from exc
    return SimpleTokenizer(context_length=arch.context_length)


def sniff_format(path: Path) -> str:
    """'safetensors', 'zip' (torch >= 1.6 save), or 'pickle' (legacy torch save), from bytes."""
    with path.open("rb") as fh:
        head = fh.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    return "pickle"


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str, bool, str]:
    """Read tensors from a checkpoint without executing anything in it.

    Returns (state_dict, format, wrapped, prefix): format is "safetensors" or "torch";
    `wrapped` is True when the file held {"state_dict": ...}; `prefix` is a stripped "module.".
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    kind = sniff_format(path)
    if kind == "safetensors":
        raw: Any = _read_safetensors(path)
    else:
        raw = _read_torch(path, kind)
    wrapped = False
    if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw, wrapped = raw["state_dict"], True
    import torch

    if not isinstance(raw, Mapping) or not raw:
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    tensors = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    prefix = "module." if all(k.startswith("module.") for k in tensors) else ""
    state = {k[len(prefix) :]: v for k, v in tensors.items()}
    return state, "safetensors" if kind == "safetensors" else "torch", wrapped, prefix


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors file ({exc})") from exc


def _read_torch(path: Path, kind: str) -> Any:
    import pickle

    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "jit" in str(exc).lower() or "torchscript" in str(exc).lower():
            raise CheckpointError(
                f"{path}: a TorchScript archive, not a state dict",
                hint="save model.state_dict() with torch.save, or as .safetensors",
            ) from exc
        if kind == "zip" or "weights_only" in str(exc) or "global" in str(exc).lower():
            raise CheckpointError(
                f"refused {path}: it contains pickled Python objects other than tensors, which "
                "could run code when loaded",
                hint="convert it to .safetensors in a sandbox you trust",
            ) from exc
        raise CheckpointError(f"{path}: not a readable checkpoint ({_short(exc)})") from exc
    # Random or damaged bytes make torch's restricted unpickler fail in many ways (IndexError
    # from its stack among them, about 1 file in 12 of random bytes): all mean "not a checkpoint".
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({_short(exc)})") from exc


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def load_model(checkpoint: str | os.PathLike[str], arch: str | os.PathLike[str]) -> LoadedModel:
    """Load `checkpoint` into the `arch` architecture (float32, CPU, eval mode)."""
    spec = resolve_arch(arch)
    path = Path(checkpoint)
    state, fmt, wrapped, prefix = read_state_dict(path)
    model = build_model(spec)
    half = any(v.dtype.is_floating_point and v.element_size() == 2 for v in state.values())
    load_weights(model, state, spec.name, path)
    return LoadedModel(
        model=model,
        preprocess=make_preprocess(spec),
        tokenizer=make_tokenizer(spec),
        arch=spec,
        path=path,
        sha256=sha256_file(path),
        checkpoint_format=fmt,
        wrapped_state_dict=wrapped,
        key_prefix=prefix,
        half_precision=half,
    )


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], arch_name: str, path: Path) -> None:
    """Copy `state` into `model` (casting fp16/bf16 to the model's dtype) or explain the misfit."""
    state = {k: v for k, v in state.items() if k not in _OPENAI_EXTRA_KEYS}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"{path} does not fit --arch {arch_name}: " + _describe_misfit(missing, unexpected, wrong_shape),
            hint="check --arch: pass the model name or config JSON this checkpoint was trained with",
        )
    cast = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(cast, strict=True)
    model.eval()


def _describe_misfit(missing: list[str], unexpected: list[str], wrong_shape: list[str]) -> str:
    def few(names: list[str]) -> str:
        more = f", … (+{len(names) - 3})" if len(names) > 3 else ""
        return ", ".join(names[:3]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({few(unexpected)})")
    if wrong_shape:
        parts.append(f"{len(wrong_shape)} shape mismatches ({few(wrong_shape)})")
    return "; ".join(parts)


def save_checkpoint(
    model: torch.nn.Module,
    path: Path,
    *,
    checkpoint_format: str = "safetensors",
    wrapped: bool = False,
    prefix: str = "",
    half: bool = False,
) -> None:
    """Write the model's weights atomically (temp file + rename) in the given format."""
    import torch

    state = {
        prefix + k: (v.half() if half and v.is_floating_point() else v).detach().contiguous()
        for k, v in model.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if checkpoint_format == "safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp))
        else:
            torch.save({"state_dict": state} if wrapped else state, str(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain new file would be, not the writer's private mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
