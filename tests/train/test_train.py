"""The trainer (fastpref.train) on tiny models built from configs, on the CPU, nothing downloaded.

Every run here is a real ``train()`` call: the synthetic data set, the loss registry, LoRA and full
fine-tuning, ε / v / flow-matching targets and the logs (checkpoints and resume: tests/train/test_resume.py).
"""

from __future__ import annotations

import csv
import os

import pytest
import torch
import torch.nn.functional as F

from fastpref.reference import pair_loss_ref
from fastpref.train import TrainConfig, parse_args, train
from fastpref.train.data import SyntheticPreferences
from fastpref.train.models import TINY_MODELS, build_tiny_model, load_model, save_model
from fastpref.train.objectives import OBJECTIVES
from _runs import run_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(name: str = "fastpref:tiny-unet"):
    return build_tiny_model(name, sample_size=8)




def read_rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def trainable_snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}


# ----------------------------------------------------------------------------------------------
# Each loss × target type × LoRA / full runs, changes the trained weights and nothing else
# ----------------------------------------------------------------------------------------------

MATRIX = [("fastpref:tiny-unet", name, 4) for name in sorted(OBJECTIVES)]  # every registered loss, ε, LoRA
MATRIX += [(m, loss, rank) for m in TINY_MODELS for loss, rank in (("dmpo", 4), ("dpo", 0))
           if (m, loss, rank) not in MATRIX]


@pytest.mark.parametrize("model_name,loss,rank", MATRIX)
def test_a_few_steps_train_the_policy_only(tmp_path, model_name, loss, rank):
    model = tiny(model_name)
    base_before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    # a full fine-tune at the LoRA rate (1e-3) saturates the margin in one step (loss 0, no gradient)
    cfg = run_config(tmp_path, loss=loss, lora_rank=rank, **({} if rank else {"learning_rate": 1e-5}))
    seen = {}

    def on_step(step, out):
        seen.setdefault("trainable", trainable_snapshot(model.denoiser))

    result = train(cfg, model=model, on_step=on_step)
    assert result.global_step == 2
    rows = read_rows(os.path.join(cfg.output_dir, "logs", "train.csv"))
    assert [int(r["step"]) for r in rows] == [1, 2]
    for r in rows:
        assert torch.isfinite(torch.tensor(float(r["loss"])))
        assert float(r["grad_norm"]) > 0 and float(r["pairs_per_s"]) > 0 and float(r["peak_mem_mb"]) > 0
    after = trainable_snapshot(model.denoiser)
    assert any(not torch.equal(seen["trainable"][k], after[k]) for k in after), "no trained weight moved"
    if rank:  # LoRA: the base weights (= the reference) are untouched; only adapters are trainable
        assert all("lora" in k for k in after)
        base_after = {k.replace(".base_layer", ""): v for k, v in model.denoiser.state_dict().items() if "lora" not in k}
        assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
        assert os.path.isfile(os.path.join(cfg.output_dir, "pytorch_lora_weights.safetensors"))
    else:
        folder = "unet" if model.family in ("unet", "sdxl") else "transformer"
        assert os.path.isfile(os.path.join(cfg.output_dir, folder, "config.json"))


# ----------------------------------------------------------------------------------------------
# The logged loss is the reference loss (and the diffusers formula) on the same batch
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name,loss", [("fastpref:tiny-unet", "dpo"), ("fastpref:tiny-unet-v", "dmpo"),
                                             ("fastpref:tiny-sd3", "dmpo")])
def test_logged_loss_equals_reference_loss(tmp_path, model_name, loss):
    captured = {}

    def on_step(step, out):
        captured[step] = out

    cfg = run_config(tmp_path, loss=loss, lora_rank=4, max_train_steps=3, beta=500.0)
    train(cfg, model=tiny(model_name), on_step=on_step)
    rows = read_rows(os.path.join(cfg.output_dir, "logs", "train.csv"))
    for r in rows:
        out = captured[int(r["step"])]
        b = out.model_pred.shape[0] // 2
        assert torch.equal(out.timesteps[:b], out.timesteps[b:]), "a pair must share its timestep"
        ref_loss, u, model_err, ref_err = pair_loss_ref(
            "sigmoid" if loss == "dpo" else loss, out.model_pred, out.ref["ref_pred"], out.target, beta=500.0, alpha=0.01
        )
        # u = −½β·(difference of four fp32 errors): fp32 rounding of each error, scaled by ½β, bounds
        # the kernel-vs-reference gap in u; the loss's gap is that times |dℓ/du|.
        u_atol = 0.5 * 500.0 * 4 * torch.finfo(torch.float32).eps * float(model_err.abs().max())
        sig = torch.sigmoid(u.double())
        dl_du = sig - 1 if loss == "dpo" else sig * (1 - sig) * (u.double() - torch.log(torch.tensor(0.99 / 0.01)))
        loss_atol = u_atol * float(dl_du.abs().max()) + 1e-6
        torch.testing.assert_close(float(r["loss"]), ref_loss.item(), rtol=1e-6, atol=loss_atol)
        torch.testing.assert_close(float(r["u"]), u.mean().item(), rtol=0, atol=u_atol)
        if loss == "dpo":  # the diffusers example's lines, verbatim in spirit
            target = out.target if out.target.shape[0] == 2 * b else torch.cat([out.target, out.target])
            mse = (out.model_pred.float() - target).pow(2).mean(dim=[1, 2, 3])
            ref_mse = (out.ref["ref_pred"].float() - target).pow(2).mean(dim=[1, 2, 3])
            inside = -0.5 * 500.0 * ((mse[:b] - mse[b:]) - (ref_mse[:b] - ref_mse[b:]))
            torch.testing.assert_close(float(r["loss"]), (-F.logsigmoid(inside)).mean().item(), rtol=1e-6, atol=loss_atol)


# ----------------------------------------------------------------------------------------------
# Bad flags, configs and data are refused before training, with what to fix
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,match", [
    (["--loss", "nope"], "--loss must be one of"),
    (["--alpha", "1.5"], "--alpha must lie strictly between 0 and 1"),
    (["--learning_rate", "-1"], "--learning_rate must be a finite number > 0"),
    (["--beta", "nan"], "--beta must be a finite number > 0"),
    (["--train_batch_size", "0"], "--train_batch_size must be an integer ≥ 1"),
    (["--mixed_precision", "fp8"], "--mixed_precision must be one of"),
    (["--reference_mode", "adapter_off", "--lora_rank", "0"], None),  # refused by train(), see below
    (["--resume_from_checkpoint", "/no/such/checkpoint"], "--resume_from_checkpoint must be 'latest'"),
    (["--validation_prompts", " "], "--validation_prompts must be a list of non-empty strings"),
    (["--report_to", "wandb"], "--report_to takes"),
])
def test_bad_flags_are_refused(argv, match):
    if match is None:
        cfg = parse_args(argv)
        with pytest.raises(ValueError, match="adapter_off needs LoRA"):
            train(cfg)
        return
    with pytest.raises(ValueError, match=match):
        parse_args(argv)


def test_reference_mode_must_fit_the_loss(tmp_path):
    with pytest.raises(ValueError, match="needs a reference model"):
        train(run_config(tmp_path, loss="dpo", reference_mode="none"), model=tiny())


def test_toml_config_and_flag_precedence(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('loss = "dpo"\nbeta = 2500\nlora_rank = 0\nvalidation_prompts = ["a red disc"]\n')
    cfg = parse_args(["--config", str(toml), "--beta", "1000"])
    assert (cfg.loss, cfg.beta, cfg.lora_rank, cfg.validation_prompts) == ("dpo", 1000.0, 0, ["a red disc"])
    assert isinstance(parse_args(["--config", str(toml)]).beta, float)
    toml.write_text('lerning_rate = 1e-4\n')
    with pytest.raises(ValueError, match=r"unknown keys \['lerning_rate'\]"):
        parse_args(["--config", str(toml)])
    toml.write_text('loss = "dpo\n')
    with pytest.raises(ValueError, match="not valid TOML"):
        parse_args(["--config", str(toml)])


def test_the_example_config_is_valid():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    cfg = parse_args(["--config", os.path.join(root, "examples", "tiny.toml")])
    assert (cfg.pretrained_model_name_or_path, cfg.dataset, cfg.loss) == ("fastpref:tiny-unet-v", "synthetic", "mapo")


def test_cli_reports_errors_without_traceback(capsys):
    from fastpref.train import main

    assert main(["--loss", "nope"]) == 2
    assert "fastpref-train: error: --loss must be one of" in capsys.readouterr().err
    assert main(["--pretrained_model_name_or_path", "/no/such/model", "--output_dir", "/tmp/x"]) == 2
    assert "no diffusers pipeline found" in capsys.readouterr().err


def test_too_little_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(run_config(tmp_path, synthetic_size=4, train_batch_size=4), model=tiny())


# ----------------------------------------------------------------------------------------------
# Models from a local diffusers folder
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["fastpref:tiny-unet-v", "fastpref:tiny-sd3", "fastpref:tiny-flux"])
def test_local_diffusers_folder_round_trip(tmp_path, model_name):
    model = tiny(model_name)
    save_model(model, str(tmp_path / "pipe"))
    loaded = load_model(str(tmp_path / "pipe"))
    assert (loaded.family, loaded.prediction_type, loaded.resolution, loaded.weighting_scheme) == (
        model.family, model.prediction_type, model.resolution, model.weighting_scheme)
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        c1, c2 = model.encode_prompts(["a red disc"] * 2, "cpu"), loaded.encode_prompts(["a red disc"] * 2, "cpu")
        torch.testing.assert_close(model.predict(model.denoiser, x, t, c1), loaded.predict(loaded.denoiser, x, t, c2))
    cfg = run_config(tmp_path, pretrained_model_name_or_path=str(tmp_path / "pipe"), max_train_steps=1)
    assert train(cfg).global_step == 1


# ----------------------------------------------------------------------------------------------
# Evaluation outputs and the synthetic set's reward
# ----------------------------------------------------------------------------------------------


def test_evaluation_writes_grid_curves_and_tensorboard(tmp_path):
    cfg = run_config(tmp_path, max_train_steps=2, validation_steps=1, report_to="csv,tensorboard,png",
                 validation_prompts=["a red disc", "a blue disc"])
    result = train(cfg, model=tiny())
    assert [e["step"] for e in result.eval_history] == [0, 1, 2]
    for e in result.eval_history:
        assert 0.0 <= e["heldout_accuracy"] <= 1.0 and -1.0 <= e["reward"] <= 1.0
    assert result.eval_history[0]["heldout_accuracy"] == 0.5  # policy == reference: every u = 0, ties count ½
    for step in (0, 1, 2):
        assert os.path.isfile(os.path.join(cfg.output_dir, "samples", f"step-{step:06d}.png"))
    assert os.path.isfile(os.path.join(cfg.output_dir, "curves.png"))
    tb = os.path.join(cfg.output_dir, "logs", "tensorboard")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tb))
    assert len(read_rows(os.path.join(cfg.output_dir, "logs", "eval.csv"))) == 3


def test_synthetic_preference_follows_its_reward():
    ds = SyntheticPreferences(64, 16)
    pix = torch.stack([ds[i]["pixel_values"] for i in range(64)])
    caps = [ds[i]["caption"] for i in range(64)]
    assert bool((ds.reward(pix[:, 0], caps) > ds.reward(pix[:, 1], caps)).all())
    assert torch.equal(ds[5]["pixel_values"], ds[5]["pixel_values"])  # generated on the fly, deterministic


# ----------------------------------------------------------------------------------------------
# Real-data formats: Pick-a-Pic v2 parquet and a metadata.jsonl folder; bad rows skipped and counted
# ----------------------------------------------------------------------------------------------


def _jpeg(color) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (24, 20), color).save(buf, format="JPEG")
    return buf.getvalue()


def _pickapic_rows():
    red, blue = _jpeg((220, 20, 20)), _jpeg((20, 20, 220))
    return [  # (jpg_0, jpg_1, label_0, caption)
        (red, blue, 1.0, "a red disc"),
        (blue, red, 0.0, "a red disc"),  # image 1 preferred: the loader must swap
        (red, blue, 0.5, "a tie"),  # dropped: tie
        (red, blue, 1.0, None),  # dropped: no caption
        (red, blue, 1.0, "   "),  # dropped: empty caption
        (b"not a jpeg", blue, 1.0, "corrupt"),  # skipped when decoded
    ] + [(red, blue, 1.0, f"a red disc {i}") for i in range(10)]


def test_pickapic_parquet_drops_ties_and_counts_bad_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastpref.train.data import CorruptPair, PickAPicParquet, build_dataset, collate_pairs

    rows = _pickapic_rows()
    table = pa.table({k: [r[i] for r in rows] for i, k in enumerate(("jpg_0", "jpg_1", "label_0", "caption"))})
    pq.write_table(table, tmp_path / "train-0.parquet", row_group_size=4)
    ds = build_dataset(str(tmp_path), resolution=8)
    assert isinstance(ds, PickAPicParquet)
    assert dict(ds.skipped) == {"tie": 1, "missing_caption": 2}
    assert len(ds) == len(rows) - 3
    first, swapped = ds[0], ds[1]
    assert first["pixel_values"].shape == (2, 3, 8, 8)
    for item in (first, swapped):  # the winner (slot 0) is the red image either way
        assert item["pixel_values"][0, 0].mean() > 0.5 and item["pixel_values"][1, 2].mean() > 0.5
    assert isinstance(ds[2], CorruptPair)  # the corrupt row
    batch = collate_pairs([ds[0], ds[2], ds[3]])
    assert list(batch["corrupt"]) == [2] and batch["pixel_values"].shape[0] == 2
    # it trains, and the corrupt image is counted in the log
    cfg = run_config(tmp_path, dataset=str(tmp_path / "train-0.parquet"), max_train_steps=4, max_train_pairs=4,
                 eval_pairs=0, train_batch_size=2)
    result = train(cfg, model=tiny())
    assert result.global_step == 4 and result.data_skipped == {"tie": 1, "missing_caption": 2, "corrupt_image": 1}
    # 2 epochs read the corrupt row twice: it is one row
    assert int(read_rows(os.path.join(cfg.output_dir, "logs", "train.csv"))[-1]["corrupt_images"]) == 1


def test_folder_layout_and_empty_dataset(tmp_path):
    import json

    from fastpref.train.data import FolderPairs, build_dataset

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(_jpeg((220, 20, 20)))
    (tmp_path / "img" / "b.jpg").write_bytes(_jpeg((20, 20, 220)))
    lines = [{"image_0": "img/a.jpg", "image_1": "img/b.jpg", "label_0": 0, "caption": "a blue disc"},
             {"image_0": "img/a.jpg", "image_1": "img/b.jpg", "label_0": 0.5, "caption": "tie"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    ds = build_dataset(str(tmp_path), resolution=8)
    assert isinstance(ds, FolderPairs) and len(ds) == 1
    assert dict(ds.skipped) == {"tie": 1, "bad_metadata_line": 1}
    assert ds[0]["pixel_values"][0, 2].mean() > 0.5  # image_1 (blue) won
    (tmp_path / "metadata.jsonl").write_text(json.dumps(lines[1]) + "\n")
    with pytest.raises(ValueError, match=r"no usable preference pair \(1 tie \(.*metadata.jsonl line 1: label_0 0.5\)\)"):
        build_dataset(str(tmp_path), resolution=8)
    with pytest.raises(ValueError, match="expected 'synthetic', a Pick-a-Pic"):
        build_dataset(str(tmp_path / "nowhere.txt"), resolution=8)


def test_supervised_warmup_becomes_the_reference_and_is_reused(tmp_path):
    cfg = run_config(tmp_path, sft_steps=3, sft_learning_rate=1e-2, loss="dpo", lora_rank=0, max_train_steps=1)
    model = tiny()
    start = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    first = []
    train(cfg, model=model, on_step=lambda step, out: first.append(out))
    folder = os.path.join(cfg.output_dir, "sft_model")
    warmed = load_model(folder).denoiser.state_dict()
    assert any(not torch.equal(start[k], warmed[k]) for k in start), "the warm-up did not train"
    # step 1 starts from the warmed-up model, and it is the reference: u = 0 exactly
    assert torch.equal(first[0].model_pred, first[0].ref["ref_pred"])
    # a second run with the same settings reuses the saved warm-up instead of repeating it
    os.utime(os.path.join(folder, "fastpref_sft.json"))
    mtime = os.path.getmtime(os.path.join(folder, "model_index.json"))
    train(run_config(tmp_path, sft_steps=3, sft_learning_rate=1e-2, loss="dpo", lora_rank=0, max_train_steps=1,
                 resume_from_checkpoint="latest"), model=tiny())
    assert os.path.getmtime(os.path.join(folder, "model_index.json")) == mtime


def test_a_saved_warmup_is_recognised_by_another_process():
    """The marker a warm-up is saved with must not depend on the process: diffusers keeps a set in the
    model config (``_use_default_values``), listed in an order that changes with PYTHONHASHSEED."""
    from fastpref.train.loop import _sft_marker

    model, data = tiny("fastpref:tiny-unet-v"), SyntheticPreferences(8, 16)
    cfg = TrainConfig(output_dir="x", sft_steps=3)
    first = _sft_marker(model, data, [0, 1], cfg)
    listed = list(model.denoiser.config["_use_default_values"])
    assert len(listed) > 1
    model.denoiser.register_to_config(_use_default_values=listed[::-1])  # what another process may list
    assert _sft_marker(model, data, [0, 1], cfg) == first
    model.denoiser.register_to_config(norm_num_groups=8)  # a real change of the architecture is seen
    assert _sft_marker(model, data, [0, 1], cfg) != first


def test_bf16_mixed_precision_lora_step(tmp_path):
    captured = []
    cfg = run_config(tmp_path, mixed_precision="bf16", lora_rank=4, loss="dmpo", max_train_steps=2)
    model = tiny()
    train(cfg, model=model, on_step=lambda step, out: captured.append(out))
    pred = captured[0].model_pred  # accelerate hands the output back in fp32; its values are bf16's
    assert torch.equal(pred, pred.bfloat16().float()) and not torch.equal(pred, torch.zeros_like(pred))
    assert all(p.dtype == torch.float32 for n, p in model.denoiser.named_parameters() if p.requires_grad)
    assert all(p.dtype == torch.bfloat16 for n, p in model.denoiser.named_parameters() if "lora" not in n)
    rows = read_rows(os.path.join(cfg.output_dir, "logs", "train.csv"))
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)


def test_fp16_mixed_precision_on_a_cpu_is_one_clear_error(tmp_path):
    """accelerate does not autocast to fp16 on a CPU, so fp16 weights would meet fp32 activations deep in the
    denoiser: refused before any model is loaded."""
    cfg = run_config(tmp_path, mixed_precision="fp16")
    with pytest.raises(ValueError, match="--mixed_precision fp16 needs a GPU"):
        train(cfg, model=None)


def test_latents_are_handed_on_in_the_run_dtype_whatever_the_vae_runs_in(request):
    """A VAE kept in fp32 (fp16 runs, ``force_upcast``) still hands the denoiser latents in the run's dtype, as
    diffusers' SDXL scripts cast them; the values are the fp32 VAE's, rounded once."""
    model = request.getfixturevalue("tiny")(vae=True)  # tests/train/conftest.py's latent tiny model
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    gens = lambda: [torch.Generator().manual_seed(k) for k in range(2)]  # noqa: E731
    full = model.encode_images(pixels, gens())
    assert full.dtype == torch.float32
    model.latents_dtype = torch.float16
    half = model.encode_images(pixels, gens())
    assert half.dtype == torch.float16 and torch.equal(half, full.half())


def test_help_lists_the_diffusers_flags(capsys):
    from fastpref.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--pretrained_model_name_or_path", "--dataset", "--loss", "--beta", "--alpha", "--lora_rank",
                 "--mixed_precision", "--train_batch_size", "--gradient_accumulation_steps", "--learning_rate",
                 "--max_train_steps", "--checkpointing_steps", "--resume_from_checkpoint", "--output_dir", "--seed",
                 "--validation_prompts", "--reference_mode", "--config"):
        assert flag in text, flag
