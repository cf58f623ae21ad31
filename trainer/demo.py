"""`toto-train demo`: the paper's study in miniature on the embedded demo data, on a CPU.

Stages (each skipped when its output is already complete, so an interrupted demo resumes):

1. data      `pipeline.demo_data.make_demo_data`: photo-textured objects over other photos as
             images (ImageNet layout) and slowly drifting clips (Kinetics layout), DAVIS-style sequences.
2. tokenize  `pipeline.jobs.run_tokenize` (`toto-pipeline tokenize`) on embedded Ray with the
             bundled demo tokenizer, 64 px.
3. checks    `trainer.evals.data_checks`: what the tokens carry, before any training
             (OUT/data-checks.json; the report's first section).
4. mix       `pipeline.mix.build.build_mix`: images and videos, 16-frame clips at stride 2
             (the demo clips are 2 s at 16 fps: stride 4 would need 61 frames).
5. pretrain  `trainer.train.train` with the `demo` preset on a fixed token budget -> OUT/run.
6. sweep     the same on narrower widths (muP, one learning rate) -> OUT/sweep/wNNN, for the scaling fit.
7. coarse-data  the coarse-to-fine arm's data: both data sets tokenized at half resolution (32 px:
             4x4 tokens a frame) -> OUT/tokens-coarse, and their mix -> OUT/mix-coarse.json.
8. coarse    stage A: the main run's model and recipe at half resolution -> OUT/c2f/coarse.
9. fine      stage B: `init_from` stage A at full resolution with RoPE base 50 000 -> OUT/c2f/fine;
             stage A + stage B train no more tokens (and so no more FLOPs) than the main run.
10. study    `trainer.evals.study.run_study`: probes (attention vs average, every layer) on the
             image and video object tasks, loss by position, scaling on the sweep's frontier,
             label propagation J&F, coarse-to-fine vs the main (direct) run, a short generation
             (`toto-train generate`), report.md.

Scale decisions (CPU, 2 cores, 15 minutes): 64 px frames -> 8x8 = 64 tokens per frame, 16-frame
clips of 1 024 tokens, a few million parameters, about a million training tokens. `--quick`
shrinks the data (about 5%), the number of steps and the probe epochs so CI runs it in minutes;
its numbers are not meaningful, only that every stage runs and every section is written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import click
import numpy as np

__all__ = ["DemoConfig", "run_demo", "demo"]

_DEMO_TOKENIZER = 'pipeline.tokenizers.load_tokenizer("demo") (issue 4: the bundled demo tokenizer)'
_GENERATE = "trainer.generate.generate (issue 7: toto-train generate)"


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


@dataclass
class DemoConfig:
    """The demo study's settings. Validated on construction; `quick()` gives the CI variant."""

    out: str = "demo-out"
    seed: int = 0
    data_scale: float = 1.0
    resolution: int = 64
    tokenizer: str = "demo"
    ratios: dict[str, float] = field(default_factory=lambda: {"imagenet": 0.5, "kinetics": 0.5})
    frames: int = 16
    stride: int = 2
    images_per_seq: int = 16
    preset: str = "demo"
    # Budgets in tokens, not minutes: every run trains exactly this many tokens (max_steps = tokens //
    # batch_tokens), so a slower machine takes longer but trains the same models.
    train_tokens: int = 983_040  # 120 steps of 8 192 tokens
    pretrain_overrides: tuple[str, ...] = ("val_every=20",)
    # Size sweep for the scaling finding: these widths besides the main run's, with the main run's
    # head count (so head width grows with width, the convention of the model's muP) and SwiGLU
    # 3.2 x width; muP relative to the main width so that one learning rate (the preset's) serves
    # all, as the paper does; each trains sweep_tokens with the main run's schedule shape.
    sweep_widths: tuple[int, ...] = (40, 80, 120)
    sweep_tokens: int = 491_520  # 60 steps of 8 192 tokens
    # Coarse-to-fine arm (finding 5), fixed before any number is seen: stage A trains the main run's model
    # and recipe at resolution // 2 (a quarter of the tokens a frame), stage B continues it (init_from, new
    # optimizer and schedule) at full resolution with RoPE base c2f_rope_theta (the paper's 50 000). Half the
    # main run's token budget each: together the main run's tokens, and fewer FLOPs, since stage A's
    # 4x shorter sequences cost less attention per token. The direct arm is the main run (OUT/run).
    c2f_coarse_tokens: int = 491_520  # 60 steps of 8 192 tokens
    c2f_fine_tokens: int = 491_520  # 60 steps of 8 192 tokens
    c2f_rope_theta: float = 50_000.0
    probe_epochs: int = 30
    max_probe_samples: int | None = 1000  # per split: a seeded random subset (time budget)
    loss_clips: int = 32
    track_max_frames: int | None = None
    generate_frames: int = 4
    quick: bool = False

    def __post_init__(self) -> None:
        if not self.data_scale > 0:
            raise ValueError(f"DemoConfig.data_scale={self.data_scale!r} is invalid: use a positive factor such as 1.0")
        if self.resolution % 16 or self.resolution < 16:
            raise ValueError(f"DemoConfig.resolution={self.resolution!r} is invalid: use a multiple of 16 (its half, "
                             "the coarse-to-fine arm's first stage, a multiple of the tokenizer's 8), e.g. 64")
        from trainer.config import load_config

        main = load_config(self.preset, list(self.pretrain_overrides)).model
        for w in self.sweep_widths:  # the model config says what a width must satisfy (heads, head width)
            try:
                load_config(self.preset, [*self.pretrain_overrides, *sweep_overrides(w, main)])
            except ValueError as e:
                raise ValueError(f"DemoConfig.sweep_widths={self.sweep_widths!r}: width {w} is invalid "
                                 f"({e}); use multiples of {2 * main.n_heads}, e.g. (40, 80, 120)") from None
        if any("exit_after_minutes" in o for o in self.pretrain_overrides):
            raise ValueError("DemoConfig.pretrain_overrides must not set exit_after_minutes: the study trains fixed "
                             "token budgets (train_tokens, sweep_tokens) so every machine trains the same models")
        if set(self.ratios) != {"imagenet", "kinetics"} or any(v <= 0 for v in self.ratios.values()):
            raise ValueError(f"DemoConfig.ratios={self.ratios!r} is invalid: give positive shares for imagenet and kinetics")
        for name in ("frames", "stride", "images_per_seq", "probe_epochs", "loss_clips", "generate_frames",
                     "train_tokens", "sweep_tokens", "c2f_coarse_tokens", "c2f_fine_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"DemoConfig.{name}={v!r} is invalid: use a positive integer")
        if self.c2f_coarse_tokens + self.c2f_fine_tokens > self.train_tokens:
            raise ValueError(f"DemoConfig.c2f_coarse_tokens + c2f_fine_tokens = "
                             f"{self.c2f_coarse_tokens + self.c2f_fine_tokens} exceeds train_tokens={self.train_tokens}: "
                             "the coarse-to-fine arm must train at no more compute than the direct run")
        if not self.c2f_rope_theta > 0:
            raise ValueError(f"DemoConfig.c2f_rope_theta={self.c2f_rope_theta!r} is invalid: use a positive base "
                             "such as 50000.0")

    @classmethod
    def quick_config(cls, out: str = "demo-out", seed: int = 0) -> DemoConfig:
        """A few minutes on 2 cores: ~5% of the data, a handful of steps, short probe schedules."""
        return cls(
            out=out, seed=seed, data_scale=0.05, quick=True, probe_epochs=5, max_probe_samples=200, loss_clips=4,
            track_max_frames=8, generate_frames=2, train_tokens=6 * 2048, sweep_widths=(40,), sweep_tokens=4 * 2048,
            # 2 steps a stage with val_every=2: each stage's last step is validated, as in the full demo.
            c2f_coarse_tokens=2 * 2048, c2f_fine_tokens=2 * 2048,
            pretrain_overrides=("warmup_steps=1", "ckpt_every=6", "val_every=2", "val_batches=1",
                                "batch_tokens=2048", "micro_batch=2", "tensorboard=false"),
        )


def _p(cfg: DemoConfig, *parts: str) -> str:
    return os.path.join(os.path.abspath(cfg.out), *parts)


def stage_data(cfg: DemoConfig) -> dict:
    from pipeline.demo_data import DemoDataConfig, make_demo_data

    marker = _p(cfg, "data", "summary.json")
    if os.path.exists(marker):
        with open(marker) as f:
            return json.load(f)
    summary = make_demo_data(DemoDataConfig(out=_p(cfg, "data"), seed=cfg.seed, scale=cfg.data_scale), progress=True)
    with open(marker + ".tmp", "w") as f:
        json.dump(summary, f)
    os.replace(marker + ".tmp", marker)  # the marker: the data stage is complete
    return summary


ADAPTER = {"imagenet": "imagenet", "kinetics": "kinetics600"}  # mix source name -> pipeline.sources adapter


# Small shards on 2 cores: decode actors share the work and a rerun resumes at a fine grain (the
# job's image default, 16 384 per shard, is sized for GPU clusters).
DEMO_ITEMS_PER_SHARD = 64


def stage_tokenize(cfg: DemoConfig, resolution: int | None = None, root: str = "tokens") -> dict[str, str]:
    """Tokenize both demo data sets with the bundled tokenizer on embedded Ray at ``resolution`` (default
    the demo's) into OUT/``root``. A data set with its manifest is done; reruns skip done shards."""
    from pipeline.jobs import TokenizeConfig, ray_session, run_tokenize

    resolution = resolution or cfg.resolution
    out = {name: _p(cfg, root, name) for name in ADAPTER}
    # 2 cores: half a core per decode actor, one tokenizer actor with one core.
    jobs = [TokenizeConfig(dataset=adapter, input=_p(cfg, "data", name), output=out[name], tokenizer=cfg.tokenizer,
                           resolution=resolution, num_cpus=2, decode_cpus=0.5, tokenizer_cpus=1.0, cpu_actors=1,
                           batch_size=64, items_per_shard=DEMO_ITEMS_PER_SHARD)
            for name, adapter in ADAPTER.items() if not os.path.exists(os.path.join(out[name], "manifest.json"))]
    if not jobs:
        return out
    with ray_session(jobs[0]):  # one Ray start and stop for the stage's jobs, not one each
        for job in jobs:
            _log(f"tokenize {job.input} ({job.dataset} layout) at {resolution} px with tokenizer {cfg.tokenizer!r}")
            run_tokenize(job)
    return out


def stage_mix(cfg: DemoConfig, tokens: dict[str, str], name: str = "mix.json") -> str:
    from pipeline.mix.build import MixConfig, build_mix

    path = _p(cfg, name)
    if not os.path.exists(path):
        build_mix(MixConfig(ratios={k: str(v) for k, v in cfg.ratios.items()}, inputs=tokens, seed=cfg.seed,
                            frames=cfg.frames, stride=cfg.stride, images_per_seq=cfg.images_per_seq), path)
    return path


def _train_config(cfg: DemoConfig, tokens: int, extra: tuple[str, ...] = ()):
    """The preset with the demo's overrides, its max_steps set by the token budget."""
    from trainer.config import load_config

    overrides = list(cfg.pretrain_overrides) + list(extra) + [f"seed={cfg.seed}"]
    batch = load_config(cfg.preset, overrides).batch_tokens
    steps = tokens // batch
    if steps < 1:
        raise ValueError(f"a budget of {tokens} tokens is less than one step of {batch}; raise it")
    tcfg = load_config(cfg.preset, overrides + [f"max_steps={steps}"])
    if tcfg.warmup_steps > steps:
        tcfg = load_config(cfg.preset, overrides + [f"max_steps={steps}", f"warmup_steps={max(1, steps // 10)}"])
    return tcfg


def _main_model(cfg: DemoConfig):
    """The main run's ModelConfig (the sweep's widths are relative to it)."""
    from trainer.config import load_config

    return load_config(cfg.preset, list(cfg.pretrain_overrides)).model


def _train_once(tcfg, mix: str, run: str) -> str:
    from trainer.checkpoint import latest_checkpoint
    from trainer.train import train

    marker = os.path.join(run, "demo-pretrain-done.json")
    if os.path.exists(marker):
        return run
    summary = train(tcfg, mix, run)
    if latest_checkpoint(run) is None:
        raise RuntimeError(f"pre-training wrote no checkpoint under {run}")
    with open(marker + ".tmp", "w") as f:
        json.dump({k: summary.get(k) for k in ("step", "loss", "global_batch", "seq_len", "params")}, f)
    os.replace(marker + ".tmp", marker)  # the marker: this run is complete
    return run


def stage_pretrain(cfg: DemoConfig, mix: str) -> str:
    return _train_once(_train_config(cfg, cfg.train_tokens, _mup(cfg)), mix, _p(cfg, "run"))


def stage_coarse_data(cfg: DemoConfig) -> str:
    """The coarse-to-fine arm's data: both data sets at half resolution and their mix (the main mix's
    shares, clips and seed) -> OUT/mix-coarse.json."""
    tokens = stage_tokenize(cfg, cfg.resolution // 2, "tokens-coarse")
    return stage_mix(cfg, tokens, "mix-coarse.json")


def _mup(cfg: DemoConfig) -> tuple[str, ...]:
    # muP relative to the main width: at dim == mup_base_dim the model is the standard one.
    return (f"model.mup_base_dim={_main_model(cfg).dim}",)


def stage_coarse(cfg: DemoConfig, mix_coarse: str) -> str:
    """Stage A: the main run's model and recipe on the half-resolution mix, c2f_coarse_tokens."""
    return _train_once(_train_config(cfg, cfg.c2f_coarse_tokens, _mup(cfg)), mix_coarse, _p(cfg, "c2f", "coarse"))


def stage_fine(cfg: DemoConfig, mix: str, coarse: str) -> str:
    """Stage B: stage A's weights (init_from its last checkpoint) on the full-resolution mix with RoPE
    base c2f_rope_theta, c2f_fine_tokens; its logs' tokens_seen / flops_seen continue stage A's."""
    from trainer.checkpoint import latest_checkpoint

    last = latest_checkpoint(coarse)
    if last is None:
        raise RuntimeError(f"stage A of the coarse-to-fine arm has no checkpoint under {coarse}")
    extra = (*_mup(cfg), f"model.rope_theta={cfg.c2f_rope_theta}", f"init_from={last}")
    return _train_once(_train_config(cfg, cfg.c2f_fine_tokens, extra), mix, _p(cfg, "c2f", "fine"))


def sweep_overrides(width: int, main) -> tuple[str, ...]:
    """Model overrides of one sweep width: the main model's (`main`, a ModelConfig) heads (wider with
    width) and MLP ratio, muP relative to its width."""
    ratio = main.ffn_dim / main.dim
    return (f"model.dim={width}", f"model.mlp_hidden={round(ratio * width / 16) * 16}", f"model.mup_base_dim={main.dim}")


def stage_sweep(cfg: DemoConfig, mix: str) -> list[str]:
    """The size sweep: the other widths, each a fixed token budget, validated along the way."""
    main = _main_model(cfg)
    runs = []
    for w in cfg.sweep_widths:
        _log(f"sweep: width {w} ({cfg.sweep_tokens} tokens, muP base {main.dim})")
        runs.append(_train_once(_train_config(cfg, cfg.sweep_tokens, sweep_overrides(w, main)), mix,
                                _p(cfg, "sweep", f"w{w:03d}")))
    return runs


def stage_checks(cfg: DemoConfig, tokens: dict[str, str], summary: dict) -> dict:
    """Data checks from the tokens before training (trainer.evals.data_checks) -> OUT/data-checks.json."""
    from trainer.evals.data_checks import check_dataset

    path = _p(cfg, "data-checks.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    doc = {
        "image": check_dataset(tokens["imagenet"], video=False, seed=cfg.seed),
        "video": check_dataset(tokens["kinetics"], video=True, frames=cfg.frames, stride=cfg.stride, seed=cfg.seed),
        "object_area": (summary.get("imagenet") or {}).get("object_area"),
    }
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)
    return doc


def _load_tokenizer(cfg: DemoConfig):
    try:
        from pipeline.tokenizers import load_tokenizer
    except ImportError as e:
        raise RuntimeError(f"the demo needs {_DEMO_TOKENIZER}, which is not in this build ({e})") from e
    return load_tokenizer(cfg.tokenizer)


def _generate_fn(cfg: DemoConfig, tokenizer):
    try:
        from trainer.generate import generate as generate_clip
    except ImportError as e:
        raise RuntimeError(f"the demo needs {_GENERATE}, which is not in this build ({e})") from e

    def generate(model, meta, out_dir: str) -> str:
        val_dir = _p(cfg, "data", "kinetics", "val")
        vids = sorted(os.listdir(val_dir)) if os.path.isdir(val_dir) else []
        if not vids:
            raise RuntimeError(f"{val_dir} has no validation clip to prompt the generation with")
        res = generate_clip(meta["step_dir"], os.path.join(val_dir, vids[0]), os.path.join(out_dir, "generation.gif"),
                            frames=cfg.generate_frames, tokenizer=tokenizer, seed=cfg.seed)
        return res["out"]

    return generate


STAGES = ("data", "tokenize", "checks", "mix", "pretrain", "sweep", "coarse-data", "coarse", "fine", "study")


def run_demo(cfg: DemoConfig, until: str = "study") -> str:
    """Run the stages up to and including ``until``; return that stage's output path
    (report.md for the whole study)."""
    if until not in STAGES:
        raise ValueError(f"until={until!r} is not a stage; choose one of {', '.join(STAGES)}")
    from trainer.evals.study import StudyConfig, TaskData, run_study

    t_start = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    # Stage durations persist across reruns, so a resumed demo still reports what each stage cost.
    times_path = _p(cfg, "stage-times.json")
    recorded: dict[str, float] = {}
    if os.path.exists(times_path):
        with open(times_path) as f:
            recorded = json.load(f)
    times: dict[str, str] = {}

    def timed(name, fn, *a):
        t0 = time.time()
        _log(f"stage {name} ...")
        res = fn(*a)
        dt = time.time() - t0
        if dt < 1.0 and name in recorded:
            times[name] = f"{recorded[name]:.0f} s (done by an earlier run)"
        else:
            recorded[name] = dt
            times[name] = f"{dt:.0f} s"
            with open(times_path + ".tmp", "w") as f:
                json.dump(recorded, f)
            os.replace(times_path + ".tmp", times_path)
        _log(f"stage {name}: {times[name]}")
        return res

    summary = timed("data", stage_data, cfg)
    if until == "data":
        return _p(cfg, "data")
    # Fail before the long stages if a piece the study needs is missing from this build.
    tokenizer = _load_tokenizer(cfg)
    generate = _generate_fn(cfg, tokenizer)

    def encode(frames: np.ndarray) -> np.ndarray:
        return np.asarray(tokenizer.encode(frames))

    tokens = timed("tokenize", stage_tokenize, cfg)
    if until == "tokenize":
        return os.path.dirname(tokens["imagenet"])
    checks = timed("checks", stage_checks, cfg, tokens, summary)
    if until == "checks":
        return _p(cfg, "data-checks.json")
    mix = timed("mix", stage_mix, cfg, tokens)
    if until == "mix":
        return mix
    run = timed("pretrain", stage_pretrain, cfg, mix)
    if until == "pretrain":
        return run
    sweep = timed("sweep", stage_sweep, cfg, mix)
    if until == "sweep":
        return _p(cfg, "sweep")
    mix_coarse = timed("coarse-data", stage_coarse_data, cfg)
    if until == "coarse-data":
        return mix_coarse
    coarse = timed("coarse", stage_coarse, cfg, mix_coarse)
    if until == "coarse":
        return coarse
    fine = timed("fine", stage_fine, cfg, mix, coarse)
    if until == "fine":
        return fine
    scfg = StudyConfig(probe_epochs=cfg.probe_epochs, max_probe_samples=cfg.max_probe_samples,
                       loss_clips=cfg.loss_clips, track_max_frames=cfg.track_max_frames, seed=cfg.seed,
                       video_stride=cfg.stride)
    setup = (
        f"Demo data (seed {cfg.seed}, scale {cfg.data_scale}): {json.dumps(summary)}. Frames at "
        f"{cfg.resolution} px, tokenizer `{cfg.tokenizer}`; mix shares {cfg.ratios}; clips of {cfg.frames} frames at "
        f"stride {cfg.stride} (the paper: 16 at stride 4 at 128 px; the demo clips are 2 s at 16 fps), "
        f"{cfg.images_per_seq} images per image sequence; pre-training preset `{cfg.preset}` "
        f"{' '.join(cfg.pretrain_overrides)}, {cfg.train_tokens:,} training tokens (a fixed budget, not a time "
        f"limit); size sweep widths {', '.join(map(str, cfg.sweep_widths))} besides the main width "
        f"{_main_model(cfg).dim}, {cfg.sweep_tokens:,} tokens each, muP with one learning rate. Coarse-to-fine arm: "
        f"stage A at {cfg.resolution // 2} px, {cfg.c2f_coarse_tokens:,} tokens; stage B `init_from` stage A at "
        f"{cfg.resolution} px with RoPE base {cfg.c2f_rope_theta:g}, {cfg.c2f_fine_tokens:,} tokens; the direct arm "
        f"is the main run ({cfg.train_tokens:,} tokens)."
        + (" QUICK MODE: tiny data and a handful of steps; the numbers below only show that every stage runs."
           if cfg.quick else "")
    )
    path = run_study(
        run, image_task=TaskData("image: object class", tokens["imagenet"]),
        video_task=TaskData("video: object class", tokens["kinetics"]), out_dir=os.path.abspath(cfg.out),
        davis_root=_p(cfg, "data", "davis"), tokenize=encode, resolution=cfg.resolution, generate=generate, cfg=scfg,
        intro="The paper's evaluations run end to end on the embedded demo data on a CPU. Each qualitative "
              "finding of the paper is checked and stated as it came out; nothing is tuned to make it hold.",
        extra_sections=[("Pipeline", setup + "\n\n" + "\n".join(f"- {k}: {v}" for k, v in times.items()))],
        data_checks=checks, scaling_runs=[run] + sweep, c2f_ckpt=fine,
    )
    _log(f"demo finished in {time.time() - t_start:.0f} s: {path}")
    return path


@click.command("demo")
@click.option("--out", default="demo-out", show_default=True, help="Output folder (data, tokens, run, report.md).")
@click.option("--quick", is_flag=True, help="A few-minute variant for CI: ~5% of the data, a handful of steps.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the data, mix, training and probes.")
@click.option("--until", type=click.Choice(STAGES), default="study", show_default=True,
              help="Stop after this stage (e.g. `--until mix` builds the demo token data and OUT/mix.json only; "
                   "`make pretrain` uses it).")
def demo(out: str, quick: bool, seed: int, until: str) -> None:
    """Run the whole study on the embedded demo data: data -> tokenize -> mix -> pretrain -> size sweep ->
    coarse-to-fine arm -> probes, loss by position, label propagation, generation -> OUT/report.md.

    Re-running resumes: finished stages are skipped.

    \b
    Example:
        toto-train demo --out demo-out            # ~15 minutes on 2 CPU cores
        toto-train demo --out demo-quick --quick  # a few minutes
    """
    cfg = DemoConfig.quick_config(out, seed) if quick else DemoConfig(out=out, seed=seed)
    try:
        path = run_demo(cfg, until=until)
    except (ValueError, RuntimeError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(path)
