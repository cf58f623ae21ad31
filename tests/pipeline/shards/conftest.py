import numpy as np
import pytest

TOKENIZER = {"id": "test-tokenizer", "sha256": "ab" * 32, "vocab_size": 8192, "downsample": 8}


def _make_rows(n: int, *, grid=(4, 4), seed=0, codebook=8192, dataset="k600"):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        nf = 1 + i % 3
        rows.append(
            dict(
                key=f"{dataset}/vid_{i:03d}/{i % 2:05d}",
                dataset=dataset,
                split="train" if i % 4 else "val",
                video_id=f"vid_{i:03d}",
                chunk=i % 2,
                t_start=0.5 * i,
                fps=30.0,
                num_frames=nf,
                grid_h=grid[0],
                grid_w=grid[1],
                label=None if i % 5 == 0 else f"class_{i % 3}",
                tokens=rng.integers(0, codebook, size=(nf, *grid), dtype=np.int64),
            )
        )
    return rows


@pytest.fixture
def make_rows():
    return _make_rows


@pytest.fixture
def tokenizer_info():
    return dict(TOKENIZER)


@pytest.fixture
def rows():
    return _make_rows(11)
