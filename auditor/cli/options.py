"""Options shared by several commands, each with its CLIP_AUDIT_* environment variable."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)
existing_path = click.Path(exists=True, path_type=Path)

# A checkpoint file, or a folder (Hugging Face CLIPModel, open_clip hub) that carries its arch.
model_argument = click.argument("model", type=existing_path)
# DATA may be a brace pattern of WebDataset shards (`shards/{00000..00099}.tar`), which is no
# path on disk: `open_dataset` checks that it exists (exit 2, "data not found").
data_argument = click.argument("data", type=click.Path(path_type=Path))
arch_option = click.option(
    "--arch",
    default=None,
    envvar="CLIP_AUDIT_ARCH",
    show_envvar=True,
    help="open_clip model name (ViT-B-32, RN50, ...) or path to a model config JSON (open_clip's, or a "
    "Hugging Face CLIP config.json). Optional for OpenAI archives and Hugging Face / open_clip folders, "
    "which carry their own.",
)
classes_option = click.option(
    "--classes",
    type=existing_file,
    default=None,
    envvar="CLIP_AUDIT_CLASSES",
    show_envvar=True,
    help="Class names, one per line (needed for a flat folder of images).",
)
batch_size_option = click.option(
    "--batch-size",
    type=click.IntRange(1, 4096),
    default=64,
    envvar="CLIP_AUDIT_BATCH_SIZE",
    show_envvar=True,
    help="Images per batch through the image tower.",
)
seed_option = click.option(
    "--seed",
    type=int,
    default=0,
    envvar="CLIP_AUDIT_SEED",
    show_envvar=True,
    help="Seed for everything random (trigger placement, sampling).",
)
engine_option = click.option(
    "--engine",
    type=click.Choice(["auto", "onnx", "tensorrt", "torch"]),
    default="auto",
    envvar="CLIP_AUDIT_ENGINE",
    show_envvar=True,
    help="Runtime for bulk scoring and for --oracle sam: auto = ONNX Runtime when installed, "
    "else PyTorch; tensorrt needs the [gpu] extra and a CUDA GPU.",
)
table_or_json_option = click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    envvar="CLIP_AUDIT_FORMAT",
    show_envvar=True,
    help="table: a summary on stderr; json: the result on stdout.",
)
engine_dir_option = click.option(
    "--engine-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="CLIP_AUDIT_ENGINE_DIR",
    show_envvar=True,
    help="Where built engines are cached (default: ~/.cache/clip-audit/engines).",
)


def out_option(help_text: str) -> Callable[[Any], Any]:
    """`--out DIR` (CLIP_AUDIT_OUT); each command says what it writes there."""
    return click.option(
        "--out",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        envvar="CLIP_AUDIT_OUT",
        show_envvar=True,
        help=help_text,
    )


def attack_option(help_text: str) -> Callable[[Any], Any]:
    """`--attack SPEC` (CLIP_AUDIT_ATTACK): a trigger the user knows."""
    return click.option(
        "--attack", "attack_spec", default=None, envvar="CLIP_AUDIT_ATTACK", show_envvar=True, help=help_text
    )


def oracle_checkpoint_option(help_text: str) -> Callable[[Any], Any]:
    """`--oracle-checkpoint PATH` (CLIP_AUDIT_ORACLE_CHECKPOINT): segmentation weights you provide."""
    return click.option(
        "--oracle-checkpoint",
        type=existing_file,
        default=None,
        envvar="CLIP_AUDIT_ORACLE_CHECKPOINT",
        show_envvar=True,
        help=help_text,
    )


def probe_data_option(help_text: str) -> Callable[[Any], Any]:
    """`--data DATA` (CLIP_AUDIT_DATA): images to check engines on, for commands without DATA."""
    return click.option(
        "--data", type=existing_path, default=None, envvar="CLIP_AUDIT_DATA", show_envvar=True, help=help_text
    )


def precision_option(help_text: str, auto: bool = False, default: str = "fp32") -> Callable[[Any], Any]:
    """`--precision fp32|fp16|int8` (CLIP_AUDIT_PRECISION) of the image tower's engine (`auto` too)."""
    return click.option(
        "--precision",
        type=click.Choice(["fp32", "fp16", "int8", *(["auto"] if auto else [])]),
        default=default,
        envvar="CLIP_AUDIT_PRECISION",
        show_envvar=True,
        help=help_text,
    )
