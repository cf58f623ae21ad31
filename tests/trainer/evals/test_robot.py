"""Behaviour cloning from frozen features: the pushing task (physics, rendering, the expert), the
policy learning it from the true state, and `toto-train robot` end to end (tiny model, demo tokenizer)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from schemas import validate
from trainer.evals.robot import (
    RobotConfig,
    collect_demos,
    evaluate_policy,
    pixel_encoder,
    state_encoder,
    train_policy,
)
from trainer.evals.robot_env import PushConfig, PushEnv, expert_action, render


def test_the_expert_solves_every_episode_and_episodes_are_seeded():
    cfg = PushConfig()
    steps = []
    for seed in range(30):
        env = PushEnv(cfg, seed)
        while not env.done:
            env.step(expert_action(cfg, env.state()))
        assert env.success, f"expert failed episode {seed}"
        assert env.distance() <= cfg.success_radius
        steps.append(env.steps)
    assert 5 < np.mean(steps) < 0.5 * cfg.max_steps
    a, b, c = PushEnv(cfg, 3), PushEnv(cfg, 3), PushEnv(cfg, 4)
    assert np.array_equal(a.frame(), b.frame()) and not np.array_equal(a.frame(), c.frame())
    for _ in range(5):  # the same actions give the same trajectory
        a.step([0.3, -0.8])
        b.step([0.3, -0.8])
    assert a.state()["block"].tolist() == b.state()["block"].tolist()
    assert np.array_equal(a.proprio(), b.proprio())


def test_an_idle_pusher_moves_nothing_and_a_push_moves_the_block():
    cfg = PushConfig()
    env = PushEnv(cfg, 0)
    before = env.state()
    env.step([0.0, 0.0])
    assert np.allclose(env.state()["block"], before["block"]) and np.allclose(env.state()["pusher"], before["pusher"])
    # Pushing from behind moves the block towards the goal; the pusher never leaves the table.
    moved = 0.0
    while not env.done:
        env.step(expert_action(cfg, env.state()))
        moved = max(moved, float(np.linalg.norm(env.state()["block"] - before["block"])))
        p = env.state()["pusher"]
        assert (p >= cfg.pusher_radius - 1e-6).all() and (p <= 1 - cfg.pusher_radius + 1e-6).all()
    assert moved > cfg.min_start_distance - cfg.success_radius
    with pytest.raises(ValueError, match="not finite"):
        env.step([float("nan"), 0.0])


def test_the_frame_shows_block_pusher_and_goal_where_the_state_says():
    cfg = PushConfig(resolution=64)
    img = render(cfg, np.array([0.8, 0.2]), np.array([0.3, 0.7]), math.pi / 4)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8

    def at(x, y):
        return img[int(y * 64), int(x * 64)].astype(int)

    assert at(0.3, 0.7)[2] > 150 and at(0.3, 0.7)[0] < 80  # block: blue
    assert at(0.8, 0.2)[0] > 150 and at(0.8, 0.2)[2] < 80  # pusher: red
    assert at(0.5, 0.5)[1] > 150 and at(0.5, 0.5)[0] < 150  # goal pad: green
    # A block turned 45°: its corner reaches half a diagonal along the axis, beyond half a side.
    reach = 0.3 + cfg.block_size * 0.5 * math.sqrt(2) - 0.01
    assert at(reach, 0.7)[0] < 80 and at(0.3 + cfg.block_size * 0.5 + 0.005, 0.7 + 0.05)[0] > 150  # block, table


def test_demonstrations_record_the_clean_action_and_the_observation():
    cfg = PushConfig()
    d = collect_demos(cfg, 3, noise=0.3, seed=0)
    n = len(d["actions"])
    assert d["frames"].shape == (n, 64, 64, 3) and d["proprio"].shape == (n, 4) and d["states"].shape == (n, 6)
    assert sorted(set(d["episode"].tolist())) == [0, 1, 2]
    # The recorded action is the expert's for the state it saw (the executed one had noise added).
    first = PushEnv(cfg, 0)
    assert np.allclose(d["actions"][0], expert_action(cfg, first.state()), atol=1e-6)
    assert np.array_equal(d["frames"][0], first.frame())
    assert (np.linalg.norm(d["actions"], axis=1) <= 1 + 1e-6).all()
    assert d["success"].shape == (3,)


def test_a_policy_given_the_true_pose_learns_the_task_and_one_given_nothing_does_not():
    cfg = PushConfig()
    rc = RobotConfig(demos=60, episodes=20, epochs=100, encoders=("state",))
    demos = collect_demos(cfg, rc.demos, rc.noise, seed=0)
    prop, act = torch.from_numpy(demos["proprio"]), torch.from_numpy(demos["actions"])
    seeds = [10_000 + i for i in range(rc.episodes)]

    def scored(encoder):
        policy, mse = train_policy(encoder(demos["frames"], demos["states"]), prop, act, rc)

        def actor(frames, p, s):
            with torch.no_grad():
                return policy(encoder(frames, s), torch.from_numpy(p)).numpy()

        return evaluate_policy(cfg, actor, seeds), mse

    seen, mse = scored(state_encoder)
    blind, blind_mse = scored(lambda frames, states: torch.zeros(len(frames), 1, 6))  # proprioception only
    # Measured: 45% of 20 episodes (train MSE 0.078) with the pose, 0% (MSE 0.150) without: cloning
    # a contact-rich expert from 60 demonstrations is far from perfect even with perfect
    # perception, which is why every encoder is reported beside this ceiling.
    assert seen["success_rate"] >= 0.3 and mse < 0.1 and blind_mse > 1.5 * mse
    assert blind["success_rate"] <= 0.1 and seen["success_rate"] - blind["success_rate"] >= 0.25


def test_pixel_patches_follow_the_token_grid():
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    frames[1, 8:16, 0:8] = 255  # patch (row 1, col 0) of the 2x2 grid of 8 px patches
    x = pixel_encoder(8)(frames, None)
    assert x.shape == (2, 4, 192)
    assert float(x[1, 2].min()) == 1.0 and float(x[1, [0, 1, 3]].max()) == 0.0 and float(x[0].max()) == 0.0
    with pytest.raises(ValueError, match="8 px patches"):
        pixel_encoder(8)(np.zeros((1, 12, 12, 3), np.uint8), None)


def test_robot_command_end_to_end(tmp_path, demo_checkpoint):
    from trainer.cli import main

    demo_checkpoint(str(tmp_path / "run"), max_seq_len=1 + 64, grid=(8, 8))
    res = CliRunner().invoke(main, ["robot", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--demos", "4",
                                    "--episodes", "3", "--epochs", "2", "--hidden", "32", "--max-steps", "30",
                                    "--threads", "1"])
    assert res.exit_code == 0, res.output
    doc = validate(json.loads((tmp_path / "out" / "robot.json").read_text()), "robot_result")
    assert set(doc["results"]) == {"toto", "random", "pixels", "state"}
    assert doc["layer"] == 1 and doc["resolution"] == 64 and doc["patch"] == 8
    assert doc["counts"]["demo_episodes"] == 4 and doc["counts"]["eval_episodes"] == 3
    assert doc["expert"]["success_rate"] == 1.0  # 30 steps suffice for the expert on these seeds
    shapes = {k: v["feature_shape"] for k, v in doc["results"].items()}
    assert shapes == {"toto": [64, 32], "random": [64, 32], "pixels": [64, 192], "state": [1, 6]}
    for v in doc["results"].values():
        assert v["episodes_succeeded"] == round(3 * v["success_rate"]) and 0 < v["mean_steps"] <= 30
    assert "success rate  toto" in res.output
    bad = CliRunner().invoke(main, ["robot", str(tmp_path / "run"), "--out", str(tmp_path / "o2"), "--encoders", "toto,dino"])
    assert bad.exit_code != 0 and "pick distinct names from toto, random, pixels, state" in bad.output
    assert "Traceback" not in bad.output


def test_image_features_are_the_frames_tokens_after_bos_image(tmp_path, demo_checkpoint):
    from trainer.checkpoint import load_model
    from trainer.evals.robot import image_encoder
    from trainer.evals.run import frame_tokenizer_from_meta

    model, meta = load_model(demo_checkpoint(str(tmp_path / "run"), max_seq_len=1 + 64, grid=(8, 8)))
    tokenize = frame_tokenizer_from_meta(meta)
    frames = np.stack([PushEnv(PushConfig(), s).frame() for s in range(3)])
    got = image_encoder(model, meta, 1, tokenize, batch=2)(frames, None)  # two batches
    toks = torch.from_numpy(np.asarray(tokenize(frames)).reshape(3, 64).astype(np.int64))
    seq = torch.cat([torch.full((3, 1), meta["specials"]["bos_image"]), toks], 1)  # (3, 65)
    with torch.no_grad():
        want = model.features(seq, [1])[0][:, 1:]  # the frame's 64 positions
    assert got.shape == (3, 64, 32)
    torch.testing.assert_close(got, want)
