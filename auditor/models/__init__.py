"""Checkpoint + architecture -> CLIP model, preprocessing and tokenizer, loaded safely.

A checkpoint under audit is untrusted. It is read as tensors only, whatever its form
(`read_checkpoint`; the table is in docs/checkpoints.md):
- a state dict: `.safetensors`, or a torch file through `torch.load(weights_only=True)`, which
  refuses any pickled object that is not a tensor or a plain container;
- an OpenAI TorchScript archive (`openai_archive`): its tensors through a restricted unpickler,
  its code never compiled or run; the architecture inferred from the shapes;
- a Hugging Face CLIPModel folder (`hf_clip`): config.json + weights, converted to open_clip;
- an open_clip hub folder: open_clip_config.json + weights.
The format is sniffed from the bytes and the folder's files, not from names.

The architecture is `--arch` (an open_clip model name, an open_clip config JSON, optionally
wrapped as `{"model_cfg": ...}`, or a Hugging Face CLIP config.json) or, when the checkpoint
carries it, the checkpoint's own; both given and different is an error naming both. Sizes are
checked before anything is allocated. Heavy imports (torch, open_clip) happen inside functions.
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


# Bounds no CLIP comes near: a config beyond them is refused before any memory is allocated.
MAX_WIDTH, MAX_LAYERS, MAX_IMAGE_SIZE, MAX_VOCAB, MAX_CONTEXT = 16_384, 512, 4_096, 1_000_000, 8_192
MAX_PARAMETERS = 20_000_000_000


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint holds, read as tensors: OpenAI/open_clip-layout weights, and more.

    `source_format`: "safetensors" | "torch" (state dicts), "openai-archive", "hf-folder",
    "open_clip-folder"; `model_cfg` / `preprocess_cfg`: the architecture it carries (None for a
    plain state dict); `files`: what its SHA-256 covers.
    """

    state: dict[str, Any]
    source_format: str
    wrapped: bool = False
    prefix: str = ""
    model_cfg: dict[str, Any] | None = None
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    files: tuple[Path, ...] = ()


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
    source_format: str = "safetensors"  # see Checkpoint.source_format
    arch_source: str = "--arch"  # or "checkpoint": where the architecture came from

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
    from auditor.files import read_json_object

    raw = read_json_object(path, "--arch")
    from auditor.models.hf_clip import hf_config_to_open_clip, is_hf_clip_config

    if is_hf_clip_config(raw):
        return ArchSpec(name=path.parent.name or path.stem, model_cfg=hf_config_to_open_clip(raw, path))
    model_cfg = raw.get("model_cfg", raw)
    if not isinstance(model_cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_cfg):
        raise InputError(f"--arch {path}: an open_clip model config needs embed_dim, vision_cfg and text_cfg")
    return ArchSpec(name=path.stem, model_cfg=model_cfg, preprocess_cfg=raw.get("preprocess_cfg", {}))


def check_sizes(arch: ArchSpec) -> None:
    """Refuse (exit 2) a config whose sizes no CLIP has, before a byte is allocated for it."""
    vision, text = arch.model_cfg.get("vision_cfg") or {}, arch.model_cfg.get("text_cfg") or {}

    def number(value: Any, name: str, limit: int) -> int:
        values = value if isinstance(value, list | tuple) else [value]
        if not all(isinstance(v, int | float) and 0 <= v <= limit for v in values):
            raise InputError(f"--arch {arch.name}: {name} = {value!r} is out of range (at most {limit:,})")
        return int(sum(values))

    width = number(vision.get("width", 768), "vision_cfg.width", MAX_WIDTH)
    layers = number(vision.get("layers", 12), "vision_cfg.layers", MAX_LAYERS)
    number(vision.get("image_size", 224), "vision_cfg.image_size", MAX_IMAGE_SIZE)
    text_width = number(text.get("width", 512), "text_cfg.width", MAX_WIDTH)
    text_layers = number(text.get("layers", 12), "text_cfg.layers", MAX_LAYERS)
    vocab = number(text.get("vocab_size", 49408), "text_cfg.vocab_size", MAX_VOCAB)
    number(text.get("context_length", 77), "text_cfg.context_length", MAX_CONTEXT)
    number(arch.model_cfg.get("embed_dim", 512), "embed_dim", MAX_WIDTH)
    # ~12 width^2 per transformer block (attention + 4x MLP), plus the token embedding.
    estimate = 12 * (width**2 * layers * (32 if isinstance(vision.get("layers"), list) else 1))
    estimate += 12 * text_width**2 * text_layers + vocab * text_width
    if estimate > MAX_PARAMETERS:
        raise InputError(f"--arch {arch.name}: about {estimate:.1e} parameters, far beyond any CLIP")


def build_model(arch: ArchSpec) -> torch.nn.Module:
    """A randomly initialised CLIP of the given architecture, in eval mode (float32, CPU)."""
    from open_clip.model import CLIP, CustomTextCLIP

    check_sizes(arch)
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


def read_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint file or folder as tensors, in open_clip's (= OpenAI's) key names."""
    if path.is_dir():
        return _read_folder(path)
    if sniff_format(path) == "zip":
        from auditor.models.openai_archive import is_torchscript, openai_config, read_torchscript

        if is_torchscript(path):
            state = read_torchscript(path)
            return Checkpoint(state, "openai-archive", model_cfg=openai_config(state), files=(path,))
    state, fmt, wrapped, prefix = read_state_dict(path)
    from auditor.models.hf_clip import convert_hf_state_dict, is_hf_state_dict

    if is_hf_state_dict(state):  # a CLIPModel's weights alone: --arch names its config.json
        return Checkpoint(convert_hf_state_dict(state), "hf-" + fmt, files=(path,))
    return Checkpoint(state, fmt, wrapped, prefix, files=(path,))


def _read_folder(folder: Path) -> Checkpoint:
    """An open_clip hub folder or a Hugging Face CLIPModel folder."""
    from auditor.models.hf_clip import convert_hf_state_dict, hf_config_to_open_clip, read_hf_config

    if (folder / "open_clip_config.json").is_file():
        config = folder / "open_clip_config.json"
        arch = _arch_from_json(config)
        weights = _first_file(folder, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
        state, *_ = read_state_dict(weights)
        cfg = arch.model_cfg
        return Checkpoint(
            state,
            "open_clip-folder",
            model_cfg=cfg,
            preprocess_cfg=arch.preprocess_cfg,
            files=(config, weights),
        )
    if (folder / "config.json").is_file():
        config = folder / "config.json"
        model_cfg = hf_config_to_open_clip(read_hf_config(config), config)
        weights = _first_file(folder, ("model.safetensors", "pytorch_model.bin"))
        state, *_ = read_state_dict(weights)
        return Checkpoint(
            convert_hf_state_dict(state), "hf-folder", model_cfg=model_cfg, files=(config, weights)
        )
    raise CheckpointError(
        f"{folder}: a folder, but neither an open_clip folder (open_clip_config.json) nor a Hugging "
        "Face CLIP folder (config.json)",
        hint="pass the checkpoint file itself, or a folder as the hub stores it",
    )


def _first_file(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no weights file ({' or '.join(names)})")


def checkpoint_sha256(files: tuple[Path, ...]) -> str:
    """SHA-256 of one file, or of a folder's files' hashes in order."""
    if len(files) == 1:
        return sha256_file(files[0])
    import hashlib

    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()


# What an inferred architecture can be compared on (heads are not in OpenAI's weights).
_COMPARED = (
    ("embed_dim",),
    ("vision_cfg", "width"),
    ("vision_cfg", "layers"),
    ("vision_cfg", "patch_size"),
    ("vision_cfg", "image_size"),
    ("text_cfg", "width"),
    ("text_cfg", "layers"),
    ("text_cfg", "context_length"),
    ("text_cfg", "vocab_size"),
)


def _disagreement(given: dict[str, Any], carried: dict[str, Any]) -> list[str]:
    out = []
    for path in _COMPARED:
        a: Any = given
        b: Any = carried
        for key in path:
            a = a.get(key) if isinstance(a, dict) else None
            b = b.get(key) if isinstance(b, dict) else None
        if a is not None and b is not None and json.dumps(a) != json.dumps(b):
            out.append(f"{'.'.join(path)} {a} != {b}")
    return out


def load_model(checkpoint: str | os.PathLike[str], arch: str | os.PathLike[str] | None = None) -> LoadedModel:
    """Load `checkpoint` (file or folder) into `arch`, or into the architecture it carries."""
    path = Path(checkpoint)
    found = read_checkpoint(path)
    if arch is None:
        if found.model_cfg is None:
            raise InputError(
                f"--arch is needed: {path} is a {found.source_format} state dict that does not name its arch",
                hint="pass --arch (an open_clip model name or config JSON); OpenAI archives and "
                "Hugging Face / open_clip folders carry theirs",
            )
        spec = ArchSpec(path.stem or path.name, found.model_cfg, found.preprocess_cfg)
        arch_source = "checkpoint"
    else:
        spec, arch_source = resolve_arch(arch), "--arch"
        conflicts = _disagreement(spec.model_cfg, found.model_cfg) if found.model_cfg else []
        if conflicts:
            raise InputError(
                f"--arch {spec.name} disagrees with the architecture {path} carries: "
                + "; ".join(conflicts[:3]),
                hint="drop --arch to use the checkpoint's own",
            )
    model = build_model(spec)
    half = any(v.dtype.is_floating_point and v.element_size() == 2 for v in found.state.values())
    load_weights(model, found.state, spec.name, path)
    return LoadedModel(
        model=model,
        preprocess=make_preprocess(spec),
        tokenizer=make_tokenizer(spec),
        arch=spec,
        path=path,
        sha256=checkpoint_sha256(found.files),
        checkpoint_format="torch" if found.source_format == "torch" else "safetensors",
        wrapped_state_dict=found.wrapped,
        key_prefix=found.prefix,
        half_precision=half,
        source_format=found.source_format,
        arch_source=arch_source,
    )


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], arch_name: str, path: Path) -> None:
    """Copy `state` into `model` (casting fp16/bf16 to the model's dtype) or explain the misfit."""
    state = {k: v for k, v in state.items() if k not in _OPENAI_EXTRA_KEYS and not k.endswith("attn_mask")}
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


def save_open_clip_folder(
    model: torch.nn.Module, arch: ArchSpec, folder: Path, *, half: bool = False
) -> None:
    """Write an open_clip hub folder: open_clip_config.json + open_clip_model.safetensors (atomic)."""
    from auditor.files import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, folder / "open_clip_model.safetensors", half=half)
    config = {"model_cfg": arch.model_cfg, "preprocess_cfg": arch.preprocess_cfg}
    atomic_write(folder / "open_clip_config.json", (json.dumps(config, indent=2) + "\n").encode())
