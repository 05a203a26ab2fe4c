"""Smoke run of the digits example: train a few steps, sample, score, write, reload."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("PIL")

from PIL import Image  # noqa: E402

from ditkernels.diffusion import GaussianDiffusion, RectifiedFlow  # noqa: E402
from ditkernels.examples import digits  # noqa: E402
from ditkernels.models import DiT  # noqa: E402
from ditkernels.train import build_model, model_config  # noqa: E402

# The smoke model is tiny: see conftest.one_thread.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_smoke_run_writes_grid_metrics_and_a_reloadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    metrics = digits.main(["--out", str(out), "--smoke", "--no-progress"])

    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert 0.0 <= metrics["generated_accuracy"] <= 1.0
    assert 0.0 <= metrics["classifier_test_accuracy"] <= 1.0
    assert len(metrics["generated_accuracy_per_class"]) == digits.NUM_CLASSES
    assert metrics["samples"] == digits.NUM_CLASSES * digits.SMOKE_DEFAULTS["samples_per_class"]

    # One row per class, grid_columns samples per row, 1-pixel gutters.
    size, cols = digits.SMOKE_DEFAULTS["image_size"], digits.SMOKE_DEFAULTS["grid_columns"]
    grid = Image.open(out / "samples.png")
    assert grid.size == (cols * (size + 1) + 1, digits.NUM_CLASSES * (size + 1) + 1)

    loaded = digits.load_checkpoint(out / "digits_dit.pt")
    assert isinstance(loaded.model, DiT) and not loaded.model.training
    assert loaded.model_config["input_size"] == size
    assert loaded.model.learn_sigma and loaded.diffusion.model_var_type == "learned_range"
    assert isinstance(loaded.diffusion, GaussianDiffusion)
    assert loaded.classifier is not None
    # ditkernels.sample wrote the scored samples as an ADM npz, every class equally often.
    with np.load(out / "samples_ddim_3.npz") as f:
        assert f["arr_0"].shape == (metrics["samples"], size, size, 3)
        assert f["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(f["arr_1"], np.arange(metrics["samples"]) % 10)

    # Sampling again from the checkpoint, without training, reproduces the samples.
    again = digits.main(["--out", str(tmp_path / "again"), "--smoke", "--no-progress",
                         "--sample-only", "--checkpoint", str(out / "digits_dit.pt")])
    assert (tmp_path / "again" / "samples.png").read_bytes() == (out / "samples.png").read_bytes()
    assert again["generated_accuracy"] == metrics["generated_accuracy"]
    assert again["classifier_test_accuracy"] == metrics["classifier_test_accuracy"]


def test_every_sampler_and_step_count_is_scored(tmp_path):
    metrics = digits.main(["--out", str(tmp_path / "eps"), "--smoke", "--no-progress",
                           "--sampler", "dpm++", "ddim", "ddpm", "--steps", "2", "4"])
    pairs = [(r["sampler"], r["steps"]) for r in metrics["results"]]
    assert pairs == [("dpm++", 2), ("dpm++", 4), ("ddim", 2), ("ddim", 4), ("ddpm", 2),
                     ("ddpm", 4)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in metrics["results"])
    assert (metrics["sampler"], metrics["sampling_steps"]) == ("dpm++", 2)
    assert metrics["generated_accuracy"] == metrics["results"][0]["accuracy"]


def test_flow_objective_trains_a_velocity_model_and_reloads(tmp_path):
    out = tmp_path / "flow"
    metrics = digits.main(["--out", str(out), "--smoke", "--no-progress", "--objective", "flow",
                           "--sampler", "euler", "heun", "--steps", "3"])
    assert metrics["objective"] == "flow"
    assert [r["sampler"] for r in metrics["results"]] == ["euler", "heun"]
    loaded = digits.load_checkpoint(out / "digits_dit.pt")
    assert loaded.objective == "flow" and isinstance(loaded.diffusion, RectifiedFlow)
    assert not loaded.model.learn_sigma
    again = digits.main(["--out", str(tmp_path / "again"), "--smoke", "--no-progress",
                         "--sample-only", "--checkpoint", str(out / "digits_dit.pt"),
                         "--steps", "3"])
    # The checkpoint's objective picks the default sampler, Euler.
    assert again["sampler"] == "euler"
    assert again["generated_accuracy"] == metrics["results"][0]["accuracy"]
    with pytest.raises(ValueError, match="do not apply to a model trained with the 'flow'"):
        digits.main(["--out", str(tmp_path / "bad"), "--smoke", "--no-progress",
                     "--sample-only", "--checkpoint", str(out / "digits_dit.pt"),
                     "--sampler", "dpm++"])


def test_checkpoint_round_trip_preserves_the_model(tmp_path):
    config = model_config("DiT-S/2", input_size=8, in_channels=1, num_classes=10,
                          learn_sigma=False, overrides=dict(hidden_size=32, depth=1, num_heads=2))
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "ck.pt"
    digits.save_checkpoint(path, model, config)
    loaded = digits.load_checkpoint(path)
    assert loaded.classifier is None and loaded.objective == "eps"
    assert loaded.diffusion.model_var_type == "fixed_large"
    assert loaded.diffusion_config == {"learn_sigma": False}
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 5, 10])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t, y), model(x, t, y), atol=0, rtol=0)
    # Checkpoints of the example's own training loop (format 1) are refused clearly.
    old = torch.load(path, weights_only=True)
    old["format"] = "ditkernels.examples.digits/1"
    torch.save(old, path)
    with pytest.raises(ValueError, match="train it again"):
        digits.load_checkpoint(path)


def test_smoke_defaults_yield_to_explicit_flags():
    args = digits.parse_args(["--out", "x", "--smoke", "--image-size", "16"])
    assert args.image_size == 16
    assert args.hidden_size == digits.SMOKE_DEFAULTS["hidden_size"]
    assert digits.parse_args(["--out", "x"]).image_size == 16


def test_module_entry_point(tmp_path):
    # Run from outside the repository: `python -m` puts the working directory first on
    # sys.path, and the source tree has no compiled _C when the package is installed.
    root = Path(digits.__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "ditkernels.examples.digits", "--help"],
                            capture_output=True, text=True, env=env, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for flag in ("--train-steps", "--image-size", "--sampling-steps", "--cfg-scale",
                 "--checkpoint", "--smoke", "--sampler", "--steps", "--objective"):
        assert flag in result.stdout
