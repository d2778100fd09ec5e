"""Model-family registry. Adding a family = one module + one line here + its test."""

from __future__ import annotations

from mtptune.errors import FamilyError
from mtptune.families.base import MtpFamily, SharedTensorNames
from mtptune.families.deepseek_v3 import DeepseekV3Family, Glm4MoeFamily
from mtptune.families.llama import LlamaFamily
from mtptune.families.mimo import MiMoFamily
from mtptune.families.qwen3_5 import Qwen3_5Family
from mtptune.families.qwen3_5_moe import Qwen3_5MoeFamily
from mtptune.families.qwen3_next import Qwen3NextFamily

FAMILIES: dict[str, MtpFamily] = {
    f.name: f
    for f in (
        Qwen3_5Family(),
        Qwen3_5MoeFamily(),
        Qwen3NextFamily(),
        DeepseekV3Family(),
        Glm4MoeFamily(),
        MiMoFamily(),
        LlamaFamily(),
    )
}

__all__ = ["FAMILIES", "MtpFamily", "SharedTensorNames", "family_by_name", "family_for_model_type"]


def family_for_model_type(model_type: str) -> MtpFamily:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise FamilyError(f"model_type {model_type!r} has no MTP family in mtptune; supported: {', '.join(supported)}.")


def family_by_name(name: str) -> MtpFamily:
    if name not in FAMILIES:
        raise FamilyError(f"unknown MTP family {name!r}; known: {', '.join(sorted(FAMILIES))}.")
    return FAMILIES[name]
