import pytest

from pipeline.mix.synthetic import write_positional_dataset

VIDEOS = [
    {"frames": 150, "label": "walk"},
    {"frames": 90, "label": "run"},
    {"frames": 8, "label": "jump"},  # shorter than one clip (10 frames at frames=4, stride=3)
    {"frames": 75, "label": "walk"},
    {"frames": 70, "split": "val", "label": "run"},
]


@pytest.fixture
def datasets(tmp_path):
    """A video dataset (chunks of 32 frames spread over shards) and an image dataset."""
    vid = str(tmp_path / "k600")
    img = str(tmp_path / "imagenet")
    write_positional_dataset(vid, VIDEOS, dataset="k600", chunk_frames=32, rows_per_shard=3)
    write_positional_dataset(img, [{"frames": 1, "label": f"c{i % 4}", "number": i} for i in range(40)],
                             dataset="imagenet", rows_per_shard=16)
    return {"k600": vid, "imagenet": img, "root": tmp_path}
