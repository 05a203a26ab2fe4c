"""Train a small class-conditional DiT on scikit-learn's 8x8 digits, on a CPU, and sample it.

    python -m ditkernels.examples.digits --out runs/digits
    python -m ditkernels.examples.digits --out runs/digits --sample-only   # reuse the checkpoint
    python -m ditkernels.examples.digits --out runs/digits --sample-only \
        --sampler ddim dpm++ --steps 10 20 50          # accuracy per sampler and step count
    python -m ditkernels.examples.digits --out runs/flow --objective flow --sampler euler heun \
        --steps 10 20                                  # a flow-matching (rectified-flow) DiT

A thin user of the entry points: the training split, upsampled to 16x16, goes into a
latents npz (OUT/train/digits_latents.npz) that ``ditkernels.train`` trains a DiT on
(learned sigma, IDDPM hybrid loss, label dropout for classifier-free guidance);
``ditkernels.sample`` samples every class equally often with DDIM, DDPM or
DPM-Solver++(2M) + classifier-free guidance into ADM npz files
(OUT/samples_SAMPLER_STEPS.npz, which ``ditkernels.evaluate`` can score). This example
adds the rest: a small CNN trained on the same training split scores the samples (the
class-conditional accuracy of the generated digits, per sampler and step count), and a
PNG grid shows them (one row per class). With --objective flow the DiT learns the
rectified-flow velocity instead (logit-normal t) and samples with Euler or Heun steps.
The checkpoint holds the EMA DiT with its ditkernels.train config, and the classifier
(load_checkpoint; ``python -m ditkernels.sample --ckpt`` reads it too).

The defaults (DiT with 4x4 patches over 16x16, hidden 128, depth 4; 2000 AdamW steps of
batch 64) train in about 4-5 minutes on a 2-core CPU.

Needs scikit-learn (the data) and Pillow (the PNG): pip install scikit-learn pillow.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import sample as sample_lib
from .. import train as train_lib
from ..diffusion import GaussianDiffusion, RectifiedFlow
from ..diffusion.dpm_solver import SKIP_TYPES
from ..diffusion.flow import T_SAMPLINGS
from ..models import DiT

NUM_CLASSES = 10
# 2: a ditkernels.train config and EMA weights, which ditkernels.sample reads.
CHECKPOINT_FORMAT = "ditkernels.examples.digits/2"

# The samplers each training objective supports; the first is the default.
SAMPLERS = {"eps": ("ddim", "ddpm", "dpm++"), "flow": ("euler", "heun")}

# Flags that --smoke changes: a model and run small enough for a unit test.
SMOKE_DEFAULTS = dict(image_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                      train_steps=4, batch_size=16, classifier_steps=4, sampling_steps=[3],
                      samples_per_class=2, grid_columns=2)


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


def load_digits_split(image_size: int, test_fraction: float = 0.2, seed: int = 0):
    """(x_train, y_train, x_test, y_test): images [N, 1, S, S] in [-1, 1], int64 labels.

    The split is stratified and fixed by ``seed``; both the DiT and the classifier
    train on the training split only, so the test split is unseen by either.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError("the digits example needs scikit-learn: "
                          "pip install scikit-learn") from exc
    digits = load_digits()
    # Pixel values are counts 0..16 of an 8x8 grid.
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               align_corners=False)
    idx_train, idx_test = train_test_split(torch.arange(len(labels)).numpy(),
                                           test_size=test_fraction, random_state=seed,
                                           stratify=labels.numpy())
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test]


# ---------------------------------------------------------------------------
# the scoring classifier
# ---------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """A small CNN for [B, 1, S, S] digits in [-1, 1], S a multiple of 4.

    Pooling before the wider convolutions keeps it at about 1.3 MFLOP per 16x16 image,
    so it trains in seconds next to the DiT on a CPU.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(16 * width, NUM_CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _random_shift(x: Tensor, generator: torch.Generator, max_shift: int) -> Tensor:
    """Translate each image by up to max_shift pixels, filling with background (-1).

    Generated digits are not centred exactly like the training digits; a classifier
    that has seen small shifts judges their shape rather than their position.
    """
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    size = x.shape[-1]
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=generator)
    return torch.stack([pad[i, :, dy:dy + size, dx:dx + size]
                        for i, (dy, dx) in enumerate(offsets.tolist())])


def train_classifier(x: Tensor, y: Tensor, steps: int, batch_size: int = 128, seed: int = 0,
                     width: int = 16) -> DigitClassifier:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier(width)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    max_shift = max(1, x.shape[-1] // 16)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(_random_shift(x[idx], generator, max_shift)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def classify(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


# ---------------------------------------------------------------------------
# diffusion training: ditkernels.train on the digits as a latents npz
# ---------------------------------------------------------------------------


def write_latents(path, x: Tensor, y: Tensor) -> None:
    """The training split as ``python -m ditkernels.train --latents`` reads it."""
    np.savez(path, latents=x.numpy(), labels=y.numpy())


def train_argv(args: argparse.Namespace, latents, results_dir) -> List[str]:
    """The ditkernels.train command line of this example's recipe: AdamW with a linear
    warmup over min(100, steps / 10) steps then a cosine decay to 10% of --lr (short runs
    end at a low lr), an EMA with warmup, label dropout 0.1 for classifier-free
    guidance, on the CPU."""
    size = args.patch_size if args.patch_size in (2, 4, 8) else 2
    overrides = dict(patch_size=args.patch_size, hidden_size=args.hidden_size,
                     depth=args.depth, num_heads=args.num_heads)
    argv = ["--model", f"DiT-S/{size}", "--model-kwargs", json.dumps(overrides),
            "--latents", latents, "--results-dir", results_dir, "--device", "cpu",
            "--objective", args.objective, "--t-sampling", args.t_sampling,
            "--class-dropout-prob", 0.1, "--global-batch-size", args.batch_size,
            "--max-steps", args.train_steps, "--lr", args.lr,
            "--warmup-steps", max(1, min(100, args.train_steps // 10)),
            "--lr-schedule", "cosine", "--final-lr-fraction", 0.1,
            "--ema-decay", args.ema_decay, "--ema-warmup", "--seed", args.seed,
            "--log-every", args.train_steps if args.no_progress else 100,
            "--ckpt-every", args.train_steps]
    if args.objective == "eps" and not args.learn_sigma:
        argv.append("--no-learn-sigma")
    return [str(a) for a in argv]


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class DigitsCheckpoint:
    """What load_checkpoint returns: the EMA DiT (eval mode) and its ditkernels.train
    config, the base (unrespaced) diffusion or the flow and the kwargs that make it
    (create_diffusion's or RectifiedFlow's), the scoring classifier, the run's metadata
    and the training objective ("eps" or "flow")."""

    model: DiT
    model_config: Dict
    diffusion: Union[GaussianDiffusion, RectifiedFlow]
    diffusion_config: Dict
    classifier: Optional[DigitClassifier]
    metadata: Dict
    objective: str = "eps"


def save_checkpoint(path, model: DiT, model_config: Dict,
                    classifier: Optional[DigitClassifier] = None,
                    metadata: Optional[Dict] = None) -> None:
    """torch.save the (EMA) model's weights under "ema" with its ditkernels.train
    ``model_config`` (so ``python -m ditkernels.sample --ckpt`` reads the file), and
    optionally the classifier: plain tensors and builtins, for weights_only loading."""
    ckpt = {"format": CHECKPOINT_FORMAT, "config": dict(model_config),
            "ema": model.state_dict(), "metadata": dict(metadata or {})}
    if classifier is not None:
        ckpt["classifier_config"] = {"width": classifier.net[0].out_channels}
        ckpt["classifier_state_dict"] = classifier.state_dict()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)


def load_checkpoint(path, map_location="cpu") -> DigitsCheckpoint:
    """Rebuild what save_checkpoint stored; the DiT loads with strict=True."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (format "
                         f"{ckpt.get('format')!r}); train it again with this example")
    config = ckpt["config"]
    model = train_lib.build_model(config)
    model.load_state_dict(ckpt["ema"], strict=True)
    classifier = None
    if "classifier_state_dict" in ckpt:
        classifier = DigitClassifier(**ckpt["classifier_config"])
        classifier.load_state_dict(ckpt["classifier_state_dict"], strict=True)
        classifier.eval()
    objective = train_lib.objective_of(config)
    diffusion_config = (dict(t_sampling=config["t_sampling"]) if objective == "flow"
                        else dict(learn_sigma=config["learn_sigma"]))
    return DigitsCheckpoint(model=model.eval(), model_config=config,
                            diffusion=train_lib.training_process(config),
                            diffusion_config=diffusion_config, classifier=classifier,
                            metadata=ckpt["metadata"], objective=objective)


# ---------------------------------------------------------------------------
# sampling (ditkernels.sample) and output
# ---------------------------------------------------------------------------


def sample_digits(checkpoint, out, *, num_samples: int, sampling_steps: int, cfg_scale: float,
                  sampler: str = "ddim", eta: float = 0.0, skip_type: str = "logSNR",
                  seed: int = 0, batch_size: int = 250) -> Tuple[Tensor, Tensor]:
    """(samples [N, 1, S, S] in [-1, 1], labels [N]), class-major (every class
    N / NUM_CLASSES times), from ``python -m ditkernels.sample`` with balanced labels,
    which also leaves its ADM npz at ``out``.

    sampler: "ddim" (eta), "ddpm" (ancestral, respaced to sampling_steps) or "dpm++"
    (DPM-Solver++(2M), steps placed by skip_type) for an eps checkpoint; "euler" or
    "heun" for a flow one. Predicted x_0 are clipped to [-1, 1].
    """
    steps = f"ddim{sampling_steps}" if sampler == "ddim" else str(sampling_steps)
    sample_lib.main([str(a) for a in (
        "--ckpt", checkpoint, "--out", out, "--num-samples", num_samples,
        "--batch-size", batch_size, "--sampler", sampler, "--steps", steps, "--eta", eta,
        "--skip-type", skip_type, "--cfg-scale", cfg_scale, "--clip-denoised",
        "--labels", "balanced", "--seed", seed, "--device", "cpu")])
    with np.load(out) as f:
        images, labels = torch.from_numpy(f["arr_0"][..., :1]), torch.from_numpy(f["arr_1"])
    # uint8 u holds the pixels in [(u - 128) / 127.5, (u - 127) / 127.5): take the middle.
    samples = (images.permute(0, 3, 1, 2).float() - 127.5) / 127.5
    order = torch.argsort(labels, stable=True)
    return samples[order], labels[order]


def save_grid(images: Tensor, rows: int, path) -> None:
    """Write [rows * cols, 1, S, S] images in [-1, 1] as a PNG, rows top to bottom."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("writing the sample grid needs Pillow: pip install pillow") from exc
    cols = len(images) // rows
    size = images.shape[-1]
    pad = 1
    grid = torch.ones(rows * (size + pad) + pad, cols * (size + pad) + pad)
    pixels = ((images[:, 0].clamp(-1, 1) + 1) / 2)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        top, left = pad + r * (size + pad), pad + c * (size + pad)
        # Ink dark on white, as digits are usually shown.
        grid[top:top + size, left:left + size] = 1 - pixels[i]
    Image.fromarray((grid * 255).round().to(torch.uint8).numpy(), mode="L").save(path)


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ditkernels.examples.digits",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint to write (default OUT/digits_dit.pt), or to read with "
                        "--sample-only")
    p.add_argument("--sample-only", action="store_true",
                   help="skip training: load --checkpoint and only sample and score")
    p.add_argument("--smoke", action="store_true",
                   help="a seconds-long run with a tiny model (for tests); explicit flags win")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default). On a CPU shared with "
                        "other work, 1 can be much faster: a second thread stalls on barriers")
    p.add_argument("--no-progress", action="store_true",
                   help="a quiet training log: only its last step")
    g = p.add_argument_group("model")
    g.add_argument("--image-size", type=int, default=16, help="digits upsampled to SxS")
    g.add_argument("--patch-size", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--depth", type=int, default=4)
    g.add_argument("--num-heads", type=int, default=4)
    g.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=True,
                   help="learned-range variance with the hybrid loss (DiT's default; eps "
                        "objective only)")
    g.add_argument("--objective", choices=sorted(SAMPLERS), default="eps",
                   help="eps: Gaussian diffusion, eps prediction; flow: rectified flow, "
                        "velocity prediction (with --sample-only the checkpoint decides)")
    g.add_argument("--t-sampling", choices=T_SAMPLINGS, default="logit_normal",
                   help="flow objective: how training draws t in (0, 1)")
    g = p.add_argument_group("training")
    g.add_argument("--train-steps", type=int, default=2000)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=4e-3)
    g.add_argument("--ema-decay", type=float, default=0.995)
    g.add_argument("--classifier-steps", type=int, default=300)
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", nargs="+", default=None,
                   choices=[name for names in SAMPLERS.values() for name in names],
                   help="one or more samplers: ddim, ddpm, dpm++ (DPM-Solver++(2M)) for the "
                        "eps objective (default ddim), euler, heun for flow (default euler)")
    g.add_argument("--steps", "--sampling-steps", dest="sampling_steps", type=int, nargs="+",
                   default=[50], help="one or more step counts; every sampler runs each")
    g.add_argument("--cfg-scale", type=float, default=3.0)
    g.add_argument("--skip-type", choices=SKIP_TYPES,
                   default="logSNR", help="dpm++: where the steps lie (see dpm_solver_sample)")
    g.add_argument("--eta", type=float, default=0.0)
    g.add_argument("--samples-per-class", type=int, default=50, help="scored samples per class")
    g.add_argument("--grid-columns", type=int, default=10, help="samples per row in the PNG")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**SMOKE_DEFAULTS)
        args = parser.parse_args(argv)
    return args


def _samplers_for(objective: str, requested: Optional[Sequence[str]]) -> Sequence[str]:
    if requested is None:
        return SAMPLERS[objective][:1]
    wrong = [name for name in requested if name not in SAMPLERS[objective]]
    if wrong:
        raise ValueError(f"sampler(s) {wrong} do not apply to a model trained with the "
                         f"{objective!r} objective; choose from {list(SAMPLERS[objective])}")
    return requested


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the example; returns the metrics it also writes to OUT/metrics.json.

    The top-level accuracy, per-class accuracy and grid are the first sampler's at the
    first step count; "results" holds every (sampler, steps) pair.
    """
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.checkpoint or args.out / "digits_dit.pt"
    argv_used = sys.argv[1:] if argv is None else list(argv)
    metrics: Dict = {"command": "python -m ditkernels.examples.digits " + " ".join(argv_used)}

    if args.sample_only:
        loaded = load_checkpoint(ckpt_path)
        classifier, objective = loaded.classifier, loaded.objective
        samplers = _samplers_for(objective, args.sampler)
        image_size = loaded.model.input_size
        if classifier is None:
            raise ValueError(f"{ckpt_path} holds no classifier to score samples with")
        _, _, x_test, y_test = load_digits_split(image_size, seed=loaded.metadata["data_seed"])
        metrics.update({k: loaded.metadata[k] for k in ("train_seconds", "train_steps")})
    else:
        objective = args.objective
        samplers = _samplers_for(objective, args.sampler)
        image_size = args.image_size
        x_train, y_train, x_test, y_test = load_digits_split(image_size, seed=args.seed)
        start = time.perf_counter()
        classifier = train_classifier(x_train, y_train, args.classifier_steps, seed=args.seed)
        metrics["classifier_train_seconds"] = time.perf_counter() - start

        results_dir = args.out / "train"
        results_dir.mkdir(parents=True, exist_ok=True)
        latents = results_dir / "digits_latents.npz"
        write_latents(latents, x_train, y_train)
        start = time.perf_counter()
        train_lib.main(train_argv(args, latents, results_dir))
        metrics["train_seconds"] = time.perf_counter() - start
        metrics["train_steps"] = args.train_steps
        trained = torch.load(train_lib.checkpoint_path(str(results_dir), args.train_steps),
                             map_location="cpu", weights_only=True)
        model = train_lib.build_model(trained["config"])
        model.load_state_dict(trained["ema"], strict=True)
        save_checkpoint(ckpt_path, model, trained["config"], classifier,
                        metadata={"data_seed": args.seed, "train_steps": args.train_steps,
                                  "train_seconds": metrics["train_seconds"]})
        print(f"saved {ckpt_path}", flush=True)

    test_correct = classify(classifier, x_test) == y_test
    metrics["classifier_test_accuracy"] = test_correct.float().mean().item()
    results, first = [], None
    for sampler in samplers:
        for steps in args.sampling_steps:
            start = time.perf_counter()
            samples, labels = sample_digits(
                ckpt_path, args.out / f"samples_{sampler}_{steps}.npz",
                num_samples=NUM_CLASSES * args.samples_per_class, sampling_steps=steps,
                cfg_scale=args.cfg_scale, sampler=sampler, eta=args.eta,
                skip_type=args.skip_type, seed=args.seed)
            seconds = time.perf_counter() - start
            correct = classify(classifier, samples) == labels
            results.append(dict(sampler=sampler, steps=steps,
                                accuracy=correct.float().mean().item(), seconds=seconds))
            print(f"{sampler:>6} {steps:4d} steps: generated-digit accuracy "
                  f"{results[-1]['accuracy']:.3f} ({seconds:.0f}s)", flush=True)
            if first is None:
                first = samples, correct, seconds
    samples, correct, metrics["sample_seconds"] = first
    metrics["generated_accuracy"] = correct.float().mean().item()
    metrics["generated_accuracy_per_class"] = correct.view(NUM_CLASSES, -1).float().mean(1).tolist()
    metrics.update(objective=objective, sampler=samplers[0],
                   sampling_steps=args.sampling_steps[0], cfg_scale=args.cfg_scale,
                   eta=args.eta, samples=len(labels), image_size=image_size,
                   checkpoint=str(ckpt_path), results=results)

    cols = min(args.grid_columns, args.samples_per_class)
    grid = samples.view(NUM_CLASSES, args.samples_per_class, *samples.shape[1:])[:, :cols]
    save_grid(grid.reshape(-1, *samples.shape[1:]), NUM_CLASSES, args.out / "samples.png")
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"classifier test accuracy {metrics['classifier_test_accuracy']:.3f}; "
          f"generated-digit accuracy {metrics['generated_accuracy']:.3f} "
          f"({len(labels)} samples, {samplers[0]} {args.sampling_steps[0]}, "
          f"cfg {args.cfg_scale}); wrote {args.out / 'samples.png'}", flush=True)
    return metrics


if __name__ == "__main__":
    main()
