"""FID plumbing of ditkernels.evaluate with a small random feature extractor."""

import json

import numpy as np
import pytest
import torch

from ditkernels import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


class RandomFeatures(torch.nn.Module):
    """A fixed random conv net: uint8 [B, 3, H, W] -> 16 features (and 5 logits)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 3)
        self.head = torch.nn.Linear(16, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        h = torch.tanh(self.conv(x.float() / 127.5 - 1)).mean(dim=(2, 3))
        return h if return_features else self.head(h)


def extractor(x):
    net = RandomFeatures()
    with torch.no_grad():
        return {"features": net(x, return_features=True), "logits": net(x)}


def images(seed, n=64, low=0, high=256):
    return np.random.default_rng(seed).integers(low, high, (n, 12, 12, 3), dtype=np.uint8)


def test_fid_is_zero_for_identical_sets_positive_and_symmetric_otherwise():
    a, b = images(0), images(1, low=40, high=200)
    same = evaluate.compute_metrics(a, a.copy(), extractor, batch_size=10)
    # Identical features give identical statistics; what is left is the rounding of
    # the float64 eigendecompositions, far below one feature variance (~1e-2 here).
    assert abs(same["fid"]) < 1e-10
    ab = evaluate.compute_metrics(a, b, extractor, batch_size=10)["fid"]
    ba = evaluate.compute_metrics(b, a, extractor, batch_size=7)["fid"]
    assert ab > 1e-3
    assert ab == pytest.approx(ba, rel=1e-9)


def test_frechet_distance_matches_the_closed_form_of_commuting_covariances():
    # Diagonal covariances commute: tr sqrt(S1 S2) = sum sqrt(d1 * d2).
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    d1, d2 = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    got = evaluate.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2))
    assert got == pytest.approx(expected, rel=1e-12)
    # A rotation of both leaves the distance unchanged.
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    rotated = evaluate.frechet_distance(q @ mu1, q @ np.diag(d1) @ q.T, q @ mu2,
                                        q @ np.diag(d2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="frechet_distance: mu"):
        evaluate.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_of_confident_uniform_predictions_is_the_class_count():
    logits = torch.full((50, 5), -1e3, dtype=torch.float64)
    logits[torch.arange(50), torch.arange(50) % 5] = 0  # each class 10 times, one-hot
    mean, std = evaluate.inception_score(logits, splits=5)
    assert mean == pytest.approx(5.0, rel=1e-12) and std < 1e-12
    mean, _ = evaluate.inception_score(torch.zeros(50, 5), splits=5)
    assert mean == pytest.approx(1.0, rel=1e-12)


def test_precision_recall_of_a_set_against_itself_and_a_far_set():
    feats = np.random.default_rng(0).standard_normal((40, 4))
    assert evaluate.precision_recall(feats, feats) == (1.0, 1.0)
    assert evaluate.precision_recall(feats, feats + 100.0) == (0.0, 0.0)


# TorchScript is deprecated, but the Inception that StyleGAN2-ADA and clean-fid ship is one.
@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_cli_with_a_torchscript_extractor_on_npz_and_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    weights = tmp_path / "features.pt"
    torch.jit.script(RandomFeatures()).save(str(weights))
    a, b = images(0), images(1, low=40, high=200)
    np.savez(tmp_path / "a.npz", arr_0=a)
    folder = tmp_path / "ref"
    folder.mkdir()
    for i, img in enumerate(b):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    out = tmp_path / "metrics.json"
    evaluate.main([str(tmp_path / "a.npz"), str(folder), "--extractor", "torchscript",
                   "--weights", str(weights), "--device", "cpu", "--batch-size", "16",
                   "--precision-recall", "--json", str(out)])
    metrics = json.loads(out.read_text())
    direct = evaluate.compute_metrics(a, b, lambda x: {"features": extractor(x)["features"]})
    assert metrics["fid"] == pytest.approx(direct["fid"], rel=1e-6)
    assert metrics["num_samples"] == metrics["num_reference"] == 64
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert "inception_score" not in metrics  # the TorchScript path gives features only


def test_missing_weights_say_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="pass --weights PATH.*torch-fidelity.*nothing is "
                                         "downloaded"):
        evaluate.make_extractor("torch-fidelity", None, "cpu")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        evaluate.make_extractor("torchscript", str(tmp_path / "nope.pt"), "cpu")


def test_torch_fidelity_extractor_needs_the_package_or_says_so(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install torch-fidelity"):
            evaluate.make_extractor("torch-fidelity", str(weights), "cpu")
    else:
        pytest.skip("torch-fidelity is installed; its weights are not available here")


def test_load_images_checks_the_npz(tmp_path):
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="arr_0 must be uint8"):
        evaluate.load_images(str(tmp_path / "bad.npz"))
