"""What ``bench`` measures: settings (a runtime and a precision), the side-by-side plan, and
loading each setting once, with the setting ``Captioner.load(model)`` picks by default marked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from captioning.bundle.format import BundleError
from captioning.core.machine import PRECISIONS, resolve_precision
from captioning.inference.captioner import Captioner
from captioning.runtime.openvino import RUNTIMES, openvino_module

OPENVINO_PRECISIONS = ("fp32", "bf16", "bf16-int8", "int8")  # OpenVINO in the side-by-side


@dataclass(frozen=True)
class Setting:
    """A runtime and a precision to measure; "auto" is what ``Captioner.load`` picks for it."""

    runtime: str = "auto"
    precision: str = "auto"

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``RUNTIME[-PRECISION]``, e.g. ``torch``, ``openvino-int8``, ``auto``."""
        runtime, _, precision = text.partition("-")
        if runtime not in RUNTIMES or precision not in ("", *PRECISIONS):
            raise ValueError(
                f"unknown setting {text!r}: RUNTIME[-PRECISION] with RUNTIME one of "
                f"{', '.join(RUNTIMES)} and PRECISION one of {', '.join(PRECISIONS)}"
            )
        return cls(runtime, precision or "auto")

    @property
    def name(self) -> str:
        return f"{self.runtime} {self.precision}"

    @property
    def is_default(self) -> bool:
        """True when loading it is ``Captioner.load(model)`` with its defaults, as requested."""
        return self.precision == "auto" and _quiet_runtime(self.runtime) == _quiet_runtime("auto")


def _quiet_runtime(name: str) -> str:
    """``resolve_runtime`` without its notice: "torch" where openvino is absent."""
    return "torch" if name == "torch" or openvino_module() is None else "openvino"


def plan(
    runtime: str = "auto", precision: str = "auto", settings: Sequence[str | Setting] = ()
) -> tuple[list[Setting], bool]:
    """The settings to measure, and whether they are the side-by-side (runtime and precision
    both auto, no ``settings``)."""
    if settings:
        return [s if isinstance(s, Setting) else Setting.parse(s) for s in settings], False
    if runtime == "auto" and precision == "auto":
        ov = [Setting("openvino", p) for p in OPENVINO_PRECISIONS]
        return [Setting("torch", precision), *ov], True
    return [Setting(runtime, precision)], False


def _family(label: str) -> str:
    """A runtime or precision label without what does not change the setting:
    "openvino+torch" -> "openvino", "bf16+cl" -> "bf16", "int8-samples" -> "int8" (the
    calibration set), "bf16-int8" stays."""
    return label.split("+")[0].removesuffix("-samples")


def _matches(cap: Captioner, s: Setting) -> bool:
    """Whether ``cap`` runs what ``s`` asks for (its encoder's runtime and precision)."""
    if s.is_default:
        return True
    want = s.precision if s.precision != "auto" else resolve_precision("auto").dtype  # torch's
    same_runtime = _family(cap.runtime) == _quiet_runtime(s.runtime)
    return same_runtime and _family(cap.precision_label) == want


@dataclass
class Loaded:
    """A setting's captioner, the label its entry goes under, and whether ``auto`` picks it."""

    label: str
    cap: Captioner
    auto: bool = False


def _label(s: Setting, cap: Captioner) -> str:
    """e.g. "openvino int8"; a precision or runtime asked as auto is named as it resolved."""
    precision = s.precision if s.precision != "auto" else _family(cap.precision_label)
    runtime = s.runtime if s.runtime != "auto" else _quiet_runtime("auto")
    return f"{runtime} {precision}"


def load_settings(
    model: str | Path, settings: Sequence[Setting], side_by_side: bool
) -> tuple[list[Loaded], list[str]]:
    """Load each setting once (the defaults' captioner stands for the setting it matches) and
    note those that cannot load. The side-by-side always includes what ``auto`` picks."""
    auto_cap = Captioner.load(model, "auto", runtime="auto") if side_by_side else None
    loaded: list[Loaded] = []
    skipped: list[str] = []
    for s in settings:
        if side_by_side and s.runtime == "openvino" and openvino_module() is None:
            skipped.append(f"{s.name}: openvino is not installed")
            continue
        taken = any(x.auto for x in loaded)
        try:
            cap, auto = _load_one(model, s, None if taken else auto_cap)
        except BundleError:
            raise
        except ValueError as e:  # e.g. a precision this installation does not run
            skipped.append(f"{s.name}: {e}")
            continue
        label = _label(s, cap)
        if all(x.label != label for x in loaded):  # a setting asked twice is measured once
            loaded.append(Loaded(label, cap, auto and not taken))
    if auto_cap is not None and not any(x.auto for x in loaded):
        label = _label(Setting(), auto_cap)
        if any(x.label == label for x in loaded):
            label += " (defaults)"
        loaded.append(Loaded(label, auto_cap, True))
    if not loaded:
        raise ValueError("no setting could be loaded: " + "; ".join(skipped))
    return loaded, skipped


def _load_one(model: str | Path, s: Setting, auto_cap: Captioner | None) -> tuple[Captioner, bool]:
    """(captioner, whether it is the defaults' one) for ``s``, reusing ``auto_cap`` if it fits."""
    if auto_cap is not None and _matches(auto_cap, s):
        return auto_cap, True
    if s.is_default:
        return Captioner.load(model, "auto", runtime="auto"), True
    return Captioner.load(model, s.precision, runtime=s.runtime), False
