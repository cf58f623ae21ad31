"""Training data: the mix loader (global sample → sequence, per-rank batches, exact resume) and
labelled clips for probes. See docs/mixing.md."""

from pipeline.mix.access import MixReader
from pipeline.mix.sequence import IGNORE_INDEX, make_specials
from trainer.data.clips import iter_clips
from trainer.data.loader import STATE_VERSION, MixLoader


def build_sequence(mix_path: str, i: int, *, split: str = "train", storage_options: dict | None = None,
                   verify: str = "off") -> dict:
    """Global sample ``i`` of a mix as one sequence (numpy arrays ``inputs``/``targets``/... [T])."""
    return MixReader(mix_path, split=split, storage_options=storage_options, verify=verify).sequence(i)


__all__ = ["IGNORE_INDEX", "STATE_VERSION", "MixLoader", "MixReader", "build_sequence", "iter_clips", "make_specials"]
