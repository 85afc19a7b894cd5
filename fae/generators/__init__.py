"""Generators on latents: the `Generator` interface, the bundle record, the family registry (fae.generators.base)
and the built-in families, DiT, MMDiT and STARFlow, one module each. Importing this package registers them."""
from fae.generators.base import (
    BundledGenerator,
    Generator,
    GeneratorFamily,
    GeneratorRecord,
    LatentOrigin,
    check_guide,
    families,
    family,
    family_of_bundle,
    find_generator_bundle,
    load_generator,
    register_family,
    unregister_family,
)
from fae.generators.dit import DiTGenerator
from fae.generators.flow import FlowGenerator
from fae.generators.mmdit import MMDiTGenerator

__all__ = [
    "BundledGenerator", "Generator", "GeneratorFamily", "GeneratorRecord", "LatentOrigin", "check_guide", "families", "family",
    "family_of_bundle", "find_generator_bundle", "load_generator", "register_family", "unregister_family",
    "DiTGenerator", "FlowGenerator", "MMDiTGenerator",
]
