"""Checks, from the tokens alone and before any training, that the data can carry each finding.

- Predictability of video tokens (finding 3: the first frame is harder than later ones): the
  held-out cross-entropy, in bits per token, of each video token under the training set's
  unigram, against its cross-entropy given the token at the same position in the previous frame.
  Both are fitted on the train split and scored on the val split (plug-in entropies of a 512×512
  table would be biased low). Smoothing is fixed: unigram add-0.5; conditional
  p(x | prev) = (count(prev, x) + ALPHA · p_unigram(x)) / (count(prev) + ALPHA).
- Decodability of the labels (findings 1, 2, 5: a probe has something to read): a logistic
  regression on each sample's bag of token counts (frequencies; C = 10), trained on the train
  split and scored on the val split, against chance (the most frequent val class's share). For
  videos the bag is over every frame of one clip per video. "Carried" means the accuracy exceeds
  chance by more than two binomial standard errors.

Settings are constants here, fixed before any number is seen.
"""

from __future__ import annotations

import math

import numpy as np

from trainer.evals.report import NOISE_Z

__all__ = ["token_predictability", "bag_of_tokens_accuracy", "read_token_samples", "check_dataset"]

ALPHA = 1.0  # conditional smoothing weight (pseudo-counts spread as the unigram)
LOGREG_C = 10.0
LOGREG_MAX_ITER = 2000


def token_predictability(train: np.ndarray, val: np.ndarray, vocab: int) -> dict:
    """train, val: int video tokens (N, F, HW). Held-out bits per token under the unigram and given
    the previous frame's token at the same position; also how often that token simply repeats."""
    if train.ndim != 3 or val.ndim != 3 or train.shape[1] < 2 or val.shape[1] < 2:
        raise ValueError(f"need clips of >= 2 frames as (N, F, HW); got {train.shape} and {val.shape}")
    uni = np.bincount(train.ravel(), minlength=vocab).astype(np.float64) + 0.5
    uni /= uni.sum()
    pairs = np.zeros((vocab, vocab), np.float64)  # [previous token, token]
    np.add.at(pairs, (train[:, :-1].ravel(), train[:, 1:].ravel()), 1.0)
    prev, nxt = val[:, :-1].ravel(), val[:, 1:].ravel()
    p_cond = (pairs[prev, nxt] + ALPHA * uni[nxt]) / (pairs.sum(axis=1)[prev] + ALPHA)
    h_uni = float(-np.log2(uni[nxt]).mean())  # the same targets (frames 2..F) under both models
    h_cond = float(-np.log2(p_cond).mean())
    return {"unigram_bits": h_uni, "conditional_bits": h_cond, "ratio": h_cond / h_uni,
            "repeat_rate": float((prev == nxt).mean()), "train_clips": int(train.shape[0]),
            "val_clips": int(val.shape[0]), "frames": int(train.shape[1]), "tokens_per_frame": int(train.shape[2])}


def _bags(samples: list[np.ndarray], vocab: int) -> np.ndarray:
    out = np.zeros((len(samples), vocab), np.float32)
    for i, s in enumerate(samples):
        out[i] = np.bincount(s.ravel(), minlength=vocab) / max(1, s.size)
    return out


def bag_of_tokens_accuracy(train: list[np.ndarray], train_labels: list[str], val: list[np.ndarray],
                           val_labels: list[str], vocab: int, seed: int = 0) -> dict:
    """Top-1 (%) of a logistic regression on bags of tokens, with chance and the verdict."""
    from sklearn.linear_model import LogisticRegression

    keep = [i for i, lab in enumerate(val_labels) if lab in set(train_labels)]
    if not keep or len(set(train_labels)) < 2:
        raise ValueError("the bag-of-tokens check needs >= 2 training classes and validation samples of those classes")
    yv = np.asarray([val_labels[i] for i in keep])
    clf = LogisticRegression(C=LOGREG_C, max_iter=LOGREG_MAX_ITER, random_state=seed)
    clf.fit(_bags(train, vocab), np.asarray(train_labels))
    acc = float((clf.predict(_bags([val[i] for i in keep], vocab)) == yv).mean())
    _, counts = np.unique(yv, return_counts=True)
    chance = float(counts.max() / len(yv))
    n = len(yv)
    se = math.sqrt(max(acc * (1 - acc), chance * (1 - chance)) / n)
    return {"top1": 100 * acc, "chance": 100 * chance, "se": 100 * se, "n_train": len(train), "n_val": n,
            "classes": len(set(train_labels)), "carried": bool(acc - chance > NOISE_Z * se)}


def read_token_samples(url: str, split: str, *, frames: int, stride: int) -> tuple[list[np.ndarray], list[str]]:
    """Visual tokens of a labelled token dataset: per image (1, HW), per video one clip (frames, HW)."""
    from pipeline.mix.sequence import make_specials
    from pipeline.shards import read_manifest
    from trainer.data import iter_clips

    m = read_manifest(url)
    hw = int(m["grid"][0]) * int(m["grid"][1])
    toks, labels = [], []
    for c in iter_clips(url, frames=frames, stride=stride, clips_per_video=1, split=split,
                        specials=make_specials(int(m["codebook_size"]))):
        if c["label"] is None:
            continue
        vis = np.asarray(c["tokens"])[np.asarray(c["frame_index"]) >= 0]  # specials dropped
        toks.append(vis.reshape(-1, hw))
        labels.append(str(c["label"]))
    if not toks:
        raise ValueError(f"{url} (split {split}) has no labelled samples for the data checks")
    return toks, labels


def check_dataset(url: str, *, video: bool, frames: int = 1, stride: int = 1, train_split: str = "train",
                  val_split: str = "val", max_samples: int | None = None, seed: int = 0) -> dict:
    """Every check that applies to one token dataset (video predictability only for videos)."""
    from pipeline.shards import read_manifest

    vocab = int(read_manifest(url)["codebook_size"])
    f = frames if video else 1
    tr, tr_lab = read_token_samples(url, train_split, frames=f, stride=stride)
    va, va_lab = read_token_samples(url, val_split, frames=f, stride=stride)
    if max_samples is not None:  # seeded subsets (datasets are stored class by class)
        rng = np.random.default_rng(seed)
        ti = sorted(rng.permutation(len(tr))[:max_samples])
        vi = sorted(rng.permutation(len(va))[:max_samples])
        tr, tr_lab = [tr[i] for i in ti], [tr_lab[i] for i in ti]
        va, va_lab = [va[i] for i in vi], [va_lab[i] for i in vi]
    out = {"bag_of_tokens": bag_of_tokens_accuracy(tr, tr_lab, va, va_lab, vocab, seed=seed)}
    if video:
        out["predictability"] = token_predictability(np.stack(tr), np.stack(va), vocab)
    return out
