"""Hugging Face `transformers` CLIPModel checkpoints, converted to open_clip's layout.

A folder holds `config.json` (a `CLIPModel` config) and `model.safetensors` or
`pytorch_model.bin`; a lone `.safetensors` file can be read with `--arch` pointing at its
`config.json`. The config gives the open_clip config (`hf_config_to_open_clip`): image and patch
size, widths, layers, heads, MLP ratio, projection size, context length and activation, with
transformers' documented defaults for whatever `save_pretrained` left out. The weights are
renamed (`convert_hf_state_dict`): q/k/v projections merged into `in_proj`, projections
transposed, layer norms and embeddings renamed. Anything else (a vision tower alone, SigLIP, a
ResNet CLIP) is refused with what was found.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor.errors import CheckpointError

if TYPE_CHECKING:
    import torch

# transformers' CLIPVisionConfig / CLIPTextConfig / CLIPConfig defaults (save_pretrained writes
# only the values that differ from them).
_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "num_channels": 3,
}
_TEXT_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
_PROJECTION_DEFAULT = 512


def is_hf_clip_config(raw: Any) -> bool:
    """Whether a parsed JSON object is a Hugging Face CLIP config (as opposed to open_clip's)."""
    return isinstance(raw, dict) and (
        "vision_config" in raw
        or "text_config" in raw
        or raw.get("model_type") in ("clip", "clip_vision_model")
    )


def hf_config_to_open_clip(raw: dict[str, Any], source: Path) -> dict[str, Any]:
    """open_clip's model config for a CLIPModel config.json; refuses what it cannot map."""
    kind = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if kind != "clip" or (architectures and not set(architectures) & {"CLIPModel"}):
        found = f"model_type {kind!r}" + (f", architectures {architectures}" if architectures else "")
        raise CheckpointError(
            f"{source}: not a CLIPModel config ({found}); only both-tower CLIP models can be audited",
            hint="SigLIP, vision-only and text-only checkpoints are not supported",
        )
    vision = {**_VISION_DEFAULTS, **(raw.get("vision_config") or {})}
    text = {**_TEXT_DEFAULTS, **(raw.get("text_config") or {})}
    acts = {vision["hidden_act"], text["hidden_act"]}
    if not acts <= {"quick_gelu", "gelu"} or len(acts) != 1:
        raise CheckpointError(f"{source}: activation {sorted(acts)} has no open_clip equivalent")
    if vision.get("num_channels", 3) != 3:
        raise CheckpointError(f"{source}: {vision['num_channels']}-channel images are not supported")
    try:
        v_width, t_width = int(vision["hidden_size"]), int(text["hidden_size"])
        return {
            "embed_dim": int(raw.get("projection_dim", _PROJECTION_DEFAULT)),
            "quick_gelu": acts == {"quick_gelu"},
            "vision_cfg": {
                "image_size": int(vision["image_size"]),
                "patch_size": int(vision["patch_size"]),
                "width": v_width,
                "layers": int(vision["num_hidden_layers"]),
                "head_width": v_width // max(1, int(vision["num_attention_heads"])),
                "mlp_ratio": int(vision["intermediate_size"]) / max(1, v_width),
            },
            "text_cfg": {
                "context_length": int(text["max_position_embeddings"]),
                "vocab_size": int(text["vocab_size"]),
                "width": t_width,
                "heads": int(text["num_attention_heads"]),
                "layers": int(text["num_hidden_layers"]),
                "mlp_ratio": int(text["intermediate_size"]) / max(1, t_width),
            },
        }
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: a CLIP config with non-numeric sizes ({exc})") from exc


def read_hf_config(path: Path) -> dict[str, Any]:
    from auditor.files import read_json_object

    return read_json_object(path, "the checkpoint's config")


def is_hf_state_dict(state: dict[str, Any]) -> bool:
    return any(k.startswith(("vision_model.", "text_model.")) for k in state)


def convert_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and reshape a CLIPModel state dict to open_clip's CLIP keys."""
    import torch

    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # in_proj prefix -> {"q_weight": ..., ...}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue  # a buffer of 0..n-1, not a weight
        target = _rename(key)
        if target is None:
            raise CheckpointError(f"unexpected key in a Hugging Face CLIP checkpoint: {key}")
        if target.startswith("@qkv:"):
            prefix, part = target[5:].rsplit("|", 1)
            pending.setdefault(prefix, {})[part] = value
        elif target in ("text_projection", "visual.proj"):
            out[target] = value.t().contiguous()
        else:
            out[target] = value
    for prefix, parts in pending.items():
        for kind in ("weight", "bias"):
            pieces = [parts.get(f"{p}_{kind}") for p in "qkv"]
            if all(p is None for p in pieces):
                continue
            if any(p is None for p in pieces):
                raise CheckpointError(f"incomplete q/k/v {kind} for {prefix}")
            out[f"{prefix}.in_proj_{kind}"] = torch.cat(pieces, dim=0)  # type: ignore[arg-type]
    return out


_FIXED = {
    "logit_scale": "logit_scale",
    "text_projection.weight": "text_projection",
    "visual_projection.weight": "visual.proj",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}
_LAYER_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _rename(key: str) -> str | None:
    """open_clip's name for a CLIPModel key; '@qkv:<block>|q_weight' for a q/k/v projection."""
    if key in _FIXED:
        return _FIXED[key]
    for tower, target in (
        ("text_model.encoder.layers.", "transformer"),
        ("vision_model.encoder.layers.", "visual.transformer"),
    ):
        if not key.startswith(tower):
            continue
        number, _, rest = key[len(tower) :].partition(".")
        block = f"{target}.resblocks.{number}"
        module, _, param = rest.rpartition(".")
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            return f"@qkv:{block}.attn|{module[-6]}_{param}"
        if module in _LAYER_PARTS:
            return f"{block}.{_LAYER_PARTS[module]}.{param}"
    return None
