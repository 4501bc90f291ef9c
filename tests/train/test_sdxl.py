"""SDXL in the trainer, the pair transform flags, and the UNet families' diffusers pipelines.

* conditioning: both CLIP encoders and the time ids equal what ``StableDiffusionXLPipeline`` builds; the
  time ids carry each pair's original size and crop (the diffusers SDXL DPO script's ``compute_time_ids``),
  through the step and through the latent cache;
* ``--random_flip`` / ``--center_crop`` / ``--random_crop``: one transform for both images of a pair;
* SDXL folders (ε and v), evaluation samples through each family's pipeline, and the LoRA file that
  ``pipe.load_lora_weights(output_dir)`` loads — per family.
"""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from fastpref.train import parse_args, train
from fastpref.train.cache import LatentCache, collate_cached, encode, latents_fingerprint
from fastpref.train.data import SyntheticPreferences, build_dataset, collate_pairs
from fastpref.train.models import build_tiny_model, load_model, save_model
from fastpref.train.noise import noise_pairs
from fastpref.train.pipelines import build_pipeline
from fastpref.train.reference import adapters_disabled
from fastpref.train.sdxl import time_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 3
W0, H0 = 16, 10  # image_0's size: resized to 8 × 12 for --resolution 8, so a crop can move along x


def _png(left, right, size) -> bytes:
    """A PNG whose left half is ``left`` and right half ``right`` (so a flip shows), PIL size (w, h)."""
    from PIL import Image

    im = Image.new("RGB", size, left)
    im.paste(Image.new("RGB", (size[0] - size[0] // 2, size[1]), right), (size[0] // 2, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def pairs_folder(tmp_path):
    """24 pairs, image_0 16 × 10 (red | blue), image_1 8 × 5 (green | yellow; resized to image_0's size)."""
    root = tmp_path / "pairs"
    root.mkdir()
    (root / "a.png").write_bytes(_png((220, 20, 20), (20, 20, 220), (W0, H0)))
    (root / "b.png").write_bytes(_png((20, 220, 20), (220, 220, 20), (8, 5)))
    rows = [{"image_0": "a.png", "image_1": "b.png", "label_0": float(i % 2), "caption": f"a red disc {i}"}
            for i in range(24)]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(root)


def _expected(path, flip: bool, top_left) -> torch.Tensor:
    """The diffusers SDXL DPO script's transform of one image, done by hand: to tensor, shorter side to 8,
    flip, crop at ``top_left``, to [−1, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (W0, H0):
            im = im.resize((W0, H0))
        x = TF.resize(TF.to_tensor(im), 8, interpolation=InterpolationMode.BILINEAR, antialias=True)
    x = x.flip(-1) if flip else x
    y0, x0 = top_left
    return x[:, y0: y0 + 8, x0: x0 + 8] * 2 - 1


# ----------------------------------------------------------------------------------------------
# The pair transform and the time ids
# ----------------------------------------------------------------------------------------------


def test_centre_crop_by_default_and_sizes_recorded(pairs_folder):
    ds = build_dataset(pairs_folder, resolution=8)
    for i in (0, 1):
        item = ds[i]
        assert item["original_size"] == (H0, W0) and item["crop_top_left"] == (0, 2)  # round((12 − 8) / 2)
        win, lose = ("a.png", "b.png") if i % 2 else ("b.png", "a.png")  # label_0 = i % 2
        torch.testing.assert_close(item["pixel_values"][0], _expected(os.path.join(pairs_folder, win), False, (0, 2)))
        torch.testing.assert_close(item["pixel_values"][1], _expected(os.path.join(pairs_folder, lose), False, (0, 2)))


def test_random_flip_and_crop_are_shared_by_the_pair_and_seeded(pairs_folder):
    ds = build_dataset(pairs_folder, resolution=8, random_flip=True, random_crop=True, seed=SEED)
    flips, crops = set(), set()
    for i in range(len(ds)):
        item = ds[i]
        y, x = item["crop_top_left"]
        assert item["original_size"] == (H0, W0) and y == 0 and 0 <= x <= 4
        a, b = item["pixel_values"][1 - i % 2], item["pixel_values"][i % 2]  # image_0, image_1
        matches = [flip for flip in (False, True) if torch.allclose(a, _expected(os.path.join(pairs_folder, "a.png"),
                                                                                   flip, (y, x)))]
        assert len(matches) == 1, f"pair {i}: image_0 is no flip/crop of its source at {(y, x)}"
        torch.testing.assert_close(b, _expected(os.path.join(pairs_folder, "b.png"), matches[0], (y, x)))
        flips.add(matches[0])
        crops.add(x)
    assert flips == {False, True} and len(crops) >= 3  # both draws really happen
    again = build_dataset(pairs_folder, resolution=8, random_flip=True, random_crop=True, seed=SEED)
    assert all(torch.equal(again[i]["pixel_values"], ds[i]["pixel_values"]) for i in range(4))  # per (seed, pair)
    other = build_dataset(pairs_folder, resolution=8, random_flip=True, random_crop=True, seed=SEED + 1)
    assert any(other[i]["crop_top_left"] != ds[i]["crop_top_left"] for i in range(len(ds)))


def test_synthetic_set_flips_on_request():
    plain, flipped = SyntheticPreferences(16, 8, seed=SEED), SyntheticPreferences(16, 8, seed=SEED, random_flip=True)
    same = [torch.equal(flipped[i]["pixel_values"], plain[i]["pixel_values"]) for i in range(16)]
    mirrored = [torch.equal(flipped[i]["pixel_values"], plain[i]["pixel_values"].flip(-1)) for i in range(16)]
    assert all(s or m for s, m in zip(same, mirrored)) and not all(same) and not all(mirrored)
    assert plain[0]["original_size"] == (8, 8) and plain[0]["crop_top_left"] == (0, 0)


@pytest.mark.parametrize("argv,match", [
    (["--center_crop", "--random_crop"], "--center_crop and --random_crop exclude each other"),
    (["--resolution", "0"], "--resolution must be an integer ≥ 1"),
])
def test_transform_flags_are_validated(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(argv)
    assert parse_args(["--random_crop", "--random_flip"]).random_crop


def test_conditioning_equals_the_sdxl_pipeline(pairs_folder, tiny):
    model = tiny("fastpref:tiny-sdxl")
    pipe = build_pipeline(model)
    prompts = ["a red disc", "a blue disc on grey"]
    got = model.encode_prompts(prompts, "cpu")
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(got["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(got["text_embeds"], pooled, rtol=0, atol=0)
    want = pipe._get_add_time_ids((H0, W0), (0, 3), (8, 8), torch.float32, text_encoder_projection_dim=16)
    torch.testing.assert_close(time_ids([(H0, W0)], [(0, 3)], (8, 8)), want, rtol=0, atol=0)

    # the step: each pair's own original size and crop, shared by its winner and loser row
    ds = build_dataset(pairs_folder, resolution=8, random_crop=True, seed=SEED)
    batch = collate_pairs([ds[i] for i in (5, 0, 7)])
    _, cond = encode(model, batch, SEED, "cpu")
    want = torch.tensor([[H0, W0, *ds[i]["crop_top_left"], 8, 8] for i in (5, 0, 7)], dtype=torch.float32)
    torch.testing.assert_close(cond["time_ids"], torch.cat([want, want]), rtol=0, atol=0)
    assert len({tuple(r) for r in want.tolist()}) > 1  # the crops differ: a per-batch constant would fail
    noised = noise_pairs(model, torch.zeros(6, 3, 8, 8), batch["index"], 0, SEED)
    with torch.no_grad():  # and the UNet reads them
        pred = model.predict(model.denoiser, noised.noisy, noised.timesteps, cond)
        moved = model.predict(model.denoiser, noised.noisy, noised.timesteps, {**cond, "time_ids": cond["time_ids"] + 1})
    assert (pred - moved).abs().max() > 1e-6


def test_latent_cache_stores_the_time_ids(tmp_path, pairs_folder, run_config):
    cfg = run_config(pretrained_model_name_or_path="fastpref:tiny-sdxl", dataset=pairs_folder, resolution=8,
                     random_crop=True, random_flip=True, cache_latents=True, max_train_steps=1, eval_pairs=0)
    model = build_tiny_model("fastpref:tiny-sdxl", sample_size=8)
    train(cfg, model=model)
    (name,) = os.listdir(os.path.join(cfg.output_dir, "cache"))
    ds = build_dataset(pairs_folder, resolution=8, random_crop=True, random_flip=True, seed=cfg.seed)
    cache = LatentCache.load(os.path.join(cfg.output_dir, "cache", name), latents_fingerprint(model, ds, range(24),
                                                                                              cfg.seed))
    rows = [3, 11, 20]
    _, cached = encode(model, collate_cached([cache[i] for i in rows]), cfg.seed, "cpu")
    _, fresh = encode(model, collate_pairs([ds[i] for i in rows]), cfg.seed, "cpu")
    assert cached.keys() == fresh.keys() == {"encoder_hidden_states", "text_embeds", "time_ids"}
    for k in fresh:
        torch.testing.assert_close(cached[k], fresh[k])
    assert len({tuple(cache[i]["cond"]["time_ids"].tolist()) for i in range(24)}) > 1


# ----------------------------------------------------------------------------------------------
# SDXL pipeline folders, ε and v
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sdxl_folder_round_trip(tmp_path, tiny, run_config, prediction_type):
    from diffusers import DDPMScheduler

    model = tiny("fastpref:tiny-sdxl")
    model.scheduler = DDPMScheduler.from_config(model.scheduler.config, prediction_type=prediction_type)
    folder = str(tmp_path / "pipe")
    save_model(model, folder)
    with open(os.path.join(folder, "model_index.json")) as fh:
        assert json.load(fh)["_class_name"] == "StableDiffusionXLPipeline"
    loaded = load_model(folder)
    assert (loaded.family, loaded.prediction_type) == ("sdxl", prediction_type)
    batch = collate_pairs([SyntheticPreferences(4, 8)[i] for i in (1, 2)])
    x0, cond = encode(loaded, batch, SEED, "cpu")
    noised = noise_pairs(loaded, x0, batch["index"], 0, SEED)
    if prediction_type == "v_prediction":
        t = noised.timesteps
        a = loaded.scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - loaded.scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        eps = (noised.noisy - a * x0) / s
        torch.testing.assert_close(noised.target, a * eps - s * x0, rtol=1e-4, atol=1e-5)  # v = √ᾱ ε − √(1−ᾱ) x0
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(loaded.denoiser, noised.noisy, noised.timesteps, cond),
                                   model.predict(model.denoiser, noised.noisy, noised.timesteps, cond))
    assert train(run_config(pretrained_model_name_or_path=folder, max_train_steps=1)).global_step == 1

    index = json.load(open(os.path.join(folder, "model_index.json")))
    index["text_encoder"] = index["tokenizer"] = [None, None]  # the SDXL refiner's layout
    with open(os.path.join(folder, "model_index.json"), "w") as fh:
        json.dump(index, fh)
    with pytest.raises(ValueError, match="needs text_encoder and text_encoder_2"):
        load_model(folder)


# ----------------------------------------------------------------------------------------------
# The families' pipelines: evaluation samples and the LoRA file
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,vae", [("fastpref:tiny-unet", False), ("fastpref:tiny-sdxl", False),
                                      ("fastpref:tiny-sdxl", True)])
def test_samples_come_from_the_family_pipeline(tiny, name, vae):
    """The pipeline's images equal a DDIM loop over the trainer's own predict and VAE decode (with the time
    ids of an uncropped image at the model's resolution for SDXL, and StableDiffusionPipeline's rewrite of
    a legacy scheduler config for SD1.5): prompts, seeds, scheduler and conditioning reach the pipeline."""
    from diffusers import DDIMScheduler

    model = tiny(name, vae=vae, lora=4, lora_b=0.1)  # adapters on: the policy, not the base model, is sampled
    prompts, seeds = ["a red disc", "a blue disc", "a red disc"], [4, 4, 9]
    images = model.sample(model.denoiser, prompts, seeds, 3, "cpu")

    fixes = {"steps_offset": 1, "clip_sample": False} if model.family == "unet" else {}
    sched = DDIMScheduler.from_config(model.scheduler.config, **fixes)
    sched.set_timesteps(3)
    x = torch.stack([torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    cond = model.encode_prompts(prompts, "cpu")
    r = model.resolution  # 16 with the tiny VAE (8 × 8 latents), else 8
    if model.family == "sdxl":
        cond["time_ids"] = time_ids([(r, r)] * 3, [(0, 0)] * 3, (r, r))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model.predict(model.denoiser, x, t.expand(3), cond), t, x).prev_sample
    assert images.shape == (3, 3, r, r)
    torch.testing.assert_close(images, model.decode_latents(x))
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[0], images[2])


@pytest.mark.parametrize("name", ["fastpref:tiny-unet", "fastpref:tiny-sdxl"])
def test_lora_file_loads_into_the_family_pipeline(tiny, run_config, name):
    from peft.utils import get_peft_model_state_dict

    model = tiny(name)
    cfg = run_config(max_train_steps=2, lora_rank=4, lora_alpha=8)  # alpha ≠ rank: the scale must travel too
    train(cfg, model=model)
    assert os.path.isfile(os.path.join(cfg.output_dir, "pytorch_lora_weights.safetensors"))

    fresh = tiny(name)  # the same base weights (built from the same seed), no adapter
    pipe = build_pipeline(fresh)
    pipe.load_lora_weights(cfg.output_dir)
    (adapter,) = pipe.unet.peft_config
    trained = get_peft_model_state_dict(model.denoiser)
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=adapter)
    assert trained.keys() == loaded.keys() and trained
    for k in trained:
        torch.testing.assert_close(loaded[k], trained[k], rtol=0, atol=0)

    batch = collate_pairs([SyntheticPreferences(4, 8)[i] for i in (0, 3)])
    x0, cond = encode(model, batch, SEED, "cpu")
    noised = noise_pairs(model, x0, batch["index"], 0, SEED)
    with torch.no_grad():
        want = model.predict(model.denoiser, noised.noisy, noised.timesteps, cond)
        got = fresh.predict(pipe.unet, noised.noisy, noised.timesteps, cond)
        with adapters_disabled(pipe.unet):
            base = fresh.predict(pipe.unet, noised.noisy, noised.timesteps, cond)
    torch.testing.assert_close(got, want)
    assert (want - base).abs().max() > 1e-4  # the trained adapter changes the prediction
