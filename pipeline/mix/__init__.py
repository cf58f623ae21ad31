"""Mixing token datasets: blend index, per-source sample orders, sequence assembly, mix manifests."""

from pipeline.mix.access import MixReader, read_mix_manifest
from pipeline.mix.blend import Blend, Permutation, SourceOrder, exact_weights
from pipeline.mix.build import MixConfig, build_mix, check_compatible
from pipeline.mix.sequence import IGNORE_INDEX, SPECIAL_NAMES, assemble, make_specials, vocab_size_for

__all__ = [
    "IGNORE_INDEX", "SPECIAL_NAMES", "Blend", "MixConfig", "MixReader", "Permutation", "SourceOrder",
    "assemble", "build_mix", "check_compatible", "exact_weights", "make_specials", "read_mix_manifest",
    "vocab_size_for",
]
