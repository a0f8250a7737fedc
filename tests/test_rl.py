"""RL-DARTS (``--task rl``, morphnas.rl): PPO's formulas against hand computation, the MinAtar
wrapper against the game itself, exact resume, a whole tiny run through the CLI, bad input."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli, without_times
from morphnas.engine import faults
from morphnas.rl.agent import Agent, MinAtarCNN, calibrate_batchnorm, with_coordinates
from morphnas.rl.envs import MinAtarVec
from morphnas.rl.loop import Curve, PPOLoop, PPOSettings
from morphnas.rl.plots import per_update
from morphnas.rl.ppo import gae, ppo_loss

# The games come with the rl extra (`pip install 'morphnas[rl]'`, installed by `make setup`).
needs_minatar = pytest.mark.skipif(
    importlib.util.find_spec("minatar") is None, reason="the rl extra (minatar) is not installed"
)

# A whole run in seconds: two games, 8-step rollouts, two updates a phase.
TINY = {
    "envs": 2, "steps": 8, "updates": 2, "retrain_updates": 2, "eval_episodes": 2,
    "checkpoint_every": 1, "max_steps": 50,
}  # fmt: skip


def _tiny(**changes: int) -> list[str]:
    """The command-line arguments of a tiny RL search, ``changes`` to its ``rl`` section."""
    sets = [
        arg for key, value in {**TINY, **changes}.items() for arg in ("--set", f"rl.{key}={value}")
    ]
    return ["--task", "rl", "--env", "breakout", "--threads", "1", *sets]


TINY_RL = _tiny()


# --------------------------------------------------------------------------- PPO's formulas


def _gae_by_definition(rewards, values, ended, last_value, gamma, lam):
    """``A_t = Σ_k (γλ)^k δ_{t+k}``, summed term by term until the episode ends (one game)."""
    steps = len(rewards)
    advantages = []
    for t in range(steps):
        total, weight = 0.0, 1.0
        for k in range(t, steps):
            next_value = last_value if k == steps - 1 else values[k + 1]
            delta = rewards[k] + gamma * next_value * (1 - ended[k]) - values[k]
            total += weight * delta
            if ended[k]:
                break
            weight *= gamma * lam
        advantages.append(total)
    return advantages


def test_gae_matches_its_definition_and_a_hand_computation() -> None:
    rewards = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    values = torch.tensor([[0.5, 0.1], [0.2, 0.3], [0.4, 0.0], [0.1, 0.6]])
    ended = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    last = torch.tensor([0.7, -0.2])
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, ended, last, gamma, lam)
    for game in range(2):
        expected = _gae_by_definition(
            rewards[:, game].tolist(), values[:, game].tolist(), ended[:, game].tolist(),
            float(last[game]), gamma, lam,
        )  # fmt: skip
        assert advantages[:, game].tolist() == pytest.approx(expected, abs=1e-6)
    # By hand, game 0: step 1 ends its episode, so A_1 = r_1 − V_1 = −0.2 and
    # A_0 = δ_0 + γλ A_1 = (1 + 0.9·0.2 − 0.5) + 0.72·(−0.2) = 0.536.
    assert float(advantages[1, 0]) == pytest.approx(-0.2)
    assert float(advantages[0, 0]) == pytest.approx(0.536)
    assert torch.allclose(returns, advantages + values)


def test_clipped_ppo_loss_matches_a_hand_computation() -> None:
    old = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    new = torch.log(torch.tensor([0.8, 0.3, 0.55]))  # ratios 1.6, 0.6, 1.1
    advantages = torch.tensor([1.0, -1.0, 3.0])
    value = torch.tensor([1.0, 0.0, 2.0])
    old_value = torch.tensor([0.5, 0.0, 2.5])
    returns = torch.tensor([2.0, 1.0, 2.0])
    entropy = torch.tensor([1.0, 0.5, 0.0])
    parts = ppo_loss(
        new, old, advantages, value, old_value, returns, entropy,
        clip=0.2, value_clip=0.2, value_coef=0.5, entropy_coef=0.01,
    )  # fmt: skip
    # Normalised advantages: mean 1, population std sqrt(8/3).
    std = math.sqrt(8 / 3)
    adv = [0.0, -2 / std, 2 / std]
    ratios = [1.6, 0.6, 1.1]
    surrogate = [
        min(r * a, min(max(r, 0.8), 1.2) * a) for r, a in zip(ratios, adv, strict=True)
    ]  # 0; −2/std·0.8 (clipped: the pessimistic one); 1.1·2/std
    policy = -sum(surrogate) / 3
    # Values: clipped to V_old ± 0.2 = 0.7, 0.0, 2.3; squared errors max'ed with the clipped.
    value_loss = 0.5 * (max(1.0, 1.69) + max(1.0, 1.0) + max(0.0, 0.09)) / 3
    total = policy + 0.5 * value_loss - 0.01 * 0.5
    assert parts.policy == pytest.approx(policy, rel=1e-5)
    assert parts.value == pytest.approx(value_loss, rel=1e-5)
    assert parts.entropy == pytest.approx(0.5)
    assert float(parts.total) == pytest.approx(total, rel=1e-5)
    assert parts.clip_fraction == pytest.approx(2 / 3)  # 1.6 and 0.6 lie outside 1 ± 0.2


def test_ppo_loss_without_value_clip_is_half_the_squared_error() -> None:
    zeros = torch.zeros(2)
    parts = ppo_loss(
        zeros, zeros, torch.tensor([1.0, -1.0]), torch.tensor([1.0, 3.0]), zeros,
        torch.tensor([0.0, 1.0]), zeros, clip=0.2, value_clip=0.0, value_coef=1.0,
        entropy_coef=0.0,
    )  # fmt: skip
    assert parts.value == pytest.approx(0.5 * (1 + 4) / 2)


# --------------------------------------------------------------------------- the games


def _seeded_games(n: int, seed: list[int]) -> list:
    """MinAtar's own environments, seeded as ``MinAtarVec`` seeds its games."""
    import minatar
    import numpy as np

    games = []
    for own in np.random.SeedSequence(seed).generate_state(n):
        env = minatar.Environment("breakout")
        env.seed(int(own))
        env.reset()
        games.append(env)
    return games


@needs_minatar
def test_minatar_wrapper_plays_the_game_itself_on_a_fixed_seed() -> None:
    vec = MinAtarVec("breakout", 2, [5, 0], max_steps=30)
    games = _seeded_games(2, [5, 0])
    generator = torch.Generator().manual_seed(0)
    episode = [0.0, 0.0]
    lengths = [0, 0]
    ended_returns = []
    for _ in range(120):
        actions = torch.randint(0, vec.n_actions, (2,), generator=generator)
        expected_obs = []
        for i, env in enumerate(games):
            reward, terminal = env.act(vec.actions[int(actions[i])])
            episode[i] += reward
            lengths[i] += 1
            if terminal or lengths[i] >= 30:  # the cut at max_steps is an ending too
                ended_returns.append((i, episode[i]))
                episode[i], lengths[i] = 0.0, 0
                env.reset()
            expected_obs.append(torch.from_numpy(env.state()).permute(2, 0, 1).float())
        obs, _, _, finished = vec.step(actions)
        for i, value in finished.items():
            assert (i, value) in ended_returns
        assert torch.equal(obs, torch.stack(expected_obs))
    assert vec.actions == [0, 1, 3]  # Breakout's minimal set: no-op, left, right
    assert len(ended_returns) > 4  # several episodes, some of them cut


@needs_minatar
def test_game_state_survives_a_checkpoint_mid_episode() -> None:
    vec = MinAtarVec("seaquest", 2, [1, 0], max_steps=500)
    generator = torch.Generator().manual_seed(1)
    for _ in range(40):
        vec.step(torch.randint(0, vec.n_actions, (2,), generator=generator))
    buffer = io.BytesIO()
    torch.save(vec.state_dict(), buffer)
    buffer.seek(0)
    other = MinAtarVec("seaquest", 2, [99, 0], max_steps=500)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(60):
        actions = torch.randint(0, vec.n_actions, (2,), generator=generator)
        a, b = vec.step(actions), other.step(actions)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[3] == b[3]


def test_coordinate_planes_span_rows_and_columns() -> None:
    x = with_coordinates(torch.zeros(1, 4, 10, 10))
    assert x.shape == (1, 6, 10, 10)
    assert x[0, 4, 0, 3] == -1 and x[0, 4, 9, 3] == 1  # rows
    assert x[0, 5, 3, 0] == -1 and x[0, 5, 3, 9] == 1  # columns


def test_batchnorm_calibration_sets_each_norm_to_its_inputs_statistics() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 5, 3), torch.nn.BatchNorm2d(5, affine=False),
    )  # fmt: skip
    x = torch.randn(16, 3, 9, 9)
    net[1].running_mean.fill_(7.0)  # stale statistics are replaced, not averaged in
    calibrate_batchnorm(net, x)
    assert not net.training and net[1].momentum == 0.1
    with torch.no_grad():  # by hand: each norm's input, the first normalised by its batch's
        first = net[0](x)
        mean, var = first.mean(dim=(0, 2, 3), keepdim=True), first.var(dim=(0, 2, 3), keepdim=True)
        normalised = (first - mean) / torch.sqrt(var * (len(x) * 49 - 1) / (len(x) * 49) + 1e-5)
        scaled = normalised * net[1].weight.view(1, -1, 1, 1) + net[1].bias.view(1, -1, 1, 1)
        second = net[3](torch.relu(scaled))
    for norm, seen in ((net[1], first), (net[4], second)):
        assert torch.allclose(norm.running_mean, seen.mean(dim=(0, 2, 3)), atol=1e-5)
        assert torch.allclose(norm.running_var, seen.var(dim=(0, 2, 3)), atol=1e-5)


def test_the_curve_is_averaged_per_update_and_since_an_update() -> None:
    curve = Curve(updates=[0, 0, 2, 3], returns=[1.0, 3.0, 5.0, 0.0])
    updates, means = per_update(curve)
    assert updates.tolist() == [0, 2, 3] and means.tolist() == [2.0, 5.0, 0.0]
    assert curve.mean_since(2) == 2.5 and curve.mean_since(4) is None


# --------------------------------------------------------------------------- resume


def _loop(seed: int) -> PPOLoop:
    torch.manual_seed(seed)
    agent = Agent(MinAtarCNN(6), 3, 16).eval()
    games = MinAtarVec("breakout", 2, [3, 0], max_steps=40)
    return PPOLoop(agent, games, PPOSettings(steps=8, epochs=1, minibatches=2), seed=7)


@needs_minatar
def test_a_loop_restored_from_its_checkpoint_ends_as_the_uninterrupted_one() -> None:
    straight = _loop(0)
    straight.run(4, lambda row: None)
    first = _loop(0)
    first.run(2, lambda row: None)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = _loop(1)  # other weights: all of it must come from the checkpoint
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    resumed.run(4, lambda row: None)
    assert straight.curve == resumed.curve
    for a, b in zip(straight.agent.parameters(), resumed.agent.parameters(), strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- whole runs


def _finished(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"summary": without_times(summary), "metrics": without_times(rows)}


@needs_minatar
def test_a_tiny_rl_run_writes_its_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, errors = run_cli("search", *TINY_RL, "--out", str(out))
    assert code == 0, errors
    summary = json.loads((out / "summary.json").read_text())
    assert [row["model"] for row in summary["results"]] == ["supernet", "searched", "minatar_cnn"]
    for row in summary["results"]:
        assert math.isfinite(row["eval_return"]) and row["eval_return"] >= 0
        assert row["updates"] == 2
    assert summary["env"] == "breakout" and summary["frames_per_update"] == 16
    genotype = json.loads((out / "genotype.json").read_text())
    assert genotype["space"] == "darts_cnn" and genotype["metadata"]["strategy"] == "rl-darts"
    for node in genotype["nodes"]:  # DARTS's read-out: two different inputs, never `none`
        assert len(set(node["inputs"])) == 2 and "none" not in node["op"]
    config = (out / "config.yaml").read_text()
    assert "env: breakout" in config and "task: rl" in config
    phases = [row["phase"] for row in _finished(out)["metrics"] if "update" in row]
    assert phases == ["supernet"] * 2 + ["searched"] * 2 + ["minatar_cnn"] * 2
    assert (out / "plots" / "returns.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "models").iterdir()) == ["minatar_cnn.pt", "searched.pt"]


@needs_minatar
def test_a_stopped_rl_run_resumes_to_the_uninterrupted_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_cli("search", *TINY_RL, "--out", str(straight))[0] == 0
    # SIGTERM in the retraining of the searched cell (update 3 of 6): a clean stop.
    monkeypatch.setattr(faults, "_passed", faults.Counter())
    monkeypatch.setenv("MORPHNAS_CRASH_AT", "rl-update:3:TERM")
    code, _ = run_cli("search", *TINY_RL, "--out", str(stopped))
    assert code != 0 and not (stopped / "summary.json").exists()
    monkeypatch.delenv("MORPHNAS_CRASH_AT")
    assert run_cli("search", "--resume", str(stopped))[0] == 0
    assert _finished(stopped) == _finished(straight)


@needs_minatar
@pytest.mark.long
def test_an_rl_run_killed_mid_phase_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """SIGKILL (no chance to save) between two checkpoints of the supernet's phase."""
    args = _tiny(checkpoint_every=2, updates=5)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    command = [sys.executable, "-m", "morphnas", "search", *args]
    subprocess.run([*command, "--out", str(straight)], check=True, capture_output=True)
    env = {**os.environ, "MORPHNAS_CRASH_AT": "rl-update:3"}
    done = subprocess.run([*command, "--out", str(killed)], env=env, capture_output=True)
    assert done.returncode == -signal.SIGKILL
    subprocess.run(
        [sys.executable, "-m", "morphnas", "search", "--resume", str(killed)],
        check=True,
        capture_output=True,
    )
    assert _finished(killed) == _finished(straight)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--env", "pong"], "unknown env 'pong'"),
        (["--env", "breakuot"], "did you mean 'breakout'"),
        (["--set", "rl.envs=0"], "rl.envs"),
        (["--set", "rl.gamma=1.5"], "rl.gamma"),
        (["--baseline", "lstm"], None),
    ],
)
def test_bad_rl_input_is_a_one_line_error(tmp_path: Path, args: list[str], fragment) -> None:
    if fragment is None:  # `train` has no RL loop
        code, errors = run_cli("train", "--task", "rl", *args, "--out", str(tmp_path / "r"))
        fragment = "--task rl"
    else:
        code, errors = run_cli("search", "--task", "rl", *args, "--out", str(tmp_path / "r"))
    assert code == 2 and len(errors) == 1, errors
    assert fragment in errors[0]
    assert not (tmp_path / "r").exists()


def test_rl_refuses_foreign_baselines(tmp_path: Path) -> None:
    code, errors = run_cli(
        "search", "--task", "rl", "--set", "train.baselines=[lstm]", "--out", str(tmp_path / "r")
    )
    assert code == 2 and "minatar_cnn" in errors[0]


def test_without_the_rl_extra_the_run_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "minatar", None)  # import minatar raises ImportError
    code, errors = run_cli("search", *TINY_RL, "--out", str(tmp_path / "r"))
    assert code == 2 and len(errors) == 1 and "morphnas[rl]" in errors[0]
    assert not (tmp_path / "r").exists()
