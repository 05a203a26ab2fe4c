"""python -m ditkernels.train and ditkernels.sample under torchrun: 2 CPU processes (gloo)
against 1, FSDP2 against DDP, resumed runs against uninterrupted ones.

Every run is a subprocess (as a user launches it) with a tiny DiT on random 3-channel
8x8 "images" in float64, so that what separates the runs is only the order of sums
in the gradient all-reduce; a flow-matching DiT on 1-channel ones checks the flow
objective, its resume and samplers.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ditkernels
from ditkernels import data as data_lib
from ditkernels.diffusion import RectifiedFlow
from ditkernels.sample import derived_seed, make_sampler, merge_chunks
from ditkernels.sample import parse_args as parse_sample_args
from ditkernels.train import (block_names, build_model, ema_decay_at, lr_at, model_config,
                              training_process)

SRC_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ditkernels.__file__)))
TINY_DIT = '{"depth": 2, "hidden_size": 32, "num_heads": 2}'
STEPS = 4
TRAIN = ["--model", "DiT-S/2", "--model-kwargs", TINY_DIT, "--global-batch-size", "8",
         "--max-steps", str(STEPS), "--ckpt-every", "2", "--log-every", "2", "--device", "cpu",
         "--dtype", "float64", "--lr", "1e-3", "--grad-clip", "0.05", "--ema-decay", "0.9",
         "--ema-warmup", "--warmup-steps", "2", "--lr-schedule", "cosine"]

# float64 runs that differ only in the order of the gradient sums (~1e-16 relative)
# stay about lr * 1e-15 apart after a few Adam steps; a wrong sample, noise draw or
# label would move parameters by ~lr = 1e-3.
PARAM_ATOL = 1e-12


def run(module, args, cwd, nproc=1):
    """Run ``python -m module`` (under torchrun when nproc > 1) from outside the source
    tree, importing ditkernels from where this test imported it."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [SRC_ROOT, os.environ.get("PYTHONPATH")])))
    launcher = ([] if nproc == 1 else
                ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"])
    cmd = [sys.executable, *launcher, "-m", module, *map(str, args)]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, \
        f"{' '.join(cmd)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One training run per way of launching, each STEPS steps with checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    latents = root / "pixels.npz"
    np.savez(latents, latents=rng.uniform(-1, 1, (16, 3, 8, 8)).astype(np.float32),
             labels=rng.integers(0, 3, 16))
    common = [*TRAIN, "--latents", latents]
    out = {}
    out["single"] = root / "single"
    run("ditkernels.train", [*common, "--results-dir", out["single"]], root)
    # DDP with activation checkpointing; FSDP2 without, where DiT's fused cross-block
    # chain must step aside for FSDP's per-block hooks.
    options = {"ddp": ["--grad-checkpointing"], "fsdp": ["--fsdp"]}
    for name, extra in options.items():
        out[name] = root / name
        run("ditkernels.train", [*common, "--results-dir", out[name], *extra], root, nproc=2)
    for name, extra in options.items():  # resume from the step-2 checkpoints
        resumed = root / f"{name}-resumed"
        (resumed / "checkpoints").mkdir(parents=True)
        os.link(out[name] / "checkpoints" / "0000002.pt",
                resumed / "checkpoints" / "0000002.pt")
        run("ditkernels.train", [*common, "--results-dir", resumed, "--resume", "auto", *extra],
            root, nproc=2)
        out[f"{name}-resumed"] = resumed
    out["latents"] = latents
    return out


def final(runs, name):
    return load(runs[name] / "checkpoints" / f"{STEPS:07d}.pt")


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_two_processes_train_like_one_process_on_the_combined_batch(runs, name):
    one, two = final(runs, "single"), final(runs, name)
    first = load(runs["single"] / "checkpoints" / "0000002.pt")
    for part in ("model", "ema"):
        assert one[part].keys() == two[part].keys()
        for key in one[part]:
            torch.testing.assert_close(two[part][key], one[part][key], atol=PARAM_ATOL, rtol=0,
                                       msg=f"{part}.{key}")
    # The comparison has teeth: the weights moved well beyond the tolerance.
    moved = max((one["model"][k] - first["model"][k]).abs().max() for k in one["model"])
    assert moved > 1e-4
    state_one, state_two = one["opt"]["state"], two["opt"]["state"]
    assert state_one.keys() == state_two.keys()
    for key in state_one:
        torch.testing.assert_close(state_two[key]["exp_avg"], state_one[key]["exp_avg"],
                                   atol=PARAM_ATOL, rtol=0)


def assert_bit_identical(straight, resumed):
    """Two final checkpoints hold the same weights, optimizer, generator and RNG states."""
    for part in ("model", "ema"):
        assert straight[part].keys() == resumed[part].keys()
        for key in straight[part]:
            assert torch.equal(straight[part][key], resumed[part][key]), f"{part}.{key}"
    for key, state in straight["opt"]["state"].items():
        for field, value in state.items():
            assert torch.equal(value, resumed["opt"]["state"][key][field]), f"opt {key} {field}"
    assert torch.equal(straight["generator"], resumed["generator"])
    for a, b in zip(straight["rng"], resumed["rng"]):
        assert torch.equal(a["cpu"], b["cpu"])
    assert straight["step"] == resumed["step"] == STEPS
    assert straight["data_order"] == resumed["data_order"]


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(runs, name):
    assert_bit_identical(final(runs, name), final(runs, f"{name}-resumed"))


@pytest.fixture(scope="module")
def flow_runs(tmp_path_factory):
    """A rectified-flow DiT on 1-channel 8x8 "images" (logit-normal t), STEPS steps on one
    process, and the same run resumed from its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("flow")
    rng = np.random.default_rng(1)
    latents = root / "gray.npz"
    np.savez(latents, latents=rng.uniform(-1, 1, (16, 1, 8, 8)).astype(np.float32),
             labels=rng.integers(0, 3, 16))
    common = [*TRAIN, "--latents", latents, "--objective", "flow", "--t-sampling",
              "logit_normal"]
    run("ditkernels.train", [*common, "--results-dir", root / "straight"], root)
    (root / "resumed" / "checkpoints").mkdir(parents=True)
    os.link(root / "straight" / "checkpoints" / "0000002.pt",
            root / "resumed" / "checkpoints" / "0000002.pt")
    run("ditkernels.train", [*common, "--results-dir", root / "resumed", "--resume", "auto"],
        root)
    return root


def test_a_flow_run_records_its_objective_and_resumes_bit_identically(flow_runs):
    straight = load(flow_runs / "straight" / "checkpoints" / f"{STEPS:07d}.pt")
    first = load(flow_runs / "straight" / "checkpoints" / "0000002.pt")
    config = straight["config"]
    assert (config["objective"], config["t_sampling"]) == ("flow", "logit_normal")
    assert not config["learn_sigma"] and isinstance(training_process(config), RectifiedFlow)
    assert max((straight["model"][k] - first["model"][k]).abs().max()
               for k in straight["model"]) > 1e-4
    assert_bit_identical(straight, load(flow_runs / "resumed" / "checkpoints" /
                                        f"{STEPS:07d}.pt"))


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_flow_checkpoints_sample_balanced_gray_images_as_rgb(flow_runs, tmp_path, sampler):
    ckpt = flow_runs / "straight" / "checkpoints" / f"{STEPS:07d}.pt"
    out = tmp_path / "flow.npz"
    run("ditkernels.sample", ["--ckpt", ckpt, "--num-samples", 7, "--batch-size", 4,
                              "--sampler", sampler, "--steps", 3, "--cfg-scale", 2.0,
                              "--labels", "balanced", "--device", "cpu", "--out", out],
        tmp_path)
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (7, 8, 8, 3) and images.dtype == np.uint8
    assert (images == images[..., :1]).all() and images.std() > 0
    np.testing.assert_array_equal(labels, np.arange(7) % 3)


def test_dpm_solver_samples_an_eps_checkpoint(runs, tmp_path):
    ckpt = runs["single"] / "checkpoints" / f"{STEPS:07d}.pt"
    common = ["--ckpt", ckpt, "--num-samples", 3, "--batch-size", 3, "--sampler", "dpm++",
              "--steps", 4, "--cfg-scale", 2.0, "--device", "cpu", "--dtype", "float64"]
    run("ditkernels.sample", [*common, "--order", 3, "--skip-type", "time_quadratic",
                              "--out", tmp_path / "a.npz"], tmp_path)
    run("ditkernels.sample", [*common, "--order", 1, "--out", tmp_path / "b.npz"], tmp_path)
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert a["arr_0"].shape == (3, 8, 8, 3)
        # The same noise and labels, another solver: other images.
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        assert not np.array_equal(a["arr_0"], b["arr_0"])


def test_samplers_follow_the_objective_and_take_a_number_of_steps():
    eps = model_config("DiT-S/2", input_size=8, in_channels=3, num_classes=3)
    flow = model_config("DiT-S/2", input_size=8, in_channels=3, num_classes=3, objective="flow")
    assert not flow["learn_sigma"] and eps["learn_sigma"]
    args = parse_sample_args(["--ckpt", "c", "--out", "o.npz", "--sampler", "dpm++"])
    with pytest.raises(ValueError, match="--sampler dpm\\+\\+ does not apply to a model "
                                         "trained with the 'flow' objective"):
        make_sampler(args, flow)
    with pytest.raises(ValueError, match="takes a number of --steps, got 'ddim50'"):
        make_sampler(parse_sample_args(["--ckpt", "c", "--out", "o.npz", "--sampler",
                                        "dpm++", "--steps", "ddim50"]), eps)
    with pytest.raises(ValueError, match="no sigma to learn"):
        model_config("DiT-S/2", input_size=8, in_channels=3, num_classes=3, learn_sigma=True,
                     objective="flow")
    with pytest.raises(ValueError, match="unknown t_sampling"):
        model_config("DiT-S/2", input_size=8, in_channels=3, num_classes=3, objective="flow",
                     t_sampling="cubic")


def test_checkpoints_hold_plain_state_dicts_that_load_strictly(runs):
    for name in ("ddp", "fsdp"):  # activation checkpointing, FSDP2: no trace in the keys
        ckpt = final(runs, name)
        model = build_model(ckpt["config"])
        model.load_state_dict(ckpt["ema"], strict=True)
        assert ckpt["model"].keys() == model.state_dict().keys()


def test_resuming_with_another_global_batch_is_refused(runs):
    ckpt = load(runs["ddp"] / "checkpoints" / "0000002.pt")
    data_lib.DataOrder(16, 8, seed=0).check_state(ckpt["data_order"], 2)
    with pytest.raises(ValueError, match="data order does not match.*global_batch=8 vs 4"):
        data_lib.DataOrder(16, 4, seed=0).check_state(ckpt["data_order"], 2)


def test_sampling_on_two_ranks_writes_every_sample_once_and_resumes(runs, tmp_path):
    ckpt = runs["single"] / "checkpoints" / f"{STEPS:07d}.pt"
    sample = ["--ckpt", ckpt, "--num-samples", 7, "--batch-size", 2, "--sampler", "ddpm",
              "--steps", 4, "--cfg-scale", 2.0, "--device", "cpu", "--dtype", "float64",
              "--out", tmp_path / "samples.npz", "--keep-shards"]
    run("ditkernels.sample", sample, tmp_path, nproc=2)
    shards = tmp_path / "samples.shards"
    assert sorted(p.name for p in shards.glob("chunk_*.npz")) == [
        f"chunk_{k:06d}.npz" for k in range(4)]
    with np.load(tmp_path / "samples.npz") as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (7, 8, 8, 3) and images.dtype == np.uint8
    assert labels.shape == (7,) and set(labels.tolist()) <= {0, 1, 2}
    assert len({img.tobytes() for img in images}) == 7
    for k in range(4):  # chunk k holds samples 2k, 2k + 1 (the last one sample 6 only)
        with np.load(shards / f"chunk_{k:06d}.npz") as chunk:
            np.testing.assert_array_equal(chunk["indices"], np.arange(2 * k, min(2 * k + 2, 7)))
            np.testing.assert_array_equal(chunk["samples"], images[2 * k:2 * k + 2])

    # Interrupted: chunk 1 (rank 1's) and the merged file lost. A 1-process rerun
    # redoes only that chunk, and per-sample seeds make it come out the same; without
    # --keep-shards the merge then removes them.
    os.remove(shards / "chunk_000001.npz")
    os.remove(tmp_path / "samples.npz")
    log = run("ditkernels.sample", sample[:-1], tmp_path)
    assert "chunk 1/1," in log
    assert not shards.exists()
    with np.load(tmp_path / "samples.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], images)
        np.testing.assert_array_equal(f["arr_1"], labels)

    # Chunks of other settings are refused.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=SRC_ROOT)
    shards.mkdir()
    (shards / "settings.json").write_text('{"seed": 123}')
    result = subprocess.run([sys.executable, "-m", "ditkernels.sample", *map(str, sample)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "holds chunks sampled with other settings" in result.stderr


def test_merge_refuses_missing_or_duplicated_indices(tmp_path):
    images = np.zeros((2, 4, 4, 3), np.uint8)
    for k, idx in enumerate([[0, 1], [1, 2]]):  # sample 1 twice, sample 3 missing
        np.savez(tmp_path / f"chunk_{k:06d}.npz", samples=images, labels=np.zeros(2, np.int64),
                 indices=np.array(idx))
    with pytest.raises(RuntimeError, match="expected from 2"):
        merge_chunks(str(tmp_path), 2, 4, str(tmp_path / "out.npz"), conditional=False)


def test_derived_seeds_differ_per_key():
    seeds = {derived_seed(0, 0, i) for i in range(1000)} | {derived_seed(0, 1, i)
                                                           for i in range(1000)}
    assert len(seeds) == 2000 and all(0 <= s < 2 ** 63 for s in seeds)


def test_data_order_slices_partition_the_global_batch():
    order = data_lib.DataOrder(num_samples=10, global_batch=4, seed=3)
    assert order.steps_per_epoch == 2
    for step in range(6):
        whole = order.global_indices(step)
        parts = [whole[data_lib.rank_slice(4, r, 2)] for r in range(2)]
        assert torch.equal(torch.cat(parts), whole)
    epoch0 = torch.cat([order.global_indices(s) for s in range(2)])
    assert len(set(epoch0.tolist())) == 8  # no sample twice within an epoch
    assert not torch.equal(order.global_indices(0), order.global_indices(2))
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        data_lib.rank_slice(4, 0, 3)


def test_image_folder_classes_and_center_crop(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(
                tmp_path / c / f"{i}.png")
    ds = data_lib.ImageFolderDataset(str(tmp_path), 8)
    assert ds.classes == ["cat", "dog"] and len(ds) == 4
    x, y = ds[3]
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and y == 1


def test_block_names_are_the_outermost_blocks():
    config = model_config("DiffiT-CIFAR10", input_size=8, in_channels=3, num_classes=0,
                          overrides=dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                         num_heads=2, window_size=4, num_groups=4))
    names = block_names(build_model(config))
    assert names and all(type(build_model(config).get_submodule(n)).__name__ == "DiffiTResBlock"
                         for n in names)


def test_lr_schedule_and_ema_warmup():
    lrs = [lr_at(s, 10, 1.0, 2, "cosine", 0.1) for s in range(11)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert [lr_at(s, 10, 1.0, 0, "constant", 0.1) for s in (0, 9)] == [1.0, 1.0]
    assert ema_decay_at(0, 0.9999, True) == 0.1 and ema_decay_at(0, 0.9999, False) == 0.9999


def test_uvit_config_counts_the_null_class():
    config = model_config("U-ViT-S/2", input_size=4, in_channels=4, num_classes=10,
                          class_dropout_prob=0.1)
    assert config["kwargs"]["num_classes"] == 11
    assert config["denoiser"] == {"num_classes": 10, "null_class": 10}
    with pytest.raises(ValueError, match="cannot learn sigma"):
        model_config("U-ViT-S/2", input_size=4, in_channels=4, num_classes=10,
                     learn_sigma=True)


def test_latents_from_safetensors_and_npz_agree(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    latents = torch.randn(5, 4, 2, 2)
    labels = torch.tensor([0, 3, 1, 1, 2])
    safetensors.save_file({"latents": latents, "labels": labels}, str(tmp_path / "l.safetensors"))
    np.savez(tmp_path / "l.npz", latents=latents.numpy(), labels=labels.numpy())
    for name in ("l.safetensors", "l.npz"):
        ds = data_lib.LatentDataset(str(tmp_path / name))
        assert len(ds) == 5 and ds.num_classes == 4
        x, y = ds[1]
        assert torch.equal(x, latents[1]) and y == 3


def test_vae_from_a_local_folder(tmp_path):
    pytest.importorskip("diffusers")
    from types import SimpleNamespace

    from diffusers.models import AutoencoderKL

    from ditkernels.train import data_shape
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        data_lib.VAE(str(tmp_path / "missing"), torch.device("cpu"))
    AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(tmp_path / "vae")
    vae = data_lib.VAE(str(tmp_path / "vae"), torch.device("cpu"))
    assert vae.scale == 0.18215
    assert data_shape(SimpleNamespace(image_size=8), None, True, vae) == (4, 4)
    z = vae.encode(torch.rand(2, 3, 8, 8) * 2 - 1)
    assert z.shape == (2, 4, 4, 4)
    assert vae.decode(z).shape == (2, 3, 8, 8)

    Image = pytest.importorskip("PIL.Image")
    (tmp_path / "images").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
    out = tmp_path / "latents.npz"
    data_lib.main(["--data-path", str(tmp_path / "images"), "--image-size", "8", "--vae-path",
                   str(tmp_path / "vae"), "--out", str(out), "--flip", "--batch-size", "2",
                   "--device", "cpu"])
    ds = data_lib.LatentDataset(str(out))
    assert ds.latents.shape == (6, 4, 4, 4) and ds.labels.tolist() == [0] * 6


def test_uvit_on_an_image_folder_in_bf16_trains_and_samples(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(
                tmp_path / "images" / c / f"{i}.png")
    run("ditkernels.train", [
        "--model", "U-ViT-S/2-cifar10", "--model-kwargs",
        '{"depth": 2, "embed_dim": 32, "num_heads": 2}', "--data-path", tmp_path / "images",
        "--image-size", 8, "--random-flip", "--global-batch-size", 2, "--max-steps", 2,
        "--device", "cpu", "--precision", "bf16", "--grad-checkpointing",
        "--results-dir", tmp_path / "run"], tmp_path)
    ckpt = load(tmp_path / "run" / "checkpoints" / "0000002.pt")
    assert ckpt["config"]["kwargs"]["num_classes"] == 3  # 2 classes + the null class
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    run("ditkernels.sample", [
        "--ckpt", tmp_path / "run" / "checkpoints" / "0000002.pt", "--num-samples", 3,
        "--batch-size", 3, "--sampler", "ddim", "--steps", "ddim3", "--cfg-scale", 1.5,
        "--device", "cpu", "--out", tmp_path / "s.npz"], tmp_path)
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (3, 8, 8, 3) and set(f["arr_1"].tolist()) <= {0, 1}
