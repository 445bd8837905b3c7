"""Checkpoints as users have them: OpenAI TorchScript archives, Hugging Face and open_clip folders.

Every model here is built by the test with random weights (no downloads). Each format must give
the same embeddings as the model it was saved from (max abs difference <= 1e-4): against the
original open_clip model, and for Hugging Face against `transformers`' own CLIPModel forward.
Hostile inputs are refused with exit 2 and leave no trace (a marker file that must not appear).
A scan of the bundled poisoned zoo model saved in each format gives the same findings.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from auditor.cli import run
from auditor.errors import CheckpointError, InputError
from auditor.models import ArchSpec, build_model, load_model, resolve_arch
from auditor.zoo.build import CONFIG_PATH, checkpoint_path, write_scan_data

# OpenAI's shapes at toy size: heads = width / 64, quick GELU.
OPENAI_VIT = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}
OPENAI_RESNET = {
    **OPENAI_VIT,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 64, "head_width": 64},
}


def _embeddings(model: torch.nn.Module, size: int, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Image and text features (no normalization) of seeded inputs: float32 (4, D) each."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, size, size, generator=generator)
    tokens = torch.randint(1, 49000, (4, context), generator=generator)
    tokens[:, 0], tokens[:, -1] = 49406, 49407  # start and end of text, as the tokenizer sets them
    with torch.no_grad():
        return model.encode_image(pixels).numpy(), model.encode_text(tokens).numpy()


def _same(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        assert np.abs(x - y).max() <= 1e-4


def _random_model(cfg: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(ArchSpec("test", cfg))
    with torch.no_grad():  # open_clip zero-inits some projections: make every weight matter
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def save_openai_archive(model: torch.nn.Module, path: Path, image_size: int) -> Path:
    """An archive the way OpenAI's are made: the model scripted and saved with torch.jit.save,
    with the non-weight entries OpenAI's carry."""
    model.register_buffer("input_resolution", torch.tensor(image_size))  # open_clip's model has
    # context_length and vocab_size as plain attributes already: OpenAI's hold them as tensors.
    torch.jit.save(torch.jit.script(model), str(path))
    return path


@pytest.mark.parametrize("cfg", [OPENAI_VIT, OPENAI_RESNET], ids=["vit", "resnet"])
def test_openai_archive_is_read_as_tensors_with_its_architecture(tmp_path, cfg):
    model = _random_model(cfg)
    size = cfg["vision_cfg"]["image_size"]
    expected = _embeddings(model, size, 16)
    archive = save_openai_archive(model, tmp_path / "model.pt", size)
    loaded = load_model(archive)  # no --arch: inferred from the shapes
    assert loaded.source_format == "openai-archive" and loaded.arch_source == "checkpoint"
    assert loaded.arch.model_cfg["vision_cfg"]["image_size"] == size
    _same(_embeddings(loaded.model, size, 16), expected)
    # and the command line scans it without --arch
    from PIL import Image

    for i, label in enumerate(["cat", "dog", "cat", "dog"]):
        (tmp_path / "data" / label).mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "data" / label / f"{i}.png")
    out = tmp_path / "out"
    code = run(["scan", str(archive), str(tmp_path / "data"), "--engine", "torch", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert code in (0, 1)
    assert (report["model"]["format"], report["model"]["arch_source"]) == ("openai-archive", "checkpoint")


def test_archive_of_a_zoo_model_with_arch(tmp_path):
    loaded = load_model(checkpoint_path("patch-random"), CONFIG_PATH)
    expected = _embeddings(loaded.model, 64, 16)
    archive = save_openai_archive(loaded.model, tmp_path / "zoo.pt", 64)
    again = load_model(archive, CONFIG_PATH)  # the zoo's text tower breaks OpenAI's head rule
    assert again.arch_source == "--arch"
    _same(_embeddings(again.model, 64, 16), expected)


def test_arch_that_disagrees_with_the_checkpoint_names_both(tmp_path):
    archive = save_openai_archive(_random_model(OPENAI_VIT), tmp_path / "model.pt", 32)
    with pytest.raises(InputError, match=r"--arch tiny-clip disagrees .*vision_cfg\.layers 4 != 2"):
        load_model(archive, CONFIG_PATH)


def test_plain_state_dict_without_arch_asks_for_it():
    with pytest.raises(InputError, match="--arch is needed"):
        load_model(checkpoint_path("clean"))


def _hf_config(vision_act: str = "quick_gelu") -> dict:
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": 32,
        "text_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "vocab_size": 49408,
            "hidden_act": vision_act,
        },
        "vision_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "hidden_act": vision_act,
        },
    }


def _hf_features(model, size: int) -> tuple[np.ndarray, np.ndarray]:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, size, size, generator=generator)
    tokens = torch.randint(1, 49000, (4, 16), generator=generator)
    tokens[:, 0], tokens[:, -1] = 49406, 49407
    with torch.no_grad():
        image, text = model.get_image_features(pixel_values=pixels), model.get_text_features(input_ids=tokens)
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    return image.numpy(), text.numpy()


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_hugging_face_folder_matches_transformers(tmp_path, safe):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.CLIPModel(transformers.CLIPConfig(**_hf_config())).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=safe)
    loaded = load_model(tmp_path / "hf")
    assert loaded.source_format == "hf-folder" and loaded.arch.model_cfg["quick_gelu"] is True
    _same(_embeddings(loaded.model, 32, 16), _hf_features(hf, 32))
    if safe:  # a lone weights file, with --arch naming its config.json
        alone = load_model(tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "config.json")
        _same(_embeddings(alone.model, 32, 16), _hf_features(hf, 32))


def test_hugging_face_architectures_it_cannot_map_are_named(tmp_path):
    folder = tmp_path / "siglip"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "siglip", "architectures": ["SiglipModel"]})
    )
    (folder / "model.safetensors").write_bytes(b"unused")
    with pytest.raises(CheckpointError, match="model_type 'siglip'.*SiglipModel"):
        load_model(folder)


def save_open_clip_folder_by_hand(loaded, folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = {"model_cfg": loaded.arch.model_cfg, "preprocess_cfg": loaded.arch.preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in loaded.model.state_dict().items()},
        folder / "open_clip_model.safetensors",
    )
    return folder


def test_open_clip_folder(tmp_path):
    loaded = load_model(checkpoint_path("patch-random"), CONFIG_PATH)
    folder = save_open_clip_folder_by_hand(loaded, tmp_path / "oc")
    again = load_model(folder)
    assert again.source_format == "open_clip-folder" and again.arch_source == "checkpoint"
    _same(_embeddings(again.model, 64, 16), _embeddings(loaded.model, 64, 16))


# --- hostile inputs -------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_archive(tmp_path: Path) -> Path:
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(_Payload(tmp_path / "marker"), protocol=2))
        archive.writestr("evil/code/__torch__/model.py", "def forward(self): pass\n")
        archive.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
    return path


def _hostile_hf_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_hf_config()))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _Payload(tmp_path / "marker")}))
    return folder


def _absurd_config(tmp_path: Path) -> Path:
    folder = tmp_path / "huge"
    folder.mkdir()
    config = _hf_config()
    config["vision_config"]["hidden_size"] = 10**9
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({"logit_scale": torch.zeros(())}, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("make", [_hostile_archive, _hostile_hf_folder, _absurd_config])
def test_hostile_checkpoints_are_refused_without_side_effects(tmp_path, make, capsys, monkeypatch):
    import open_clip.model

    def no_allocation(*args, **kwargs):
        raise AssertionError("a model was built from a refused checkpoint")

    monkeypatch.setattr(open_clip.model.CLIP, "__init__", no_allocation)
    model = make(tmp_path)
    data = tmp_path / "data"
    for label in ("cat", "dog"):
        (data / label).mkdir(parents=True)
        from PIL import Image

        Image.new("RGB", (32, 32), (10, 20, 30)).save(data / label / "a.png")
    assert run(["scan", str(model), str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert not (tmp_path / "marker").exists()


# --- the same findings in every format ------------------------------------------------------------
def _to_hf(loaded, folder: Path) -> Path:
    """The zoo model written as a Hugging Face CLIPModel folder (the test's own conversion)."""
    from safetensors.torch import save_file

    cfg = loaded.arch.model_cfg
    state = loaded.model.state_dict()
    out = {"logit_scale": state["logit_scale"]}
    out["text_projection.weight"] = state["text_projection"].t()
    out["visual_projection.weight"] = state["visual.proj"].t()
    names = {
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    }
    out.update({hf: state[oc] for oc, hf in names.items()})
    parts = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2"}
    parts.update({"mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"})
    for tower, hf_tower in (("transformer", "text_model"), ("visual.transformer", "vision_model")):
        layers = cfg["text_cfg" if tower == "transformer" else "vision_cfg"]["layers"]
        for i in range(layers):
            block, hf_block = f"{tower}.resblocks.{i}", f"{hf_tower}.encoder.layers.{i}"
            for kind in ("weight", "bias"):
                q, k, v = state[f"{block}.attn.in_proj_{kind}"].chunk(3)
                for name, value in zip("qkv", (q, k, v), strict=True):
                    out[f"{hf_block}.self_attn.{name}_proj.{kind}"] = value
                for oc, hf in parts.items():
                    out[f"{hf_block}.{hf}.{kind}"] = state[f"{block}.{oc}.{kind}"]
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    config = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg["embed_dim"],
        "vision_config": {
            "hidden_size": vision["width"],
            "intermediate_size": vision["width"] * 4,
            "num_hidden_layers": vision["layers"],
            "num_attention_heads": vision["width"] // vision["head_width"],
            "image_size": vision["image_size"],
            "patch_size": vision["patch_size"],
            "hidden_act": "gelu",
        },
        "text_config": {
            "hidden_size": text["width"],
            "intermediate_size": text["width"] * 4,
            "num_hidden_layers": text["layers"],
            "num_attention_heads": text["heads"],
            "max_position_embeddings": text["context_length"],
            "vocab_size": text["vocab_size"],
            "hidden_act": "gelu",
        },
    }
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in out.items()}, folder / "model.safetensors")
    return folder


def test_a_scan_finds_the_same_backdoor_in_every_format(tmp_path):
    truth = write_scan_data("patch-random", tmp_path / "scan", per_class=40)
    loaded = load_model(checkpoint_path("patch-random"), CONFIG_PATH)
    forms = {
        "state dict": [str(checkpoint_path("patch-random")), "--arch", str(CONFIG_PATH)],
        "openai archive": [
            str(save_openai_archive(loaded.model, tmp_path / "zoo.pt", 64)),
            "--arch",
            str(CONFIG_PATH),
        ],
        "open_clip folder": [str(save_open_clip_folder_by_hand(loaded, tmp_path / "oc"))],
        "hf folder": [str(_to_hf(load_model(checkpoint_path("patch-random"), CONFIG_PATH), tmp_path / "hf"))],
    }
    findings = {}
    for name, model_args in forms.items():
        out = tmp_path / name.replace(" ", "-")
        code = run(
            [
                "scan",
                model_args[0],
                str(tmp_path / "scan"),
                *model_args[1:],
                "--out",
                str(out),
                "--format",
                "json",
            ]
        )
        report = json.loads((out / "report.json").read_text())
        findings[name] = (code, report["target_labels"], sorted(v["path"] for v in report["victims"]))
        assert (
            report["model"]["format"]
            == {
                "state dict": "safetensors",
                "openai archive": "openai-archive",
                "open_clip folder": "open_clip-folder",
                "hf folder": "hf-folder",
            }[name]
        )
    assert findings["state dict"][:2] == (1, [truth["target"]])
    planted = {p["path"] for p in truth["poisoned"]}
    assert len(planted & set(findings["state dict"][2])) >= 0.9 * len(planted)
    for name, found in findings.items():
        assert found == findings["state dict"], name
    # repair reads a folder and writes an open_clip folder, which loads back without --arch
    repaired = tmp_path / "repaired"
    report = tmp_path / "open_clip-folder" / "report.json"
    argv = ["repair", forms["open_clip folder"][0], str(tmp_path / "scan"), "--report", str(report)]
    assert run([*argv, "--output", str(repaired), "--steps", "2"]) == 0
    again = load_model(repaired)
    assert (again.source_format, again.arch_source) == ("open_clip-folder", "checkpoint")
    assert resolve_arch(CONFIG_PATH).name == "tiny-clip"
