"""Reference modes: every mode gives the loss of the diffusers-style two-call step on the same batch.

Models are tiny UNet2DConditionModel / SD3Transformer2DModel built from configs, with LoRA adapters
whose B matrices are random (so policy ≠ reference). The equality tests run in float64, where the
only difference between one forward over 2n rows and two forwards over n rows is summation order
(~1e-15 relative); a float32 check compares the predictions at PyTorch's default fp32 tolerance.
The losses use ``backend="torch"`` (the reference): the kernels are tested against it elsewhere, and
what is compared here is the reference each mode delivers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_diffusers import add_lora, random_pairs, scheduler_for, tiny_sd3, tiny_unet

import fastpref
from fastpref.reference import pair_errors
from fastpref.train.latent_cache import stack_pairs
from fastpref.train.ref_cache import noisy_latents_and_target, precompute_reference_errors, sample_noise_and_timesteps
from fastpref.train.reference_modes import (
    REFERENCE_MODES,
    AdapterOffReference,
    BatchedReference,
    CopyReference,
    adapters_disabled,
    batched_policy_and_reference,
    make_reference_mode,
    model_inputs,
)

BUILDERS = {"unet": tiny_unet, "sd3": tiny_sd3}
SEED, EPOCH = 7, 1
BATCH = [2, 0]  # pair indices of the batch, not sorted on purpose


def _lora_model(kind, dtype):
    return add_lora(BUILDERS[kind]()).to(dtype).train()


def _step_inputs(model, pairs, dtype):
    """The batch as a training step builds it: stacked latents, per-(pair, epoch) noise and timestep."""
    scheduler = scheduler_for(model)
    x0, cond = stack_pairs([pairs[i] for i in BATCH])
    noise, t_index = sample_noise_and_timesteps(scheduler, x0.shape[1:], BATCH, EPOCH, SEED)
    x_t, timesteps, target = noisy_latents_and_target(scheduler, x0.to(dtype), noise, t_index)
    return model_inputs(model, x_t, timesteps, {k: v.to(dtype) for k, v in cond.items()}), target


def _beta(model_err, ref_err):
    """β such that |u| is O(1) on this batch, so the losses are not saturated (a flat loss would
    hide differences)."""
    b = model_err.shape[0] // 2
    d = ((model_err[:b] - model_err[b:]) - (ref_err[:b] - ref_err[b:])).abs().max().item()
    return 2.0 / max(d, 1e-12)


@pytest.mark.parametrize("kind", ["unet", "sd3"])
def test_every_mode_gives_the_same_loss_and_gradient(kind):
    dtype = torch.float64
    model = _lora_model(kind, dtype)
    pairs = random_pairs(model, 3, dtype=dtype)
    inputs, target = _step_inputs(model, pairs, dtype)
    scheduler = scheduler_for(model)
    cache = precompute_reference_errors(
        model, pairs, scheduler=scheduler, seed=SEED, epochs=2, dataset_fingerprint="random-pairs", batch_size=2,
        progress=False,
    )
    lora = [p for p in model.parameters() if p.requires_grad]

    # The diffusers example: policy call, then the reference with adapters disabled under no_grad.
    base = AdapterOffReference()(model, inputs)
    e_m, e_r = pair_errors(base.model_pred, target), pair_errors(base.ref_pred, target)
    assert (e_m - e_r).abs().max() > 1e-3  # the adapter changes the prediction: the test can fail
    beta = _beta(e_m.detach(), e_r)

    modes = {
        "adapter_off": AdapterOffReference(),
        "batched": make_reference_mode("batched", model),
        "copy": make_reference_mode("copy", model),
        "cache": make_reference_mode("cache", model, cache=cache),
    }
    assert set(modes) | {"none"} == set(REFERENCE_MODES)
    results = {}
    for name, mode in modes.items():
        out = mode(model, inputs, pair_indices=torch.tensor(BATCH), epoch=EPOCH)
        kw = dict(ref_err=out.ref_err, beta=beta, backend="torch")
        losses = {
            "dpo": fastpref.dpo_loss(out.model_pred, out.ref_pred, target, **kw),
            "dmpo": fastpref.dmpo_loss(out.model_pred, out.ref_pred, target, **kw),
        }
        grads = torch.autograd.grad(losses["dpo"], lora)
        results[name] = ({k: v.detach() for k, v in losses.items()}, grads)
        if out.ref_pred is not None:
            assert not out.ref_pred.requires_grad

    want_losses, want_grads = results["adapter_off"]
    for name, (losses, grads) in results.items():
        for loss_name in losses:
            tol = 1e-11
            torch.testing.assert_close(
                losses[loss_name], want_losses[loss_name], rtol=tol, atol=tol, msg=f"{name} {loss_name}"
            )
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10 * w.abs().max().item(), msg=f"{name} gradient")

    none = make_reference_mode("none", model)(model, inputs)
    assert none.ref_pred is None and none.ref_err is None
    torch.testing.assert_close(none.model_pred, base.model_pred, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["unet", "sd3"])
def test_batched_rows_equal_two_calls_in_fp32(kind):
    model = _lora_model(kind, torch.float32)
    inputs, _ = _step_inputs(model, random_pairs(model, 4), torch.float32)
    model_pred, ref_pred = batched_policy_and_reference(model, inputs)
    with torch.no_grad():
        want_policy = model(**inputs, return_dict=False)[0]
        with adapters_disabled(model):
            want_ref = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(model_pred.detach(), want_policy)
    torch.testing.assert_close(ref_pred, want_ref)
    assert model_pred.requires_grad and not ref_pred.requires_grad
    assert (want_policy - want_ref).abs().max() > 1e-3


def test_adapters_disabled_restores_each_layer():
    from fastpref.train.reference_modes import tuner_layers

    model = _lora_model("unet", torch.float32)
    layers = tuner_layers(model)
    layers[0].enable_adapters(False)  # a user had switched one layer off: keep it so
    with adapters_disabled(model):
        assert all(layer.disable_adapters for layer in layers)
    assert layers[0].disable_adapters and not any(layer.disable_adapters for layer in layers[1:])


def test_copy_reference_stays_frozen_while_the_policy_trains():
    model = tiny_unet().double().train()
    inputs, _ = _step_inputs(model, random_pairs(model, 4, dtype=torch.float64), torch.float64)
    original = copy.deepcopy(model)
    mode = CopyReference.from_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = mode(model, inputs)
    out.model_pred.square().mean().backward()
    opt.step()
    after = mode(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(after.ref_pred, original(**inputs, return_dict=False)[0], rtol=0, atol=0)
    assert (after.model_pred - after.ref_pred).abs().max() > 1e-6
    assert not any(p.requires_grad for p in mode.reference.parameters())


def test_bad_configurations_are_refused_with_a_clear_message():
    full = tiny_unet()
    with pytest.raises(ValueError, match="reference mode must be one of"):
        make_reference_mode("twice", full)
    for mode in ("batched", "adapter_off"):
        with pytest.raises(ValueError, match="needs a LoRA model"):
            make_reference_mode(mode, full)
    with pytest.raises(TypeError, match="needs cache="):
        make_reference_mode("cache", full)
    with pytest.raises(TypeError, match="needs a LoRA"):
        batched_policy_and_reference(full, {"sample": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(TypeError, match="adapters"):
        with adapters_disabled(full):
            pass

    model = _lora_model("unet", torch.float32)
    inputs, _ = _step_inputs(model, random_pairs(model, 4), torch.float32)
    with pytest.raises(TypeError, match="pair_indices"):
        make_reference_mode("cache", model, cache=object())(model, inputs)
    model.enable_gradient_checkpointing()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        BatchedReference()(model, inputs)


def test_trainer_batched_mode_matches_adapter_off(tmp_path):
    """fastpref-train --reference_mode batched: the same predictions, step by step, as adapter_off
    (same seed, so the same batches and noise); at step 2 the adapter is non-zero, so the policy and
    reference rows differ and the mask is exercised."""
    from fastpref.train import TrainConfig, train
    from fastpref.train.models import build_tiny_model

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    seen = {}
    try:
        for mode in ("adapter_off", "batched"):
            cfg = TrainConfig(
                output_dir=str(tmp_path / mode), max_train_steps=2, train_batch_size=2, synthetic_size=16, eval_pairs=4,
                num_inference_steps=2, checkpointing_steps=1000, report_to="csv", learning_rate=1e-2, loss="dpo",
                lora_rank=4, reference_mode=mode,
            )
            train(cfg, model=build_tiny_model("fastpref:tiny-unet", sample_size=8),
                  on_step=lambda step, out, mode=mode: seen.setdefault((mode, step), out))
    finally:
        torch.set_num_threads(n)
    for step in (1, 2):
        a, b = seen[("adapter_off", step)], seen[("batched", step)]
        torch.testing.assert_close(b.model_pred, a.model_pred)
        torch.testing.assert_close(b.ref["ref_pred"], a.ref["ref_pred"])
        assert not b.ref["ref_pred"].requires_grad
    assert (seen[("batched", 2)].model_pred - seen[("batched", 2)].ref["ref_pred"]).abs().max() > 1e-4
