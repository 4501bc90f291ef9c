"""The memory and speed flags (fastpref/train/memory.py, diffusers' SDXL DPO script's meaning):
--gradient_checkpointing, --use_8bit_adam, --allow_tf32, --pretrained_vae_model_name_or_path,
--vae_encode_batch_size, --variant; and what --help lists."""

from __future__ import annotations

import glob
import os
import sys
import types

import pytest
import torch

from fastpref.train import TrainConfig, compute_loss, train
from fastpref.train.cache import latents_fingerprint, precompute, vae_dtype, weight_dtype
from fastpref.train.config import build_parser, config_from_dict, load_toml
from fastpref.train.data import SyntheticPreferences, collate_pairs
from fastpref.train.memory import BITSANDBYTES_MISSING, apply_allow_tf32, build_optimizer, enable_gradient_checkpointing
from fastpref.train.models import FAMILIES, TINY_MODELS, load_model, save_model
from fastpref.train.objectives import OBJECTIVES, get_objective
from fastpref.train.reference import make_reference, tuner_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 7
BATCH = [4, 1, 3]


def _vae(seed: int, latent_channels: int = 3):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                             latent_channels=latent_channels, norm_num_groups=4, sample_size=16).eval()


def _grads(model, mode, batch, cfg, accelerator, params):
    out = compute_loss(model, model.denoiser, mode, get_objective(cfg.loss), batch, cfg, accelerator)
    return out.loss.detach(), torch.autograd.grad(out.loss, params)


# ----------------------------------------------------------------------------------------------
# --gradient_checkpointing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fastpref:tiny-unet", "fastpref:tiny-sd3", "fastpref:tiny-flux"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients_in_every_mode(tmp_path, tiny, run_config,
                                                                                 cpu_accelerator, name):
    """LoRA in every reference mode, and a full fine-tune with its frozen copy: the loss and gradients with
    checkpointing equal those without (fp32), and the LoRA layers really run again in backward."""
    data = SyntheticPreferences(6, 8, seed=SEED)
    batch = collate_pairs([data[i] for i in BATCH])
    batch["epoch"] = 0
    cfg = run_config(seed=SEED, beta=50.0, loss="dpo")
    for lora in (4, 0):
        model = tiny(name, lora=lora, lora_b=0.1)
        if not lora:
            model.denoiser.requires_grad_(True)
        params = [p for p in model.denoiser.parameters() if p.requires_grad]
        names = ("adapter_off", "batched", "copy", "cache") if lora else ("copy",)
        cache = None
        if lora:
            _, cache = precompute(model, data, range(6), seed=SEED, device="cpu", ref_path=tmp_path / "ref.st",
                                  epochs=1, batch_size=6, progress=False)
        modes = {n: make_reference(n, model, cache=cache) for n in names}
        calls = []
        hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in model.denoiser.modules()
                 if type(m).__name__ in ("Attention", "FluxAttention")]
        for mode_name, mode in modes.items():
            model.denoiser.disable_gradient_checkpointing()
            calls.clear()
            want_loss, want = _grads(model, mode, batch, cfg, cpu_accelerator, params)
            plain_calls = len(calls)
            enable_gradient_checkpointing(model.denoiser)
            calls.clear()
            got_loss, got = _grads(model, mode, batch, cfg, cpu_accelerator, params)
            assert len(calls) > plain_calls, f"{mode_name}: no block was recomputed in backward"
            torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6, msg=f"{mode_name} lora={lora}")
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * w.abs().max().item(),
                                           msg=f"{mode_name} lora={lora} gradient")
            assert max(w.abs().max().item() for w in want) > 1e-4  # a real gradient
            if mode_name == "copy":
                assert not modes["copy"].frozen.is_gradient_checkpointing  # runs under no_grad: needs none
        for h in hooks:
            h.remove()


def test_batched_mode_with_checkpointing_recomputes_with_the_adapter_mask(tiny, run_config, cpu_accelerator):
    """The recomputed forward of a checkpointed block sees the per-sample adapter mask: without it the
    reference rows would run with the adapter on and the LoRA gradient would differ."""
    model = tiny("fastpref:tiny-sd3", lora=4, lora_b=0.5)
    data = SyntheticPreferences(6, 8, seed=SEED)
    batch = collate_pairs([data[i] for i in BATCH])
    cfg = run_config(seed=SEED, beta=50.0, loss="dpo")
    params = [p for p in model.denoiser.parameters() if p.requires_grad]
    mode = make_reference("batched", model)
    seen = []
    layers = tuner_layers(model.denoiser)
    hooks = [layers[0].register_forward_hook(lambda m, a, kw, out: seen.append(kw.get("adapter_names")),
                                             with_kwargs=True)]
    enable_gradient_checkpointing(model.denoiser)
    _grads(model, mode, batch, cfg, cpu_accelerator, params)
    hooks[0].remove()
    n = 2 * len(BATCH)
    assert len(seen) == 2  # the forward and the recompute
    assert all(names is not None and names[n:] == ["__base__"] * n and "__base__" not in names[:n] for names in seen)


def test_trainer_with_gradient_checkpointing_follows_the_run_without(run_config, tiny):
    """--gradient_checkpointing through the loop (batched reference, the mode that needs the mask again):
    the same predictions step by step as the run without it."""
    seen = {}
    models = {}
    for gc in (False, True):
        models[gc] = tiny()
        train(run_config(output_dir=os.path.join(run_config().output_dir, str(gc)), reference_mode="batched",
                         gradient_checkpointing=gc), model=models[gc],
              on_step=lambda step, out, gc=gc: seen.setdefault((gc, step), out))
    assert models[True].denoiser.is_gradient_checkpointing and not models[False].denoiser.is_gradient_checkpointing
    for step in (1, 2):
        torch.testing.assert_close(seen[(True, step)].model_pred, seen[(False, step)].model_pred)
        torch.testing.assert_close(seen[(True, step)].ref["ref_pred"], seen[(False, step)].ref["ref_pred"])
    assert (seen[(True, 2)].model_pred - seen[(True, 2)].ref["ref_pred"]).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------
# --vae_encode_batch_size, --pretrained_vae_model_name_or_path, --variant
# ----------------------------------------------------------------------------------------------


def test_vae_encode_batch_size_gives_the_same_latents_in_chunks(tiny, tmp_path):
    model = tiny(vae=True)
    data = SyntheticPreferences(5, 16, seed=SEED)
    batch = collate_pairs([data[i] for i in range(5)])  # 10 images
    sizes = []
    encode = model.vae.encode
    model.vae.encode = lambda x: sizes.append(x.shape[0]) or encode(x)
    from fastpref.train.cache import encode as step_encode

    latents = {}
    for chunk in (None, 3, 1):
        model.vae_encode_batch_size = chunk
        sizes.clear()
        latents[chunk], _ = step_encode(model, batch, SEED, "cpu")
        assert sizes == {None: [10], 3: [3, 3, 3, 1], 1: [1] * 10}[chunk]
    torch.testing.assert_close(latents[3], latents[None], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(latents[1], latents[None], rtol=1e-5, atol=1e-6)
    # the latent-cache build encodes through the same path: chunks of 3 there too
    model.vae_encode_batch_size = 3
    sizes.clear()
    cache, _ = precompute(model, data, range(5), seed=SEED, device="cpu", latents_path=tmp_path / "lat.st",
                          batch_size=5, progress=False)
    assert sizes == [3, 3, 3, 1]
    row = cache[2]["latents"]
    torch.testing.assert_close(row, torch.stack([latents[None][2], latents[None][7]]), rtol=1e-5, atol=1e-6)


def test_a_separate_vae_is_loaded_checked_and_in_the_latent_fingerprint(tmp_path, tiny):
    folders = {}
    for seed in (0, 1):
        folders[seed] = str(tmp_path / f"vae{seed}")
        _vae(seed).save_pretrained(folders[seed])
    model = load_model("fastpref:tiny-unet", vae=folders[1])
    want = _vae(1).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.vae.state_dict().items())
    assert model.resolution == 32  # 16 latents × the VAE's factor 2

    data = SyntheticPreferences(4, 32, seed=SEED)
    data.resolution = 32
    prints = {seed: latents_fingerprint(load_model("fastpref:tiny-unet", vae=folders[seed]), data, range(4), SEED)
              for seed in (0, 1)}
    assert prints[0]["vae"] != prints[1]["vae"]
    assert {k for k in prints[0] if prints[0][k] != prints[1][k]} == {"vae"}

    # a pipeline folder: the separate VAE replaces its own
    pipe = tiny(vae=True)
    save_model(pipe, str(tmp_path / "pipe"))
    assert torch.equal(load_model(str(tmp_path / "pipe")).vae.encoder.conv_in.weight, pipe.vae.encoder.conv_in.weight)
    swapped = load_model(str(tmp_path / "pipe"), vae=folders[0])
    assert torch.equal(swapped.vae.encoder.conv_in.weight, _vae(0).encoder.conv_in.weight)

    _vae(0, latent_channels=4).save_pretrained(str(tmp_path / "vae4"))
    with pytest.raises(ValueError, match="--pretrained_vae_model_name_or_path .*4 latent channels, the denoiser "
                                         "expects 3"):
        load_model("fastpref:tiny-unet", vae=str(tmp_path / "vae4"))
    with pytest.raises(ValueError, match="--pretrained_vae_model_name_or_path .*no AutoencoderKL found there"):
        load_model("fastpref:tiny-unet", vae=str(tmp_path / "missing"))


def test_variant_is_passed_to_every_component_with_weights(tmp_path, tiny):
    """A pipeline whose weights exist only as the fp16 variant (*.fp16.safetensors) loads with --variant fp16
    (every component: denoiser, text encoder, VAE) and is refused without it."""
    pipe = tiny(vae=True)
    folder = str(tmp_path / "pipe")
    save_model(pipe, folder)
    for sub, module in (("unet", pipe.denoiser), ("text_encoder", pipe.text_encoders[0]), ("vae", pipe.vae)):
        for f in glob.glob(os.path.join(folder, sub, "*.safetensors")):
            os.remove(f)
        module.save_pretrained(os.path.join(folder, sub), variant="fp16")
    model = load_model(folder, variant="fp16")
    for got, want in ((model.denoiser, pipe.denoiser), (model.text_encoders[0], pipe.text_encoders[0]),
                      (model.vae, pipe.vae)):
        ref = want.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in got.state_dict().items())
    with pytest.raises(Exception):
        load_model(folder)
    # the separate VAE too
    _vae(1).save_pretrained(str(tmp_path / "vae16"), variant="fp16")
    assert load_model("fastpref:tiny-unet", vae=str(tmp_path / "vae16"), variant="fp16").vae is not None


# ----------------------------------------------------------------------------------------------
# --use_8bit_adam, --allow_tf32
# ----------------------------------------------------------------------------------------------


def test_a_missing_bitsandbytes_is_one_clear_error_before_any_model_loads(monkeypatch, run_config, capsys):
    import fastpref.train.loop as loop
    from fastpref.train import main

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes → ImportError

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the optimizer was checked")

    monkeypatch.setattr(loop, "load_model", no_model)
    with pytest.raises(ValueError) as err:
        train(run_config(use_8bit_adam=True))
    assert str(err.value) == BITSANDBYTES_MISSING
    assert "bitsandbytes" in str(err.value) and "pip install bitsandbytes" in str(err.value)
    assert main(["--use_8bit_adam", "--output_dir", run_config().output_dir]) == 2
    assert BITSANDBYTES_MISSING in capsys.readouterr().err


@pytest.fixture
def tf32_off():
    """TF32 switched off for the test, PyTorch's settings restored after (they are process-wide)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_the_switches_reach_the_trainer(monkeypatch, run_config, tiny, tf32_off, tmp_path):
    """With bitsandbytes present the run's optimizer is AdamW8bit, with the run's hyperparameters;
    --allow_tf32 sets both TF32 switches; a model given to train() gets --pretrained_vae_model_name_or_path's
    VAE, encoding --vae_encode_batch_size images per call. (bitsandbytes itself is stood in for: it needs a
    GPU.)"""
    made = []

    class AdamW8bit(torch.optim.AdamW):
        def __init__(self, params, **kw):
            made.append(kw)
            super().__init__(params, **kw)

    import fastpref.train.memory as memory

    # not a module in sys.modules: diffusers and peft probe an installed bitsandbytes for more than AdamW8bit
    monkeypatch.setattr(memory, "_import_bitsandbytes", lambda: types.SimpleNamespace(
        optim=types.SimpleNamespace(AdamW8bit=AdamW8bit)))
    _vae(1).save_pretrained(str(tmp_path / "vae"))
    sizes = []
    real_encode = type(_vae(1)).encode

    def encode(self, x, *args, **kwargs):
        sizes.append(x.shape[0])
        return real_encode(self, x, *args, **kwargs)

    monkeypatch.setattr(type(_vae(1)), "encode", encode)
    cfg = run_config(use_8bit_adam=True, allow_tf32=True, max_train_steps=1, learning_rate=3e-3, adam_beta2=0.99,
                     adam_weight_decay=0.0, adam_epsilon=1e-6, vae_encode_batch_size=3,
                     pretrained_vae_model_name_or_path=str(tmp_path / "vae"), validation_prompts=["a red disc"])
    model = tiny()
    train(cfg, model=model)
    assert made == [dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.0, eps=1e-6)]
    assert model.vae is not None and torch.equal(model.vae.encoder.conv_in.weight, _vae(1).encoder.conv_in.weight)
    assert sizes[:2] == [3, 1]  # the step's 2 pairs = 4 images, in chunks of 3
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert type(build_optimizer(config_from_dict({}), [torch.nn.Parameter(torch.zeros(2))])) is torch.optim.AdamW


def test_allow_tf32_false_leaves_the_settings(tf32_off):
    torch.backends.cudnn.allow_tf32 = True
    apply_allow_tf32(False)
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    apply_allow_tf32(True)
    assert torch.backends.cuda.matmul.allow_tf32


# ----------------------------------------------------------------------------------------------
# Flags, TOML, validation, --help
# ----------------------------------------------------------------------------------------------


def test_the_flags_parse_from_the_command_line_and_toml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('gradient_checkpointing = true\nuse_8bit_adam = false\nallow_tf32 = true\nvariant = "fp16"\n'
                    'pretrained_vae_model_name_or_path = "madebyollin/sdxl-vae-fp16-fix"\nvae_encode_batch_size = 2\n')
    values = load_toml(str(toml))
    cfg = config_from_dict(values).validate()
    assert (cfg.gradient_checkpointing, cfg.use_8bit_adam, cfg.allow_tf32, cfg.variant, cfg.vae_encode_batch_size) == (
        True, False, True, "fp16", 2)
    assert cfg.pretrained_vae_model_name_or_path == "madebyollin/sdxl-vae-fp16-fix"
    ns = build_parser().parse_args(["--config", str(toml), "--no-gradient_checkpointing", "--use_8bit_adam",
                                    "--vae_encode_batch_size", "5"])
    from fastpref.train.config import config_from_values

    cli = config_from_values(ns)
    assert (cli.gradient_checkpointing, cli.use_8bit_adam, cli.vae_encode_batch_size, cli.variant) == (
        False, True, 5, "fp16")
    assert TrainConfig().vae_encode_batch_size == 8  # diffusers' default


@pytest.mark.parametrize("key,value,match", [
    ("vae_encode_batch_size", 0, "--vae_encode_batch_size must be an integer ≥ 1"),
    ("vae_encode_batch_size", 2.5, "--vae_encode_batch_size must be an integer ≥ 1"),
    ("gradient_checkpointing", "yes", "--gradient_checkpointing must be true or false"),
    ("use_8bit_adam", 1, "--use_8bit_adam must be true or false"),
    ("allow_tf32", None, "--allow_tf32 must be true or false"),
    ("variant", "fp16/../x", "--variant must be a weight variant name such as fp16"),
    ("variant", "", "--variant must be a weight variant name"),
    ("pretrained_vae_model_name_or_path", "", "--pretrained_vae_model_name_or_path must be a VAE folder or hub id"),
])
def test_bad_flag_values_are_refused(key, value, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        config_from_dict({key: value}).validate()


def test_help_lists_the_families_the_embedded_models_and_the_losses(monkeypatch):
    import fastpref.train.models as models

    text = build_parser().format_help()
    for name in (*FAMILIES, *TINY_MODELS, *OBJECTIVES):
        assert name in text, name
    for flag in ("--gradient_checkpointing", "--use_8bit_adam", "--allow_tf32", "--pretrained_vae_model_name_or_path",
                 "--vae_encode_batch_size", "--variant"):
        assert flag in text
    # generated from the tuples: a new family or embedded model appears without touching the help text
    monkeypatch.setattr(models, "TINY_MODELS", (*TINY_MODELS, "fastpref:tiny-new"))
    monkeypatch.setattr(models, "FAMILIES", {**FAMILIES, "newfam": "a new family"})
    text = build_parser().format_help()
    assert "fastpref:tiny-new" in text and "newfam: a new family" in text


def test_frozen_copy_of_a_checkpointed_policy_is_not_checkpointed(tiny):
    model = tiny(lora=4)
    enable_gradient_checkpointing(model.denoiser)
    mode = make_reference("copy", model)
    assert model.denoiser.is_gradient_checkpointing and not mode.frozen.is_gradient_checkpointing


def test_vae_stays_fp32_under_fp16_when_its_config_asks():
    """Under --mixed_precision fp16 a VAE with ``force_upcast`` (the default of diffusers' AutoencoderKL and
    of the SD/SDXL/SD3/Flux VAE configs) is kept in fp32; one that clears it (the SDXL fp16-fix VAE) and
    every VAE under bf16 take the frozen parts' dtype."""
    vae = _vae(1)
    assert vae.config.force_upcast
    assert vae_dtype(vae, "fp16") == torch.float32
    assert vae_dtype(vae, "bf16") == torch.bfloat16
    assert vae_dtype(vae, "no") == torch.float32
    vae.register_to_config(force_upcast=False)
    assert vae_dtype(vae, "fp16") == torch.float16
    assert weight_dtype("fp16") == torch.float16  # the text encoders' dtype is unchanged
