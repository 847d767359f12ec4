"""Learning-rate schedules as data: their rates, their checks, that training applies them (bit
for bit as fits with those rates one epoch at a time), and that a resumed run continues them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fastvae import VAE, ConfigError, schedule
from fastvae.cli import main

TINY = {"hidden_dims": (8,), "latent_dim": 2, "threads": 1, "progress": False}


def test_rates_of_each_kind() -> None:
    stages = schedule.check({"kind": "stages", "stages": [[2, 1e-3], [1, 5e-4]]})
    assert [schedule.lr_at(stages, 9.0, e) for e in range(1, 6)] == [1e-3, 1e-3, 5e-4, 5e-4, 5e-4]
    step = schedule.check({"kind": "step", "every": 2, "factor": 0.5})
    assert [schedule.lr_at(step, 1.0, e) for e in range(1, 6)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    exp = schedule.check({"kind": "exponential", "gamma": 0.9})
    assert math.isclose(schedule.lr_at(exp, 2.0, 3), 2.0 * 0.81)
    cos = schedule.check({"kind": "cosine", "epochs": 4, "min_lr": 0.1})
    rates = [schedule.lr_at(cos, 1.1, e) for e in range(1, 7)]
    assert math.isclose(rates[0], 1.1) and math.isclose(rates[2], 0.6)
    assert math.isclose(rates[4], 0.1) and math.isclose(rates[5], 0.1)
    assert schedule.lr_at(None, 3e-4, 17) == 3e-4


def test_the_iwae_papers_schedule() -> None:
    s = schedule.check(schedule.burda())
    assert sum(epochs for epochs, _ in s["stages"]) == 3280
    assert schedule.lr_at(s, 0.0, 1) == 1e-3
    assert math.isclose(schedule.lr_at(s, 0.0, 3280), 1e-3 * 10 ** (-1))
    assert math.isclose(schedule.lr_at(s, 0.0, 4), 1e-3 * 10 ** (-1 / 7))  # 3 epochs at i = 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([1, 2], "None or a dict"),
        ({"kind": "linear"}, "kind must be one of"),
        ({"kind": "step", "every": 0, "factor": 0.5}, "every must be a positive integer"),
        ({"kind": "step", "every": 2, "factor": 0.5, "gamma": 1}, "takes no gamma"),
        ({"kind": "stages", "stages": []}, "non-empty list"),
        ({"kind": "stages", "stages": [[1, -1e-3]]}, r"stages\[0\] lr must be positive"),
        ({"kind": "exponential", "gamma": float("nan")}, "finite"),
        ({"kind": "cosine", "epochs": 3, "min_lr": -1}, "at least 0"),
    ],
)
def test_bad_schedules_are_named(spec: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        schedule.check(spec)
    with pytest.raises(ConfigError, match=message):
        VAE(**TINY, lr_schedule=spec).fit(np.full((8, 3), 0.5))


def test_training_applies_the_rate_of_each_epoch() -> None:
    x = np.random.default_rng(0).random((96, 6)).astype(np.float32)
    spec = {"kind": "stages", "stages": [[1, 3e-3], [1, 4e-4]]}
    scheduled = VAE(**TINY, lr_schedule=spec).fit(x, epochs=3)
    assert scheduled.history_["lr"] == [3e-3, 4e-4, 4e-4]
    by_hand = VAE(**TINY).fit(x, epochs=1, lr=3e-3).fit(x, epochs=2, lr=4e-4)
    for name, w in by_hand.weights().items():
        np.testing.assert_array_equal(scheduled.weights()[name], w, err_msg=name)
    assert scheduled.fit_params_["lr_schedule"] == spec


def test_resume_continues_the_schedule(tmp_path: Path, mnist_dir: Path) -> None:
    spec = json.dumps({"kind": "step", "every": 1, "factor": 0.5})
    common = ["--data", str(mnist_dir), "--hidden-dims", "16", "--latent-dim", "2"]
    common += ["--threads", "1", "--no-progress", "--lr", "2e-3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *common, "--out", str(straight), "--epochs", "2",
                 "--lr-schedule", spec]) == 0  # fmt: skip
    assert main(["train", *common, "--out", str(resumed), "--epochs", "1",
                 "--lr-schedule", spec]) == 0  # fmt: skip
    # Resumed without --lr-schedule: the saved schedule continues at its second epoch.
    assert main(["train", *common, "--out", str(resumed), "--epochs", "2", "--resume"]) == 0
    a = VAE.load(straight / "model.safetensors")
    b = VAE.load(resumed / "model.safetensors")
    assert a.history_["lr"] == b.history_["lr"] == [2e-3, 1e-3]
    for name, w in a.weights().items():
        np.testing.assert_array_equal(b.weights()[name], w, err_msg=name)
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["lr"] for line in lines] == [2e-3, 1e-3]


def test_adam_eps_reaches_the_optimizer_and_is_saved(tmp_path: Path) -> None:
    x = np.random.default_rng(1).random((64, 5)).astype(np.float32)
    default = VAE(**TINY).fit(x, epochs=2)
    same = VAE(**TINY, adam_eps=1e-8).fit(x, epochs=2)
    paper = VAE(**TINY, adam_eps=1e-4).fit(x, epochs=2)
    w0, w1, w2 = default.weights(), same.weights(), paper.weights()
    assert all(np.array_equal(w0[k], w1[k]) for k in w0)
    assert any(not np.array_equal(w0[k], w2[k]) for k in w0)
    assert paper.fit_params_["adam_eps"] == 1e-4
    paper.save(tmp_path / "m.safetensors")
    assert VAE.load(tmp_path / "m.safetensors").fit_params_["adam_eps"] == 1e-4
    with pytest.raises(ConfigError, match="adam_eps"):
        VAE(**TINY, adam_eps=0.0).fit(x)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_output_bias_from_data(likelihood: str) -> None:
    rng = np.random.default_rng(2)
    x = rng.random((200, 6)).astype(np.float32)
    x[:, 0] = 0.0  # a pixel that is never on: its mean clips to 0.001
    if likelihood == "gaussian":
        x = x * 4.0 - 1.0
    mean = x.astype(np.float64).mean(axis=0)
    if likelihood == "bernoulli":
        p = np.clip(mean, 0.001, 0.999)
        want = np.log(p / (1 - p))
    else:
        want = mean
    # A rate far too small to move the weights: the bias is where the build put it.
    settings = {**TINY, "likelihood": likelihood, "lr": 1e-12, "epochs": 1}
    vae = VAE(**settings, output_bias_from_data=True).fit(x)
    np.testing.assert_allclose(vae.weights()["decoder.1.bias"], want, rtol=1e-5, atol=1e-6)
    plain = VAE(**settings).fit(x).weights()["decoder.1.bias"]
    assert np.max(np.abs(plain - want)) > 0.5
