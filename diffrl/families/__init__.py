"""Model families: one adapter per kind of diffusers pipeline (diffrl.families.family.ModelFamily).

FAMILIES is the registry; family_of(pipe) picks a pipeline's adapter once, at load time, by the pipeline's class: the
most derived class that a registered family serves wins, so a user family for a pipeline subclass takes precedence
over the family of its base class.
"""

from __future__ import annotations

from diffrl.errors import UserInputError
from diffrl.families.family import ModelFamily
from diffrl.families.flux import FluxConditioning, FluxFamily
from diffrl.families.stable_diffusion import StableDiffusionFamily
from diffrl.families.stable_diffusion_3 import StableDiffusion3Family
from diffrl.families.stable_diffusion_xl import StableDiffusionXLFamily
from diffrl.families.z_image import ZImageConditioning, ZImageFamily
from diffrl.trajectory import Conditioning

FAMILIES: dict[str, type[ModelFamily]] = {
    StableDiffusionFamily.name: StableDiffusionFamily,
    StableDiffusionXLFamily.name: StableDiffusionXLFamily,
    StableDiffusion3Family.name: StableDiffusion3Family,
    FluxFamily.name: FluxFamily,
    ZImageFamily.name: ZImageFamily,
}


def family_of(pipe) -> ModelFamily:
    """The adapter of a pipeline, chosen by the pipeline's class (see the module docstring)."""
    for cls in type(pipe).__mro__:
        for family in reversed(FAMILIES.values()):   # a later registration overrides an earlier one
            if cls.__name__ in family.pipeline_classes:
                return family(pipe)
    served = sorted(name for family in FAMILIES.values() for name in family.pipeline_classes)
    raise UserInputError(f"diffrl has no model family for a {type(pipe).__name__}; it samples {', '.join(served)} "
                         "(a new family is one adapter in diffrl.families, see docs/extending.md)")


__all__ = ["FAMILIES", "Conditioning", "FluxConditioning", "FluxFamily", "ModelFamily", "StableDiffusion3Family",
           "StableDiffusionFamily", "StableDiffusionXLFamily", "ZImageConditioning", "ZImageFamily", "family_of"]
