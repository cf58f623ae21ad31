import dataclasses

import pytest
import torch

from trainer.evals.probes import (
    AttentionPoolingHead,
    FeatureSet,
    ProbeConfig,
    evaluate_probe,
    labels_to_ids,
    topk_accuracy,
    train_probe,
)


def _toy(n: int, seed: int, tokens: int = 6, dim: int = 8, classes: int = 3) -> FeatureSet:
    """Linearly separable: each class shifts a different feature direction on every token."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    feats = torch.randn(n, tokens, dim, generator=g) * 0.5
    feats[torch.arange(n), :, labels] += 3.0
    return FeatureSet(feats, labels, [f"c{i}" for i in range(classes)])


@pytest.mark.parametrize("pooling", ["attention", "average", "linear", "cross-attn-mlp"])
def test_each_head_learns_separable_toy(pooling):
    cfg = ProbeConfig(pooling=pooling, epochs=20, batch_size=32, lr=1e-2, num_heads=2)
    res, _ = train_probe(_toy(192, 0), _toy(96, 1), cfg)
    assert res.top1 == 100.0
    assert res.top5 == 100.0  # k capped at 3 classes
    assert res.train_loss[-1] < 0.7 * res.train_loss[0]
    assert res.num_train == 192 and res.num_eval == 96


def test_attention_probe_finds_the_one_informative_token():
    """Only token 2 carries the class; averaging over 16 noisy tokens dilutes it, attention does not."""
    g = torch.Generator().manual_seed(0)

    def make(n, seed):
        g.manual_seed(seed)
        labels = torch.arange(n) % 2
        feats = torch.randn(n, 16, 8, generator=g)
        feats[:, 2, 0] = 10.0  # a marker that lets attention find the token
        feats[:, 2, 1] = (labels.float() * 2 - 1) * 2.0
        return FeatureSet(feats, labels, ["a", "b"])

    cfg = ProbeConfig(pooling="attention", epochs=30, batch_size=32, lr=3e-3, num_heads=2)
    res, head = train_probe(make(256, 1), make(128, 2), cfg)
    assert isinstance(head, AttentionPoolingHead)
    assert res.top1 >= 95.0
    assert not head.norm.affine  # non-affine BatchNorm, as in the paper/AIM


def test_group_averaging_scores_each_video_once():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x[:, 0, :2]

    # Two videos; video "v1" has one wrong clip and two right ones -> averaged probabilities are right.
    feats = torch.tensor([[[5.0, 0.0]], [[5.0, 0.0]], [[0.0, 5.0]], [[0.0, 1.0]], [[1.0, 0.0]], [[0.0, 1.0]]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    data = FeatureSet(feats, labels, ["a", "b"], groups=["v0", "v0", "v0", "v1", "v1", "v1"])
    top1, top5, n = evaluate_probe(Fixed(), data)
    assert n == 2 and top1 == 100.0 and top5 == 100.0
    top1_clips, _, n_clips = evaluate_probe(Fixed(), dataclasses.replace(data, groups=None))
    assert n_clips == 6 and top1_clips == pytest.approx(100 * 4 / 6)


def test_topk_accuracy_values():
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.2, 0.5, 0.3]])
    labels = torch.tensor([2, 1, 0])
    assert topk_accuracy(probs, labels, 1) == pytest.approx(100 / 3)
    assert topk_accuracy(probs, labels, 2) == pytest.approx(200 / 3)
    assert topk_accuracy(probs, labels, 5) == 100.0


def test_config_and_labels_validation():
    with pytest.raises(ValueError, match="pooling"):
        ProbeConfig(pooling="max")
    with pytest.raises(ValueError, match="epochs"):
        ProbeConfig(epochs=0)
    ids, classes = labels_to_ids(["cat", "dog", "cat"])
    assert classes == ["cat", "dog"] and ids.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="not among the training classes"):
        labels_to_ids(["cow"], classes)
    with pytest.raises(ValueError, match=r"\(N, T, D\)"):
        FeatureSet(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), ["a"])


def test_attention_head_fast_form_equals_plain_attention():
    torch.manual_seed(0)
    head = AttentionPoolingHead(dim=24, num_classes=5, num_heads=3)
    with torch.no_grad():
        head.k.bias.normal_()  # a key bias must not change the result (softmax cancels it)
        head.v.bias.normal_()
        head.query.normal_()
    head.eval()
    head.norm.running_mean.normal_()
    head.norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(7, 11, 24)
    torch.testing.assert_close(head(x), head.forward_reference(x), atol=1e-5, rtol=1e-5)
    head.train()
    x.requires_grad_(True)
    g1 = torch.autograd.grad(head(x).square().sum(), [x, head.k.weight, head.v.weight, head.query])
    g2 = torch.autograd.grad(head.forward_reference(x).square().sum(), [x, head.k.weight, head.v.weight, head.query])
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _norm_rank(rank: int, port: int, x: torch.Tensor, w: torch.Tensor, out: str) -> None:
    """One gloo rank in a forked child: the probes' head norm and an affine one on this rank's half of x."""
    import os

    import torch.distributed as dist

    from trainer.evals.probes import GlobalBatchNorm1d, build_head

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    got = {}
    for name, norm in (("head", build_head("average", x.shape[1], 1, 3).norm),
                       ("affine", GlobalBatchNorm1d(x.shape[1], momentum=None))):
        xr = x.chunk(2)[rank].clone().requires_grad_(True)
        y = norm.train()(xr)
        (y * w.chunk(2)[rank]).sum().backward()  # rank r's share of the global loss sum(y * w)
        got[name] = {"y": y.detach(), "grad": xr.grad, "mean": norm.running_mean, "var": norm.running_var}
    torch.save(got, f"{out}.{rank}")
    dist.destroy_process_group()


def test_global_batchnorm_over_two_ranks_equals_batchnorm_of_the_global_batch(tmp_path):
    """The one global BatchNorm (probe heads, non-affine; fine-tuning, gradients into its input): two
    gloo ranks with half a batch each give torch's BatchNorm1d on the whole batch, outputs, input
    gradients and running statistics (the probes' norm used to skip the all-reduce in backward)."""
    import multiprocessing
    import socket

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(10, 4, generator=g) * 3 + 1, torch.randn(10, 4, generator=g)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_norm_rank, args=(r, port, x, w, str(tmp_path / "out"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    for name, ref in (("head", torch.nn.BatchNorm1d(4, affine=False)), ("affine", torch.nn.BatchNorm1d(4, momentum=None))):
        xg = x.clone().requires_grad_(True)
        y = ref.train()(xg)
        (y * w).sum().backward()
        torch.testing.assert_close(torch.cat([r[name]["y"] for r in ranks]), y.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat([r[name]["grad"] for r in ranks]), xg.grad, atol=1e-5, rtol=1e-5)
        for r in ranks:
            torch.testing.assert_close(r[name]["mean"], ref.running_mean)
            torch.testing.assert_close(r[name]["var"], ref.running_var)
