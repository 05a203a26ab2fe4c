"""How much W8A8 costs in quality: the floating-point model against its int8 versions
over a whole DDIM trajectory, with the same noise and labels.

    python -m ditkernels.quant.evaluate --out DIR --digits-checkpoint runs/digits/digits_dit.pt

Two models: (a) the trained digits DiT of ditkernels.examples.digits (its checkpoint
holds the model, the diffusion config and the scoring classifier), (b) a DiT-S/2 on
32x32x4 latents with random weights (random_weights_: the adaLN-Zero layers are not
zero, or the blocks would be identities and the output zero). Each is quantized with
several configs, the static one scale for all steps (groups=1) against timestep-
calibrated ones; calibration runs the fp model through the same DDIM sampler on other
labels and other noise (a different seed) than the evaluation.

Measured per config, sampling from the same x_T with the same labels:
  - per step: ``output_rel_err`` = ||eps_int8(x) - eps_fp(x)|| / ||eps_fp(x)|| on the
    int8 trajectory's own input x (the error the int8 model makes at that step, on the
    batched [cond; uncond] forward, eps channels); ``trajectory_rel_err`` =
    ||x_t^int8 - x_t^fp|| / ||x_t^fp||, how far the int8 trajectory has drifted;
  - ``final_rel_err``: the same for the final samples;
  - digits: the classifier's accuracy on the int8 samples against the fp samples', and
    the fraction of int8 samples classified like their fp twins.
Writes results.json and results.md to --out.
"""

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..diffusion import as_denoiser
from ..models import DIT_CONFIGS, DiT
from .calibrate import Sampler, calibrate, ddim_sampler
from .config import TimestepCalibratedInt8Config
from .quantize import quantize_

# The configs compared: the static baseline and timestep-calibrated ones.
CONFIGS: Dict[str, TimestepCalibratedInt8Config] = {
    "static (groups=1)": TimestepCalibratedInt8Config(groups=1),
    "timestep, 10 uniform groups": TimestepCalibratedInt8Config(groups=10),
    "timestep, adaptive <= 4 groups": TimestepCalibratedInt8Config(grouping="adaptive",
                                                                   groups=4),
    "static, percentile 99.99": TimestepCalibratedInt8Config(groups=1, method="percentile"),
    "timestep, 10 groups, percentile 99.99": TimestepCalibratedInt8Config(
        groups=10, method="percentile"),
}
BASELINE = "static (groups=1)"


def random_weights_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every nn.Linear N(0, 1/fan_in) weights and N(0, 0.02^2) biases, in place.

    The variance-preserving init under which every layer, the adaLN modulations and
    gates included, changes its input by O(1): a random model whose activations depend
    on t and on the input as a trained one's do, unlike DiT's adaLN-Zero init (identity
    blocks, zero output).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                w = torch.randn(module.weight.shape, generator=generator)
                module.weight.copy_(w / math.sqrt(module.in_features))
                if module.bias is not None:
                    module.bias.copy_(0.02 * torch.randn(module.bias.shape, generator=generator))
    return model


def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


class _Recorder:
    """A denoiser forward that runs the int8 model and records, per step, its input
    and its eps error against the fp model on that same input."""

    def __init__(self, model: nn.Module, reference: Optional[nn.Module], eps_channels: int):
        self.model, self.reference, self.eps_channels = model, reference, eps_channels
        self.inputs: List[Tensor] = []
        self.timesteps: List[int] = []
        self.output_rel_err: List[float] = []

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
        out = self.model(x, t, y)
        self.inputs.append(x)
        self.timesteps.append(int(t[0]))
        if self.reference is not None:
            ref = self.reference(x, t, y)
            c = self.eps_channels
            self.output_rel_err.append(rel_err(out[:, :c], ref[:, :c]))
        return out


def run_trajectory(model: nn.Module, sampler: Sampler,
                   reference: Optional[nn.Module] = None):
    """(final samples, recorder) of one sampler run of model."""
    recorder = _Recorder(model, reference, model.in_channels)
    with torch.no_grad():
        samples = sampler(as_denoiser(model, forward=recorder))
    return samples, recorder


def compare_configs(fp_model: nn.Module, calibration_sampler: Sampler, eval_sampler: Sampler,
                    configs: Dict[str, TimestepCalibratedInt8Config], log=print) -> Dict:
    """Calibrate and quantize fp_model per config, sample, and measure (module
    docstring). Returns {'fp': ..., 'configs': {name: metrics}}."""
    start = time.perf_counter()
    fp_samples, fp_rec = run_trajectory(fp_model, eval_sampler)
    result = {"fp": {"seconds": time.perf_counter() - start, "timesteps": fp_rec.timesteps},
              "configs": {}}
    log(f"  fp trajectory: {result['fp']['seconds']:.1f}s")
    calibrations = {}
    for name, config in configs.items():
        start = time.perf_counter()
        # Configs that differ only in their timestep grouping share one calibration.
        key = repr(dataclasses.replace(config, grouping="uniform", groups=1, max_ratio=None))
        if key not in calibrations:
            calibrations[key] = calibrate(fp_model, calibration_sampler, config)
        calibration_seconds = time.perf_counter() - start
        model = quantize_(copy.deepcopy(fp_model), config, calibrations[key])
        start = time.perf_counter()
        samples, rec = run_trajectory(model, eval_sampler, reference=fp_model)
        trajectory = [rel_err(a, b) for a, b in zip(rec.inputs, fp_rec.inputs)]
        metrics = {
            "config": {k: v for k, v in dataclasses.asdict(config).items()
                       if k != "module_filter"},
            "output_rel_err": rec.output_rel_err,
            "trajectory_rel_err": trajectory,
            "mean_output_rel_err": sum(rec.output_rel_err) / len(rec.output_rel_err),
            "max_output_rel_err": max(rec.output_rel_err),
            "final_rel_err": rel_err(samples, fp_samples),
            "calibration_seconds": calibration_seconds,
            "sample_seconds": time.perf_counter() - start,
        }
        metrics["samples"] = samples
        result["configs"][name] = metrics
        log(f"  {name}: mean output rel err {metrics['mean_output_rel_err']:.4g}, final "
            f"sample rel err {metrics['final_rel_err']:.4g} "
            f"({metrics['sample_seconds']:.0f}s)")
    result["fp"]["samples"] = fp_samples
    return result


def _strip_samples(result: Dict) -> Dict:
    out = {"fp": {k: v for k, v in result["fp"].items() if k != "samples"}, "configs": {}}
    for name, m in result["configs"].items():
        out["configs"][name] = {k: v for k, v in m.items() if k != "samples"}
    return out


def evaluate_digits(checkpoint: Path, steps: int, samples_per_class: int,
                    calibration_per_class: int, cfg_scale: Optional[float], configs,
                    log=print) -> Dict:
    from ..examples import digits

    loaded = digits.load_checkpoint(checkpoint)
    model, classifier = loaded.model, loaded.classifier
    if classifier is None:
        raise ValueError(f"{checkpoint} holds no classifier")
    cfg = cfg_scale if cfg_scale is not None else digits.build_parser().get_default("cfg_scale")
    size = model.input_size
    n = digits.NUM_CLASSES
    labels = torch.arange(n).repeat_interleave(samples_per_class)
    # As the example samples: every eps channel guided, predicted x_0 clipped to [-1, 1].
    common = dict(diffusion_config=loaded.diffusion_config, cfg_scale=cfg, clip_denoised=True)
    eval_sampler = ddim_sampler(steps, (len(labels), model.in_channels, size, size), y=labels,
                                seed=0, **common)
    # Calibration: the same classes, other noise.
    cal_labels = torch.arange(n).repeat(calibration_per_class)
    cal_sampler = ddim_sampler(steps, (len(cal_labels), model.in_channels, size, size),
                               y=cal_labels, seed=1, **common)
    log(f"digits DiT from {checkpoint}: {len(labels)} samples, DDIM {steps}, cfg {cfg}")
    result = compare_configs(model, cal_sampler, eval_sampler, configs, log)
    fp_pred = digits.classify(classifier, result["fp"]["samples"])
    result["fp"]["accuracy"] = (fp_pred == labels).float().mean().item()
    for m in result["configs"].values():
        pred = digits.classify(classifier, m["samples"])
        m["accuracy"] = (pred == labels).float().mean().item()
        m["agreement_with_fp"] = (pred == fp_pred).float().mean().item()
    out = _strip_samples(result)
    out["setup"] = {"checkpoint": str(checkpoint), "model_config": loaded.model_config,
                    "ddim_steps": steps, "cfg_scale": cfg, "samples": len(labels),
                    "calibration_samples": len(cal_labels), "eval_seed": 0,
                    "calibration_seed": 1}
    return out


def evaluate_random_dit(name: str, batch: int, calibration_batch: int, steps: int,
                        cfg_scale: float, configs, seed: int = 0, log=print) -> Dict:
    torch.manual_seed(seed)
    model = random_weights_(DiT(input_size=32, in_channels=4, **DIT_CONFIGS[name]), seed).eval()
    diffusion_config = dict(noise_schedule="linear", num_timesteps=1000, learn_sigma=True)
    # As DiT's sample.py: guidance on the first 3 eps channels.
    common = dict(diffusion_config=diffusion_config, cfg_scale=cfg_scale, cfg_channels=3)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 1000, (batch,), generator=gen)
    cal_labels = torch.randint(0, 1000, (calibration_batch,), generator=gen)
    eval_sampler = ddim_sampler(steps, (batch, 4, 32, 32), y=labels, seed=0, **common)
    cal_sampler = ddim_sampler(steps, (calibration_batch, 4, 32, 32), y=cal_labels, seed=1,
                               **common)
    log(f"random {name} (32x32x4 latents): batch {batch}, DDIM {steps}, cfg {cfg_scale}")
    out = _strip_samples(compare_configs(model, cal_sampler, eval_sampler, configs, log))
    out["setup"] = {"model": name, "init": "random_weights_ (N(0, 1/fan_in) Linears)",
                    "latent": [4, 32, 32], "batch": batch,
                    "calibration_batch": calibration_batch, "ddim_steps": steps,
                    "cfg_scale": cfg_scale, "eval_seed": 0, "calibration_seed": 1}
    return out


def _markdown(results: Dict, command: str) -> str:
    lines = ["# Timestep-calibrated int8: quality against floating point", "",
             f"Command: `{command}`", "",
             "Per config: mean / max over DDIM steps of the eps relative error of the int8 "
             "model on its own trajectory's inputs, and the relative error of the final "
             "samples against the fp samples from the same noise and labels.", ""]
    for model_name, res in results["models"].items():
        setup = res["setup"]
        lines += [f"## {model_name}", "", "Setup: " + ", ".join(f"{k}={v}"
                                                               for k, v in setup.items()), ""]
        digits = "accuracy" in res["fp"]
        header = ["config", "mean step rel err", "max step rel err", "final sample rel err",
                  "final / static's"]
        static = res["configs"].get(BASELINE, {}).get("final_rel_err")
        if digits:
            header += ["accuracy", "agreement with fp"]
            lines.append(f"fp accuracy: {res['fp']['accuracy']:.3f}")
            lines.append("")
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, m in res["configs"].items():
            row = [name, f"{m['mean_output_rel_err']:.4g}", f"{m['max_output_rel_err']:.4g}",
                   f"{m['final_rel_err']:.4g}",
                   "" if static is None else f"{m['final_rel_err'] / static:.3f}"]
            if digits:
                row += [f"{m['accuracy']:.3f}", f"{m['agreement_with_fp']:.3f}"]
            lines.append("| " + " | ".join(row) + " |")
        names = list(res["configs"])
        lines += ["", "Per step (t = the model's original timestep): eps rel err", "",
                  "| t | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for i, t in enumerate(res["fp"]["timesteps"]):
            lines.append(f"| {t} | " + " | ".join(
                f"{res['configs'][n]['output_rel_err'][i]:.3g}" for n in names) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(prog="python -m ditkernels.quant.evaluate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for results.json/.md")
    p.add_argument("--digits-checkpoint", type=Path, default=None,
                   help="checkpoint of python -m ditkernels.examples.digits (skipped if absent)")
    p.add_argument("--digits-steps", type=int, default=50)
    p.add_argument("--digits-samples-per-class", type=int, default=20)
    p.add_argument("--digits-calibration-per-class", type=int, default=5)
    p.add_argument("--digits-cfg-scale", type=float, default=None,
                   help="default: the digits example's")
    p.add_argument("--dit-model", default="DiT-S/2", choices=sorted(DIT_CONFIGS))
    p.add_argument("--dit-batch", type=int, default=2, help="labels (x2 under CFG)")
    p.add_argument("--dit-calibration-batch", type=int, default=8)
    p.add_argument("--dit-steps", type=int, default=10)
    p.add_argument("--dit-cfg-scale", type=float, default=4.0)
    p.add_argument("--skip-dit", action="store_true")
    p.add_argument("--configs", default=None,
                   help=f"a ';'-separated subset of the configs: {'; '.join(CONFIGS)}")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = CONFIGS
    if args.configs:
        names = [n.strip() for n in args.configs.split(";") if n.strip()]
        configs = {n: CONFIGS[n] for n in names}
    command = "python -m ditkernels.quant.evaluate " + " ".join(
        sys.argv[1:] if argv is None else list(argv))
    results: Dict = {"command": command, "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "models": {}}
    if args.digits_checkpoint is not None:
        results["models"]["digits DiT (trained)"] = evaluate_digits(
            args.digits_checkpoint, args.digits_steps, args.digits_samples_per_class,
            args.digits_calibration_per_class, args.digits_cfg_scale, configs)
    if not args.skip_dit:
        results["models"][f"{args.dit_model} (random weights)"] = evaluate_random_dit(
            args.dit_model, args.dit_batch, args.dit_calibration_batch, args.dit_steps,
            args.dit_cfg_scale, configs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(_markdown(results, command))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
