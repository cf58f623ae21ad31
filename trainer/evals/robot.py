"""Robot manipulation by behaviour cloning from frozen features: `toto-train robot`.

MVP's protocol (Xiao et al., "Masked Visual Pre-training for Motor Control"; Radosavovic et al.,
"Real-World Robot Learning with Masked Visual Pre-training"), which the Toto paper follows: the
visual encoder is frozen, a small policy maps its features of the current camera frame plus the
robot's proprioception to an action, it is trained by regression on demonstrations, and it is
scored by success rate over seeded episodes; every encoder compared is trained on the same
demonstrations and scored on the same episodes.

Here the task is the 2-D pushing task of `trainer.evals.robot_env` (Chipmunk2D physics, headless).
Demonstrations come from its scripted expert, run with DART-style action noise (the noisy action is
executed, the expert's clean action is recorded), so the demonstrations also show how to recover
from the small errors a cloned policy makes. Encoders:

- ``toto``: the checkpoint. Each frame is tokenized with the checkpoint's tokenizer and fed as an
  image (``[bos_image] + tokens``); the policy reads the per-token features of one block.
- ``random``: the same architecture with freshly initialised weights (seeded): what pre-training adds.
- ``pixels``: the frame's raw patches at the tokenizer's patch size (P·P·3 values per token, in
  [0, 1]), the same token grid: what the features add over the pixels themselves.
- ``state``: the block's true pose relative to the goal (position, angle mod 90°) as one token: the
  ceiling of the policy and demonstrations, with perfect perception.

The policy: attention pooling over the tokens (`trainer.evals.probes.AttentionPoolingHead`, as the
paper's probes) to ``hidden`` units, concatenated with the proprioception, a two-layer GELU MLP,
tanh to the action square; MSE on the expert's action, AdamW with cosine decay.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import click
import numpy as np
import torch
from torch import nn

from trainer.evals.robot_env import PushConfig, PushEnv, expert_action

__all__ = ["ENCODERS", "RobotConfig", "BCPolicy", "collect_demos", "train_policy", "evaluate_policy",
           "robot_job", "robot_command"]

ENCODERS = ("toto", "random", "pixels", "state")
EVAL_SEED0 = 1_000_000  # evaluation episodes use seeds EVAL_SEED0 + i, demonstrations 0, 1, ...


@dataclass
class RobotConfig:
    demos: int = 100  # demonstration episodes
    episodes: int = 50  # evaluation episodes
    noise: float = 0.3  # DART: std of the Gaussian added to the executed demonstration actions
    layer: int | None = None  # block whose features the policy reads; None = the middle one
    encoders: tuple[str, ...] = ENCODERS
    hidden: int = 256
    heads: int = 4
    epochs: int = 150
    lr: float = 2e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for k in ("demos", "episodes", "hidden", "heads", "epochs", "batch_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k}={getattr(self, k)} must be >= 1")
        if self.noise < 0:
            raise ValueError(f"noise={self.noise} must be >= 0")
        self.encoders = tuple(self.encoders)
        bad = [e for e in self.encoders if e not in ENCODERS]
        if bad or not self.encoders or len(set(self.encoders)) != len(self.encoders):
            raise ValueError(f"encoders={','.join(self.encoders)}: pick distinct names from {', '.join(ENCODERS)}")


# ------------------------------------------------------------------------------------------ demos
def collect_demos(task: PushConfig, n: int, noise: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Run the expert on episodes 0..n-1 with executed-action noise; every step's observation and
    the expert's clean action. Returns frames (N, R, R, 3) uint8, proprio (N, 4) float32, actions
    (N, 2) float32, states (N, 6) float32 (`state_features` of the step), episode (N,) int64 and
    the expert's success per episode (n,) bool."""
    rng = np.random.default_rng(seed)
    frames, proprio, actions, states, episode, success = [], [], [], [], [], []
    for e in range(n):
        env = PushEnv(task, e)
        while not env.done:
            st = env.state()
            a = expert_action(task, st)
            frames.append(env.frame())
            proprio.append(env.proprio())
            actions.append(a.astype(np.float32))
            states.append(state_features(st))
            episode.append(e)
            env.step(a + noise * rng.standard_normal(2))
        success.append(env.success)
    return {"frames": np.stack(frames), "proprio": np.stack(proprio), "actions": np.stack(actions),
            "states": np.stack(states), "episode": np.asarray(episode, np.int64),
            "success": np.asarray(success, bool)}


def state_features(st: dict) -> np.ndarray:
    """The block's pose for the ``state`` encoder, (6,) float32: block - goal (2), block (2), and the
    angle as cos/sin of 4·angle (a square looks the same every 90°)."""
    b, g, a = np.asarray(st["block"], float), np.asarray(st["goal"], float), float(st["angle"])
    return np.array([*(b - g), *b, math.cos(4 * a), math.sin(4 * a)], np.float32)


# ---------------------------------------------------------------------------------------- encoders
Encoder = Callable[[np.ndarray, np.ndarray], torch.Tensor]  # (frames (N,R,R,3), states (N,6)) -> (N, P, D)


def image_encoder(model: nn.Module, meta: dict, layer: int, tokenize: Callable[[np.ndarray], np.ndarray],
                  batch: int = 64, record: dict | None = None) -> Encoder:
    """Frames -> (N, h·w, D) float32 features of `layer`, each frame fed as one image: [bos_image] + tokens
    (the training layout, `pipeline.mix.sequence.assemble`). Call it inside `trained_context(model)`:
    a grid longer than the trained context extends the model (`fit_context`, once per grid)."""
    from pipeline.mix.sequence import assemble
    from trainer.evals.context import fit_context
    from trainer.evals.features import backbone_features

    specials = meta["specials"]
    trained_grid = tuple(meta["grid"]) if meta.get("grid") else None
    fitted: dict[tuple[int, int], nn.Module] = {}

    def fn(frames: np.ndarray, states: np.ndarray) -> torch.Tensor:
        out = []
        for i in range(0, len(frames), batch):
            tokens = np.asarray(tokenize(frames[i : i + batch]))  # (b, h, w)
            b, h, w = tokens.shape
            if (h, w) not in fitted:
                fitted[(h, w)], rec = fit_context(model, 1 + h * w, "auto", grid=(h, w), trained_grid=trained_grid)
                if record is not None:
                    record.update(rec)
            seq = assemble(tokens.reshape(b, 1, h * w), start=int(specials["bos_image"]), seq_len=1 + h * w,
                           specials=specials)  # inputs (b, 1 + hw): bos, then the frame
            x = torch.from_numpy(seq["inputs"])
            fi = torch.from_numpy(np.ascontiguousarray(seq["frame_index"]))
            out.append(backbone_features(fitted[(h, w)], x, fi, [layer])[layer].cpu())
        return torch.cat(out)

    return fn


def pixel_encoder(patch: int) -> Encoder:
    """Frames -> (N, (R/P)², P·P·3) raw patches in [0, 1], raster order (the tokens' grid)."""

    from pipeline.tokenizers.patch import patchify

    def fn(frames: np.ndarray, states: np.ndarray) -> torch.Tensor:
        n, r = frames.shape[:2]
        if r % patch:
            raise ValueError(f"frames of {r} px do not split into {patch} px patches")
        x = patchify(frames, patch).reshape(n, (r // patch) ** 2, -1)  # (N, P, p·p·3)
        return torch.from_numpy(x.astype(np.float32) / 255.0)

    return fn


def state_encoder(frames: np.ndarray, states: np.ndarray) -> torch.Tensor:
    """The true pose as one token (N, 1, 6)."""
    return torch.from_numpy(np.asarray(states, np.float32)).unsqueeze(1)


# ------------------------------------------------------------------------------------------ policy
class BCPolicy(nn.Module):
    """features (B, P, D) and proprioception (B, K) -> action (B, 2) in [-1, 1]². The pooling uses
    gcd(heads, D) heads, so any feature width works (the state token's 6 values: 2 heads)."""

    def __init__(self, dim: int, proprio_dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        from trainer.evals.probes import AttentionPoolingHead

        self.pool = AttentionPoolingHead(dim, hidden, math.gcd(heads, dim))
        self.mlp = nn.Sequential(nn.Linear(hidden + proprio_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, 2))

    def forward(self, feats: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mlp(torch.cat([self.pool(feats), proprio], dim=-1)))


def train_policy(feats: torch.Tensor, proprio: torch.Tensor, actions: torch.Tensor, cfg: RobotConfig,
                 device: str | torch.device = "cpu") -> tuple[BCPolicy, float]:
    """feats (N, P, D), proprio (N, K), actions (N, 2) -> (policy in eval mode, last epoch's mean MSE)."""
    torch.manual_seed(cfg.seed)
    policy = BCPolicy(feats.shape[-1], proprio.shape[-1], cfg.hidden, cfg.heads).to(device)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(feats) / cfg.batch_size)
    steps = cfg.epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(cfg.seed)
    policy.train()
    last = float("nan")
    for _ in range(cfg.epochs):
        total, n = 0.0, 0
        for idx in torch.randperm(len(feats), generator=g).split(cfg.batch_size):
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            pred = policy(feats[idx].to(device).float(), proprio[idx].to(device))
            loss = nn.functional.mse_loss(pred, actions[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        last = total / max(n, 1)
    return policy.eval(), last


def evaluate_policy(task: PushConfig, act: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                    seeds: list[int]) -> dict:
    """Run episodes `seeds` in lockstep; `act(frames (E,R,R,3), proprio (E,4), states (E,6))` gives
    the actions (E, 2) of the episodes still running. Returns success rate, mean steps, mean final
    block-goal distance and each episode's outcome."""
    envs = [PushEnv(task, s) for s in seeds]
    while True:
        live = [e for e in envs if not e.done]
        if not live:
            break
        frames = np.stack([e.frame() for e in live])
        prop = np.stack([e.proprio() for e in live])
        states = np.stack([state_features(e.state()) for e in live])
        for e, a in zip(live, np.asarray(act(frames, prop, states)), strict=True):
            e.step(a)
    success = [bool(e.success) for e in envs]
    return {"success_rate": float(np.mean(success)), "mean_steps": float(np.mean([e.steps for e in envs])),
            "mean_final_distance": float(np.mean([e.distance() for e in envs])), "success": success}


def _policy_actor(encoder: Encoder, policy: BCPolicy, device) -> Callable:
    def act(frames: np.ndarray, prop: np.ndarray, states: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            f = encoder(frames, states).to(device).float()
            return policy(f, torch.from_numpy(prop).to(device)).cpu().numpy()

    return act


def robot_job(
    model: nn.Module | None,
    meta: dict | None,
    out_dir: str,
    *,
    tokenize: Callable[[np.ndarray], np.ndarray] | None,
    patch: int,
    cfg: RobotConfig | None = None,
    task: PushConfig | None = None,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> tuple[dict, str]:
    """Collect demonstrations once, then for each encoder: features, policy, closed-loop success.
    Frames are rendered at ``task.resolution``. Writes robot.json. `model`/`meta`/`tokenize` may be
    None when no encoder needs them."""
    from pipeline.storage import write_json
    from trainer.evals.context import trained_context
    from trainer.evals.run import default_track_layer, parse_layers

    cfg = cfg or RobotConfig()
    task = task or PushConfig()
    needs_model = {"toto", "random"} & set(cfg.encoders)
    if needs_model and (model is None or meta is None or tokenize is None):
        raise ValueError(f"encoders {', '.join(sorted(needs_model))} need a checkpoint and its tokenizer")
    layer = None
    if needs_model and model.cfg.input == "patches":
        raise ValueError("the robot task's image encoder feeds dVAE codes; a patch-input model (model.input=patches) "
                         "is probed with `toto-train probe` and `track` on its pixel datasets; use --encoders pixels,state "
                         "for the task's raw-patch and true-state baselines")
    if needs_model:
        n_layers = int(model.cfg.n_layers)
        layer = cfg.layer or default_track_layer(n_layers)
        parse_layers(str(layer), n_layers)

    t0 = time.perf_counter()
    demos = collect_demos(task, cfg.demos, cfg.noise, seed=cfg.seed)
    log(f"{cfg.demos} demonstrations, {len(demos['actions'])} steps (expert success with noise "
        f"{cfg.noise}: {demos['success'].mean():.0%}) in {time.perf_counter() - t0:.1f} s")
    seeds = [EVAL_SEED0 + i for i in range(cfg.episodes)]
    expert = evaluate_policy(task, _expert_actor(task), seeds)
    log(f"expert on the evaluation episodes: {expert['success_rate']:.0%}")
    proprio = torch.from_numpy(demos["proprio"])
    actions = torch.from_numpy(demos["actions"])
    results, context = {}, {}
    for name in cfg.encoders:
        t1 = time.perf_counter()
        if name in ("toto", "random"):
            backbone = model if name == "toto" else _random_like(model, cfg.seed)
            encoder = image_encoder(backbone.to(device).eval(), meta, layer, tokenize, record=context)
        elif name == "pixels":
            backbone, encoder = None, pixel_encoder(patch)
        else:
            backbone, encoder = None, state_encoder
        # A context extension for this grid lasts for this encoder only: the caller's model leaves as trained.
        with trained_context(backbone) if backbone is not None else contextlib.nullcontext():
            feats = encoder(demos["frames"], demos["states"])  # (N, P, D)
            policy, mse = train_policy(feats, proprio, actions, cfg, device)
            got = evaluate_policy(task, _policy_actor(encoder, policy, device), seeds)
        results[name] = {"success_rate": got["success_rate"], "mean_steps": got["mean_steps"],
                         "mean_final_distance": got["mean_final_distance"], "train_mse": mse,
                         "feature_shape": list(feats.shape[1:]), "episodes_succeeded": int(sum(got["success"]))}
        log(f"{name:7s} success {got['success_rate']:.0%}  final distance {got['mean_final_distance']:.3f}  "
            f"train MSE {mse:.4f}  ({time.perf_counter() - t1:.1f} s)")
    doc = {"schema": "robot_result", "version": 1, "task": "push", "checkpoint": str((meta or {}).get("step_dir", "")),
           "layer": layer, "resolution": task.resolution, "patch": patch, "config": asdict(cfg) | {"layer": layer},
           "task_config": asdict(task), "context": context,
           "counts": {"demo_episodes": cfg.demos, "demo_steps": int(len(demos["actions"])),
                      "eval_episodes": cfg.episodes},
           "expert": {"success_rate": expert["success_rate"], "mean_steps": expert["mean_steps"],
                      "demo_success_rate": float(demos["success"].mean())},
           "results": results}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "robot.json")
    write_json(path, doc, "robot_result")
    return doc, path


def _expert_actor(task: PushConfig) -> Callable:
    """The scripted expert as an `evaluate_policy` actor: the pusher from the proprioception, the
    block from the state rows (the expert ignores the angle)."""

    def act(frames: np.ndarray, prop: np.ndarray, states: np.ndarray) -> np.ndarray:
        return np.stack([expert_action(task, {"pusher": p[:2], "block": s[2:4], "goal": task.goal})
                         for p, s in zip(prop, states, strict=True)])

    return act


def _random_like(model: nn.Module, seed: int) -> nn.Module:
    """The checkpoint's architecture with fresh weights (its own initialisation, seeded)."""
    from trainer.model import build_model

    torch.manual_seed(seed)
    return build_model(model.cfg).eval()


@click.command("robot")
@click.argument("ckpt")
@click.option("--out", "out_dir", required=True, help="Output folder (robot.json).")
@click.option("--encoders", default=",".join(ENCODERS), show_default=True,
              help="Encoders to compare, comma-separated: toto (the checkpoint), random (same architecture, "
                   "fresh weights), pixels (raw patches), state (the block's true pose: the ceiling).")
@click.option("--layer", default=None, type=int, help="Block whose features the policy reads. Default: the middle one.")
@click.option("--demos", default=100, show_default=True, type=int, help="Demonstration episodes (the same for every encoder).")
@click.option("--episodes", default=50, show_default=True, type=int, help="Seeded evaluation episodes.")
@click.option("--noise", default=0.3, show_default=True, type=float,
              help="Std of the noise added to executed demonstration actions (DART); the clean action is recorded.")
@click.option("--epochs", default=150, show_default=True, type=int, help="Policy training epochs.")
@click.option("--lr", default=2e-3, show_default=True, type=float, help="Peak AdamW learning rate (cosine decay).")
@click.option("--hidden", default=256, show_default=True, type=int, help="Width of the policy.")
@click.option("--max-steps", default=PushConfig.max_steps, show_default=True, type=int,
              help="Control steps before an episode counts as failed.")
@click.option("--resolution", default=None, type=int, help="Camera frame size. Default: the checkpoint's.")
@click.option("--tokenizer", "tokenizer_spec", default=None,
              help="Tokenizer the checkpoint was trained with (dalle:DIR, vqgan:DIR, dvae:DIR, demo). Default: recorded.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the demonstration noise, random encoder and policy.")
@click.option("--device", default="cpu", show_default=True, help="Device for the frozen model and the policy (cpu, cuda).")
@click.option("--threads", default=None, type=int, help="Torch intra-op threads on CPU (default: torch's).")
def robot_command(ckpt, out_dir, encoders, layer, demos, episodes, noise, epochs, lr, hidden, max_steps, resolution,
                  tokenizer_spec, seed, device, threads) -> None:
    """Behaviour cloning of a 2-D pushing task from frozen features: success rate per encoder.

    A scripted expert pushes a block onto a goal pad (pymunk physics, headless); a small policy
    (attention pooling over the frozen tokens' features + proprioception -> MLP -> action) is
    trained on the same demonstrations for each encoder and scored on the same seeded episodes
    (MVP's protocol).

    Example:

    \b
        toto-train robot runs/demo --out robot-out --demos 100 --episodes 50
    """
    from trainer.checkpoint import load_model
    from trainer.evals.probes import torch_threads
    from trainer.evals.run import frame_tokenizer_from_meta, resolution_from_meta

    try:
        cfg = RobotConfig(demos=demos, episodes=episodes, noise=noise, layer=layer, epochs=epochs, lr=lr,
                          hidden=hidden, seed=seed,
                          encoders=tuple(e.strip() for e in encoders.split(",") if e.strip()))
        model, meta = load_model(ckpt, device=device)
        res = resolution or resolution_from_meta(meta)
        patch = int((meta.get("tokenizer") or {}).get("downsample") or 8)
        if res % patch:
            raise ValueError(f"--resolution {res} is not a multiple of the tokenizer's {patch} px patches")
        task = PushConfig(resolution=res, max_steps=max_steps)
        with torch_threads(threads):
            doc, path = robot_job(model, meta, out_dir, tokenize=frame_tokenizer_from_meta(meta, tokenizer_spec),
                                  patch=patch, cfg=cfg, task=task, device=device)
    except (ValueError, RuntimeError) as e:
        raise click.ClickException(str(e)) from e
    rows = "  ".join(f"{k} {v['success_rate']:.0%}" for k, v in doc["results"].items())
    click.echo(f"success rate  {rows}   (expert {doc['expert']['success_rate']:.0%})   wrote {path}")
