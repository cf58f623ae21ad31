import pytest

from pipeline.mix import MixConfig, build_mix
from pipeline.mix.synthetic import write_positional_dataset


def make_mix(root, *, seed=3, fmt="arrow", storage_options=None, prefix=None):
    base = prefix or str(root)
    vid, img = f"{base}/k600", f"{base}/imagenet"
    write_positional_dataset(vid, [{"frames": 120, "label": "a"}, {"frames": 70, "label": "b"},
                                   {"frames": 64, "split": "val", "label": "c"}],
                             dataset="k600", chunk_frames=32, rows_per_shard=2, format=fmt,
                             storage_options=storage_options)
    write_positional_dataset(img, [{"frames": 1, "label": f"c{i % 3}", "number": i} for i in range(24)],
                             dataset="imagenet", rows_per_shard=10, format=fmt, storage_options=storage_options)
    cfg = MixConfig(ratios={"k600": "0.6", "imagenet": "0.4"}, inputs={"k600": vid, "imagenet": img},
                    frames=4, stride=2, images_per_seq=4, seed=seed)
    out = f"{base}/mix.json"
    build_mix(cfg, out, storage_options, progress=False)
    return out


@pytest.fixture
def mix_path(tmp_path):
    return make_mix(tmp_path)
