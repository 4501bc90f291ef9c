"""The reference modes (fastpref.train.reference): every mode gives the loss and gradient of the
diffusers-style two-call step on the same batch, through the loop's own compute_loss.

The equality tests run in float64 (tiny models, LoRA with random B so policy ≠ reference), where the only
difference between one forward over 2n rows and two forwards over n rows, or between a cached reference
error and one computed in the step, is summation order (~1e-15 relative). Their objectives call the losses
with ``backend="torch"`` (the fused kernels compute in fp32 and are tested against it elsewhere): what is
compared here is the reference each mode delivers.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastpref
from fastpref.reference import pair_errors
from fastpref.train import compute_loss, train
from fastpref.train.cache import collate_cached, encode, precompute
from fastpref.train.data import SyntheticPreferences, collate_pairs
from fastpref.train.models import build_tiny_model
from fastpref.train.noise import noise_pairs
from fastpref.train.objectives import Objective, get_objective
from fastpref.train.reference import (
    REFERENCE_MODES,
    adapters_disabled,
    batched_policy_and_reference,
    make_reference,
    resolve_reference_mode,
    tuner_layers,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED, EPOCH = 7, 1
BATCH = [4, 1, 3]  # pair indices of the batch, not sorted on purpose


def _double(model):
    for m in [model.denoiser, *model.text_encoders]:
        m.double()
    return model


def _fp64_objective(loss: str) -> Objective:
    fn = {"dpo": fastpref.dpo_loss, "dmpo": fastpref.dmpo_loss}[loss]
    return Objective(loss, lambda pred, ref, target, cfg, group=None: (
        fn(pred, target=target, beta=cfg.beta, backend="torch", **ref), None))


class DoublePairs(SyntheticPreferences):
    def __getitem__(self, i):
        item = super().__getitem__(i)
        return {**item, "pixel_values": item["pixel_values"].double()}


@pytest.mark.parametrize("name", ["fastpref:tiny-unet", "fastpref:tiny-sdxl", "fastpref:tiny-sd3", "fastpref:tiny-sd35",
                                  "fastpref:tiny-flux"])
def test_every_mode_gives_the_same_loss_and_gradient(tmp_path, tiny, run_config, cpu_accelerator, name):
    model = _double(tiny(name, lora=4, lora_b=0.1))
    data = DoublePairs(6, 8, seed=SEED)
    latents, cache = precompute(model, data, range(6), seed=SEED, device="cpu", ref_path=tmp_path / "ref.safetensors",
                                latents_path=tmp_path / "latents.safetensors", epochs=2, dtype=torch.float64,
                                batch_size=4, progress=False)
    batch = collate_pairs([data[i] for i in BATCH])
    batch["epoch"] = EPOCH
    cached = {**collate_cached([latents[i] for i in BATCH]), "epoch": EPOCH}  # --cache_latents: the same batch
    lora = [p for p in model.denoiser.parameters() if p.requires_grad]
    modes = {name: make_reference(name, model, cache=cache) for name in ("adapter_off", "batched", "copy", "cache")}
    assert set(modes) | {"none"} == set(REFERENCE_MODES)

    # β such that |u| is O(1) on this batch (a saturated loss would hide differences)
    base = compute_loss(model, model.denoiser, modes["adapter_off"], _fp64_objective("dpo"), batch,
                        run_config(seed=SEED, beta=1.0), cpu_accelerator)
    e_m, e_r = pair_errors(base.model_pred, base.target), pair_errors(base.ref["ref_pred"], base.target)
    assert (e_m - e_r).abs().max() > 1e-3  # the adapter changes the prediction: the test can fail
    b = len(BATCH)
    beta = 2.0 / ((e_m[:b] - e_m[b:]) - (e_r[:b] - e_r[b:])).abs().max().item()

    for loss in ("dpo", "dmpo"):
        cfg = run_config(seed=SEED, beta=beta, loss=loss)
        results = {}
        for mode_name, mode in modes.items():
            for source, b in (("", batch), (" + cache_latents", cached)):
                out = compute_loss(model, model.denoiser, mode, _fp64_objective(loss), b, cfg, cpu_accelerator)
                assert set(out.ref) == ({"ref_err"} if mode_name == "cache" else {"ref_pred"})
                assert not any(v.requires_grad for v in out.ref.values())
                results[mode_name + source] = (out.loss.detach(), torch.autograd.grad(out.loss, lora))
        want_loss, want_grads = results["adapter_off"]
        assert abs(want_loss.item() - torch.log(torch.tensor(2.0)).item()) > 1e-3  # u ≠ 0: a real comparison
        for mode_name, (got_loss, grads) in results.items():
            torch.testing.assert_close(got_loss, want_loss, rtol=1e-11, atol=1e-11, msg=f"{mode_name} {loss}")
            for g, w in zip(grads, want_grads):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10 * w.abs().max().item(),
                                           msg=f"{mode_name} {loss} gradient")

    none = compute_loss(model, model.denoiser, make_reference("none", model), get_objective("mapo"), batch,
                        run_config(seed=SEED, loss="mapo"), cpu_accelerator)
    assert none.ref == {}
    torch.testing.assert_close(none.model_pred, base.model_pred, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["fastpref:tiny-unet", "fastpref:tiny-sdxl", "fastpref:tiny-sd3", "fastpref:tiny-sd35",
                                  "fastpref:tiny-flux"])
def test_batched_rows_equal_two_calls_in_fp32(tiny, name):
    model = tiny(name, lora=4, lora_b=0.1)
    data = SyntheticPreferences(4, 8)
    x0, cond = encode(model, collate_pairs([data[i] for i in range(4)]), SEED, "cpu")  # SDXL: + time ids
    noised = noise_pairs(model, x0, range(4), 0, SEED)
    model_pred, ref_pred = batched_policy_and_reference(model, model.denoiser, noised, cond)
    with torch.no_grad():
        want_policy = model.predict(model.denoiser, noised.noisy, noised.timesteps, cond)
        with adapters_disabled(model.denoiser):
            want_ref = model.predict(model.denoiser, noised.noisy, noised.timesteps, cond)
    torch.testing.assert_close(model_pred.detach(), want_policy)
    torch.testing.assert_close(ref_pred, want_ref)
    assert model_pred.requires_grad and not ref_pred.requires_grad
    assert (want_policy - want_ref).abs().max() > 1e-3


def test_adapters_disabled_restores_each_layer(tiny):
    model = tiny(lora=4)
    layers = tuner_layers(model.denoiser)
    layers[0].enable_adapters(False)  # a user had switched one layer off: keep it so
    with adapters_disabled(model.denoiser):
        assert all(layer.disable_adapters for layer in layers)
    assert layers[0].disable_adapters and not any(layer.disable_adapters for layer in layers[1:])


def test_full_finetune_copy_stays_frozen_while_the_policy_trains(run_config, tiny):
    model = tiny()
    start = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    steps = []
    train(run_config(lora_rank=0, max_train_steps=3, learning_rate=1e-3), model=model,
          on_step=lambda step, out: steps.append(out))
    # step 1: the policy equals its frozen copy, u = 0 exactly; later the policy has moved, the copy not
    assert torch.equal(steps[0].model_pred, steps[0].ref["ref_pred"])
    assert torch.equal(steps[0].stats.margin, torch.zeros_like(steps[0].stats.margin))
    assert not torch.equal(steps[-1].model_pred, steps[-1].ref["ref_pred"])
    assert any(not torch.equal(start[k], v) for k, v in model.denoiser.state_dict().items())


def test_trainer_batched_mode_matches_adapter_off(run_config, tiny):
    """--reference_mode batched: the predictions of adapter_off, step by step (same seed: same batches and
    draws); at step 2 the adapter is non-zero, so the policy and reference rows differ."""
    seen = {}
    for mode in ("adapter_off", "batched"):
        train(run_config(output_dir=os.path.join(run_config().output_dir, mode), reference_mode=mode), model=tiny(),
              on_step=lambda step, out, mode=mode: seen.setdefault((mode, step), out))
    for step in (1, 2):
        a, b = seen[("adapter_off", step)], seen[("batched", step)]
        torch.testing.assert_close(b.model_pred, a.model_pred)
        torch.testing.assert_close(b.ref["ref_pred"], a.ref["ref_pred"])
    assert (seen[("batched", 2)].model_pred - seen[("batched", 2)].ref["ref_pred"]).abs().max() > 1e-4


def test_cache_mode_trains_like_adapter_off_and_refuses_another_run(tmp_path, run_config):
    from fastpref.train.cache import main as precompute_main

    ref = str(tmp_path / "ref.safetensors")
    toml = tmp_path / "run.toml"
    toml.write_text(f'pretrained_model_name_or_path = "fastpref:tiny-sd3"\nsynthetic_size = 12\neval_pairs = 2\n'
                    f'train_batch_size = 2\nmax_train_steps = 6\nseed = 3\nloss = "dpo"\nlora_rank = 4\n'
                    f'reference_mode = "cache"\nref_cache = "{ref}"\noutput_dir = "{tmp_path / "out"}"\n')
    assert precompute_main(["--config", str(toml), "--device", "cpu"]) == 0
    import safetensors.torch

    stored = safetensors.torch.load_file(ref)
    # 12 rows, 2 held out → 10 training pairs → 5 batches an epoch → 6 steps read 2 epochs; every row cached
    assert stored["ref_err"].shape == (2, 12, 2) and torch.isfinite(stored["ref_err"]).all()

    seen = {}
    kw = dict(pretrained_model_name_or_path="fastpref:tiny-sd3", max_train_steps=6, beta=100.0)  # the command's model
    for mode in ("cache", "adapter_off"):  # 6 steps: the second epoch's draws are used too
        train(run_config(output_dir=str(tmp_path / mode), reference_mode=mode, ref_cache=ref, **kw),
              on_step=lambda step, out, mode=mode: seen.setdefault((mode, step), out))
    for step in range(1, 7):  # the reference's errors on the step's draws, epoch 1 included, to fp32 rounding
        a, b = seen[("cache", step)], seen[("adapter_off", step)]
        assert set(a.ref) == {"ref_err"}
        torch.testing.assert_close(a.ref["ref_err"], pair_errors(b.ref["ref_pred"], b.target), rtol=2e-6, atol=1e-7)
    # step 1 (same policy in both runs): the loss moves by at most |dℓ/du|·½β·Σ|δe_ref| ≤ β·max|δe_ref|, where
    # δe_ref also holds the fused kernel's own fp32 accumulation of e_ref from ref_pred, ≤ 2·eps32·|e|
    a, b = seen[("cache", 1)], seen[("adapter_off", 1)]
    want = pair_errors(b.ref["ref_pred"], b.target)
    delta = (a.ref["ref_err"] - want).abs().max().item() + 2 * torch.finfo(torch.float32).eps * want.abs().max().item()
    assert abs(a.loss.item() - b.loss.item()) <= 100.0 * delta

    with pytest.raises(ValueError, match=r"different .*seed"):
        train(run_config(reference_mode="cache", ref_cache=ref, seed=4, **kw))
    other = build_tiny_model("fastpref:tiny-sd3")
    with torch.no_grad():
        next(other.denoiser.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match=r"different model"):
        train(run_config(reference_mode="cache", ref_cache=ref, **kw), model=other)
    with pytest.raises(ValueError, match=r"different timestep_sampling"):
        train(run_config(reference_mode="cache", ref_cache=ref, weighting_scheme="none", **kw))
    with pytest.raises(ValueError, match="--epochs 3"):
        train(run_config(reference_mode="cache", ref_cache=ref, **{**kw, "max_train_steps": 11}))
    with pytest.raises(ValueError, match="fastpref-precompute"):
        train(run_config(reference_mode="cache", ref_cache=str(tmp_path / "missing.safetensors"), **kw))


def test_bad_configurations_are_refused_with_a_clear_message(tiny, run_config):
    full, lora = tiny(), tiny(lora=4)
    with pytest.raises(ValueError, match="reference mode must be one of"):
        make_reference("twice", lora)
    for mode in ("batched", "adapter_off"):
        with pytest.raises(ValueError, match="needs a LoRA model"):
            make_reference(mode, full)
    with pytest.raises(TypeError, match="needs cache="):
        make_reference("cache", full)
    objective = get_objective("dpo")
    with pytest.raises(ValueError, match="needs LoRA"):
        resolve_reference_mode(run_config(lora_rank=0, reference_mode="batched"), objective)
    with pytest.raises(ValueError, match="reference-free"):
        resolve_reference_mode(run_config(reference_mode="copy"), get_objective("mapo"))
    assert resolve_reference_mode(run_config(), objective) == "adapter_off"
    assert resolve_reference_mode(run_config(lora_rank=0), objective) == "copy"
    assert resolve_reference_mode(run_config(), get_objective("orpo")) == "none"
    lora.denoiser.enable_gradient_checkpointing()  # diffusers' own checkpoint function: the recompute loses the mask
    noised = noise_pairs(lora, torch.zeros(2, 3, 8, 8), [0], 0, SEED)
    with pytest.raises(ValueError, match="enable_gradient_checkpointing"):
        batched_policy_and_reference(lora, lora.denoiser, noised, lora.encode_prompts(["a", "a"], "cpu"))
