"""FID (and Inception Score, precision/recall) of a sample npz against a reference.

    python -m ditkernels.evaluate samples.npz VIRTUAL_imagenet256_labeled.npz \\
        --extractor torch-fidelity --weights weights-inception-2015-12-05-6726825d.pth

Samples and reference are ADM-style npz files (``arr_0`` uint8 [N, H, W, 3]) or
image folders. The Frechet distance is computed here, in float64 (the matrix square
root by eigendecomposition), so the core needs no SciPy; the feature extractor is
pluggable and its weights come from a path you give, nothing is downloaded:

- ``--extractor torch-fidelity``: torch-fidelity's FeatureExtractorInceptionV3 (pip
  install torch-fidelity) with its weights file
  ``weights-inception-2015-12-05-6726825d.pth``; gives the 2048-d pool features and
  the logits, hence IS too.
- ``--extractor torchscript``: a TorchScript Inception called as
  ``model(x, return_features=True)`` on float [B, 3, H, W] in 0..255, such as the
  ``inception-2015-12-05.pt`` of StyleGAN2-ADA / clean-fid (features only).

In Python any callable uint8 [B, 3, H, W] -> {"features": [B, D], "logits": [B, K]
(optional)} serves (see ``compute_metrics``).
"""

import argparse
import json
import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

FeatureExtractor = Callable[[Tensor], Dict[str, Tensor]]

WEIGHTS_HINT = ("pass --weights PATH: torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                "with --extractor torch-fidelity, or a TorchScript inception-2015-12-05.pt with "
                "--extractor torchscript (nothing is downloaded at run time)")


# -- the metrics --------------------------------------------------------------------------------

def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    f = torch.as_tensor(features, dtype=torch.float64)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_statistics: need features [N >= 2, D], got shape "
                         f"{tuple(f.shape)}")
    return f.mean(0).numpy(), torch.cov(f.T).reshape(f.shape[1], f.shape[1]).numpy()


def _sqrt_psd(m: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative rounding-level
    eigenvalues clamped to 0)."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2), which has those of S1 S2; so no
    non-symmetric square root (scipy.linalg.sqrtm) and no complex parts are needed.
    """
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (*mu1.shape, *mu1.shape):
        raise ValueError(f"frechet_distance: mu [D] and sigma [D, D] must agree, got mu "
                         f"{tuple(mu1.shape)}, {tuple(mu2.shape)} and sigma {tuple(s1.shape)}, "
                         f"{tuple(s2.shape)}")
    root1 = _sqrt_psd(s1)
    middle = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_covmean)


def inception_score(logits, splits: int = 10) -> Tuple[float, float]:
    """Mean and standard deviation over ``splits`` of exp(E_x KL(p(y|x) || p(y)))."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    scores = []
    for part in torch.tensor_split(logits, splits):
        log_p = part.log_softmax(dim=1)
        log_py = torch.logsumexp(log_p, dim=0) - np.log(part.shape[0])
        kl = (log_p.exp() * (log_p - log_py)).sum(1).mean()
        scores.append(kl.exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))


def _kth_neighbour_radii(x: Tensor, k: int, chunk: int) -> Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    return torch.cat([torch.cdist(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, x.shape[0], chunk)])


def _coverage(queries: Tensor, points: Tensor, radii: Tensor, chunk: int) -> float:
    """Fraction of queries inside at least one ball (points, radii)."""
    inside = [(torch.cdist(queries[i:i + chunk], points) <= radii[None]).any(1)
              for i in range(0, queries.shape[0], chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real, fake, k: int = 3, chunk: int = 1024) -> Tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls."""
    real, fake = (torch.as_tensor(f, dtype=torch.float32) for f in (real, fake))
    precision = _coverage(fake, real, _kth_neighbour_radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, _kth_neighbour_radii(fake, k, chunk), chunk)
    return precision, recall


# -- images and features --------------------------------------------------------------------------

def load_images(path: str) -> np.ndarray:
    """uint8 [N, H, W, 3] from an ADM npz (arr_0) or a folder of equally sized images."""
    if os.path.isdir(path):
        from .data import _pil, list_images
        Image = _pil()
        files = list_images(path)
        if not files:
            raise ValueError(f"no images under {path!r}")
        arrays = []
        for f in files:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images under {path!r} differ in size ({sorted(shapes)[:3]}...): "
                             "resize them to one size first")
        return np.stack(arrays)
    with np.load(path) as f:
        if "arr_0" not in f:
            raise ValueError(f"{path}: no arr_0 (images uint8 [N, H, W, 3]); it holds "
                             f"{list(f.keys())}")
        images = f["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {images.dtype} "
                         f"{images.shape}")
    return images


@torch.no_grad()
def extract_features(images: np.ndarray, extractor: FeatureExtractor, batch_size: int,
                     device) -> Dict[str, np.ndarray]:
    """Run ``extractor`` over uint8 [N, H, W, 3] images in batches; concatenated outputs."""
    outputs: Dict[str, list] = {}
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2)
        for key, value in extractor(x).items():
            outputs.setdefault(key, []).append(value.double().cpu())
    return {k: torch.cat(v).numpy() for k, v in outputs.items()}


def torch_fidelity_extractor(weights: str, device) -> FeatureExtractor:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise ImportError("--extractor torch-fidelity needs torch-fidelity (pip install "
                          "torch-fidelity), or use --extractor torchscript") from None
    model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                        feature_extractor_weights_path=weights)
    model = model.to(device).eval()

    def extract(x: Tensor) -> Dict[str, Tensor]:
        features, logits = model(x)
        return {"features": features, "logits": logits}
    return extract


def torchscript_extractor(weights: str, device) -> FeatureExtractor:
    model = torch.jit.load(weights, map_location=device).eval()

    def extract(x: Tensor) -> Dict[str, Tensor]:
        return {"features": model(x.float(), return_features=True)}
    return extract


EXTRACTORS = {"torch-fidelity": torch_fidelity_extractor, "torchscript": torchscript_extractor}


def make_extractor(name: str, weights: Optional[str], device) -> FeatureExtractor:
    if name not in EXTRACTORS:
        raise ValueError(f"unknown extractor {name!r}; choose one of {sorted(EXTRACTORS)}")
    if weights is None:
        raise ValueError(f"FID needs Inception weights: {WEIGHTS_HINT}")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"--weights {weights!r} is not a file: {WEIGHTS_HINT}")
    return EXTRACTORS[name](weights, device)


def compute_metrics(samples: np.ndarray, reference: np.ndarray, extractor: FeatureExtractor, *,
                    batch_size: int = 100, device="cpu", inception: bool = True,
                    pr: bool = False) -> Dict[str, float]:
    """FID of ``samples`` against ``reference`` (uint8 [N, H, W, 3] each); IS of the samples
    when the extractor gives logits and ``inception``; precision/recall when ``pr``."""
    fake = extract_features(samples, extractor, batch_size, device)
    real = extract_features(reference, extractor, batch_size, device)
    metrics = {"fid": frechet_distance(*feature_statistics(fake["features"]),
                                       *feature_statistics(real["features"])),
               "num_samples": len(samples), "num_reference": len(reference)}
    if inception and "logits" in fake:
        metrics["inception_score"], metrics["inception_score_std"] = \
            inception_score(fake["logits"])
    if pr:
        metrics["precision"], metrics["recall"] = precision_recall(real["features"],
                                                                   fake["features"])
    return metrics


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ditkernels.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="npz (arr_0 uint8 [N, H, W, 3]) or image folder")
    p.add_argument("reference", help="npz or image folder")
    p.add_argument("--extractor", choices=sorted(EXTRACTORS), default="torch-fidelity")
    p.add_argument("--weights", help="the extractor's Inception weights file")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision-recall", action="store_true",
                   help="also k-NN precision/recall (O(N^2) distances)")
    p.add_argument("--json", help="also write the metrics to this file")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    extractor = make_extractor(args.extractor, args.weights, args.device)
    metrics = compute_metrics(load_images(args.samples), load_images(args.reference),
                              extractor, batch_size=args.batch_size, device=args.device,
                              pr=args.precision_recall)
    for k, v in metrics.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)


if __name__ == "__main__":
    main()
