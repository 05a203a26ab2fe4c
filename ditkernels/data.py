"""Training data for the entry points: image folders, pre-extracted latents, a
resumable data order, pixel <-> uint8 conversions and an optional VAE.

The data order is a pure function of (seed, step): epoch e visits the samples in the
order of ``randperm(N)`` drawn from a generator seeded with seed + e, and step s
takes the next ``global_batch`` of them, rank r the r-th contiguous slice. A run
resumed at step s therefore reads exactly what an uninterrupted run reads, and the
union of the ranks' slices is the batch one process would read.
"""

import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class DataOrder:
    """Which dataset indices each step reads; drops the last partial batch of an epoch."""

    def __init__(self, num_samples: int, global_batch: int, seed: int):
        if global_batch < 1:
            raise ValueError(f"DataOrder: global_batch must be >= 1, got {global_batch}")
        if num_samples < global_batch:
            raise ValueError(f"DataOrder: the dataset has {num_samples} samples, fewer than "
                             f"one global batch of {global_batch}")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.seed = seed
        self.steps_per_epoch = num_samples // global_batch
        self._epoch: Optional[int] = None
        self._perm: Optional[Tensor] = None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> Tensor:
        if self._epoch != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._epoch = torch.randperm(self.num_samples, generator=g), epoch
        return self._perm

    def global_indices(self, step: int) -> Tensor:
        """The dataset indices of the whole batch of ``step`` (all ranks), [global_batch]."""
        pos = step % self.steps_per_epoch
        perm = self._permutation(self.epoch_of(step))
        return perm[pos * self.global_batch:(pos + 1) * self.global_batch]

    def state(self, step: int) -> Dict[str, int]:
        """What a checkpoint records of the order at ``step`` (it resumes from these)."""
        return {"seed": self.seed, "num_samples": self.num_samples,
                "global_batch": self.global_batch, "epoch": self.epoch_of(step),
                "position": step % self.steps_per_epoch}

    def check_state(self, state: Dict[str, int], step: int) -> None:
        """Refuse to resume on different data or batch size: the order would change."""
        mine = self.state(step)
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError("the checkpoint's data order does not match this run "
                             "(checkpoint value, this run): " +
                             ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))


def rank_slice(global_batch: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous share of a global batch (which must split evenly)."""
    if global_batch % world_size:
        raise ValueError(f"the global batch size {global_batch} is not divisible by the "
                         f"world size {world_size}")
    local = global_batch // world_size
    return slice(rank * local, (rank + 1) * local)


class RankBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's index list for steps start_step .. end_step - 1."""

    def __init__(self, order: DataOrder, rank: int, world_size: int, start_step: int,
                 end_step: int):
        self.order, self.start_step, self.end_step = order, start_step, end_step
        self.slice = rank_slice(order.global_batch, rank, world_size)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def __iter__(self) -> Iterator[List[int]]:
        for step in range(self.start_step, self.end_step):
            yield self.order.global_indices(step)[self.slice].tolist()


class LatentDataset(torch.utils.data.Dataset):
    """Pre-extracted latents (what the model sees, already scaled) and optional labels.

    path: an .npz with ``latents`` [N, C, H, W] (or ``arr_0``) and ``labels`` [N]
    (or ``arr_1``), or a .safetensors file with ``latents`` and ``labels`` (needs the
    safetensors package). Without labels every sample has label 0.
    """

    def __init__(self, path: str):
        if path.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ImportError("reading .safetensors latents needs the safetensors package "
                                  "(pip install safetensors), or pass an .npz") from None
            tensors = load_file(path)
            latents, labels = tensors.get("latents"), tensors.get("labels")
        else:
            with np.load(path) as f:
                key = "latents" if "latents" in f else "arr_0"
                if key not in f:
                    raise ValueError(f"{path}: no 'latents' (or 'arr_0') array; it holds "
                                     f"{list(f.keys())}")
                latents = torch.from_numpy(f[key])
                label_key = "labels" if "labels" in f else ("arr_1" if "arr_1" in f else None)
                labels = torch.from_numpy(f[label_key]) if label_key else None
        if latents is None or latents.dim() != 4 or not latents.is_floating_point():
            got = None if latents is None else (latents.dtype, tuple(latents.shape))
            raise ValueError(f"{path}: latents must be a float [N, C, H, W] array, got {got}")
        if labels is None:
            labels = torch.zeros(latents.shape[0], dtype=torch.int64)
        if tuple(labels.shape) != (latents.shape[0],):
            raise ValueError(f"{path}: labels must be [N] = [{latents.shape[0]}], got "
                             f"{tuple(labels.shape)}")
        self.latents = latents.float()
        self.labels = labels.to(torch.int64)
        self.num_classes = int(self.labels.max()) + 1

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, i: int) -> Tuple[Tensor, int]:
        return self.latents[i], int(self.labels[i])


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading image folders needs Pillow (pip install pillow, or "
                          "ditkernels[examples])") from None
    return Image


def center_crop_arr(image, image_size: int) -> np.ndarray:
    """ADM's preprocessing, as DiT uses it: halve with a box filter while the short side
    is at least twice the target, resize bicubically, centre crop; uint8 [H, W, 3]."""
    Image = _pil()
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image.convert("RGB"))
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def list_images(root: str) -> List[str]:
    """Every image file under ``root``, sorted (recursively)."""
    files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names
             if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images under ``root``: one class per subfolder (sorted names, as torchvision's
    ImageFolder), or a single class 0 when the images sit in ``root`` itself. Items are
    uint8 [3, image_size, image_size] tensors and int labels."""

    def __init__(self, root: str, image_size: int):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if classes:
            self.samples = [(f, i) for i, c in enumerate(classes)
                            for f in list_images(os.path.join(root, c))]
        else:
            self.samples = [(f, 0) for f in list_images(root)]
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
        self.classes = classes or ["0"]
        self.num_classes = len(self.classes)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[Tensor, int]:
        path, label = self.samples[i]
        with _pil().open(path) as image:
            arr = center_crop_arr(image, self.image_size)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1), label


def uint8_to_pixels(x: Tensor) -> Tensor:
    """uint8 [B, 3, H, W] -> float32 in [-1, 1]."""
    return x.float().div(127.5).sub(1.0)


def pixels_to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] pixels [B, 3, H, W] -> uint8 [B, H, W, 3] (DiT's sample_ddp conversion)."""
    return (127.5 * x.float() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


class VAE:
    """diffusers' AutoencoderKL from a local directory, for latent training and sampling.

    scale: the latent scale factor (the model sees encode(x) * scale), by default the
    checkpoint's ``scaling_factor`` (0.18215 for sd-vae-ft-*).
    """

    def __init__(self, path: str, device: torch.device, scale: Optional[float] = None):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--vae-path {path!r} is not a directory: pass a local "
                                    "diffusers AutoencoderKL folder (config.json + weights); "
                                    "nothing is downloaded")
        try:
            from diffusers.models import AutoencoderKL
        except ImportError:
            raise ImportError("--vae-path needs diffusers (pip install diffusers)") from None
        self.model = AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.scale = float(scale if scale is not None
                           else getattr(self.model.config, "scaling_factor", 0.18215))

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """[-1, 1] pixels -> scaled latents, a sample of the posterior (global RNG)."""
        return self.model.encode(pixels).latent_dist.sample() * self.scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.model.decode(latents / self.scale).sample


def collate(batch: Sequence[Tuple[Tensor, int]]) -> Tuple[Tensor, Tensor]:
    xs, ys = zip(*batch)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


@torch.no_grad()
def extract_latents(dataset: ImageFolderDataset, vae: VAE, batch_size: int,
                    flip: bool = False) -> Tuple[Tensor, Tensor]:
    """(latents [N, C, h, w] float32, labels [N]) of every image, in dataset order; with
    ``flip`` the horizontally flipped images follow as N more (fixed augmentation)."""
    device = next(vae.model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    latents, labels = [], []
    for mirrored in ((False, True) if flip else (False,)):
        for x, y in loader:
            pixels = uint8_to_pixels(x.to(device))
            latents.append(vae.encode(pixels.flip(-1) if mirrored else pixels).float().cpu())
            labels.append(y)
    return torch.cat(latents), torch.cat(labels)


def main(argv=None) -> None:
    """python -m ditkernels.data: encode an image folder into a latents .npz for
    ``python -m ditkernels.train --latents`` (one process; the VAE from a local path)."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m ditkernels.data", description=main.__doc__)
    p.add_argument("--data-path", required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--vae-path", required=True, help="local diffusers AutoencoderKL folder")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--flip", action="store_true", help="also store flipped images' latents")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    vae = VAE(args.vae_path, torch.device(args.device))
    latents, labels = extract_latents(ImageFolderDataset(args.data_path, args.image_size), vae,
                                      args.batch_size, args.flip)
    np.savez(args.out, latents=latents.numpy(), labels=labels.numpy())
    print(f"wrote {args.out}: latents {tuple(latents.shape)}", flush=True)


if __name__ == "__main__":
    main()
