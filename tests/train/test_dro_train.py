"""``--loss dro``: the online half is the lagged policy's own sampling trajectory (its states x_t, its
predictions there as targets), the expert half is the preferred image noised with fresh independent
noise, only t is shared; the lagged copy refreshes every ``--dro_refresh_steps`` optimizer steps; runs
are deterministic and a resumed run repeats the uninterrupted one (lagged copy and buffer are saved in
the checkpoint)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from fastpref.train import TrainConfig, train
from fastpref.train.config import parse_args
from fastpref.train.dro import DRO_STREAM, DROSampler, trajectory_timesteps
from fastpref.train.noise import derive_seed
from tests.train._runs import run_config
from tests.train.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 3  # sampling steps of each trajectory in these tests


def _direct_trajectory(model, denoiser, cond, x_T, timesteps):
    """One trajectory sampled the plain diffusers way (batch of one, the scheduler's own loop):
    DPM-Solver++ on the given timesteps for the DDPM family; Euler on σ = (t + 1)/N for flow."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if model.prediction_type != "flow_matching":  # the DDPM families (SD1.5, SDXL)
        sched = DPMSolverMultistepScheduler.from_config(model.scheduler.config, algorithm_type="dpmsolver++")
        sched.set_timesteps(timesteps=timesteps.tolist())
    else:
        sched = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config)
        sched.set_timesteps(sigmas=((timesteps.double() + 1) / 1000).tolist())
    x, states, preds = x_T[None], [], []
    with torch.no_grad():
        for t in sched.timesteps:
            pred = model.predict(denoiser, x, t.reshape(1), cond).float()
            states.append(x[0])
            preds.append(pred[0])
            x = sched.step(pred, t, x).prev_sample
    return torch.stack(states), torch.stack(preds), sched.timesteps, sched.sigmas[:-1]


def _corr(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


@pytest.mark.parametrize("name", ["fastpref:tiny-unet", "fastpref:tiny-unet-v", "fastpref:tiny-sdxl", "fastpref:tiny-sd3",
                                  "fastpref:tiny-flux"])
def test_online_half_is_the_lagged_trajectory_and_the_expert_gets_fresh_noise(name):
    torch.manual_seed(11)
    model = tiny_model(name)
    policy = model.denoiser
    seed, epoch, pairs = 5, 1, [3, 7, 9]
    sampler = DROSampler(model, policy, seed=seed, buffer_size=4, num_inference_steps=STEPS, refresh_steps=2)
    with torch.no_grad():  # the policy moves on after the copy: the trajectories must be the lagged copy's
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = len(pairs)
    latents = torch.randn(2 * b, 3, 8, 8)  # [w; l]: the winners are the experts
    prompts = ["a red disc", "a blue square", "a green ring"]
    cond = {k: torch.cat([v, v]) for k, v in model.encode_prompts(prompts, "cpu").items()}
    if model.family == "sdxl":  # the pairs' size and crop conditioning
        from fastpref.train.sdxl import time_ids

        cond["time_ids"] = time_ids([(8, 8)] * 2 * b, [(0, 0)] * 2 * b, (8, 8))
    noised, cond_out = sampler.batch(latents, cond, {"index": torch.tensor(pairs), "epoch": epoch})

    assert len(sampler.buffer) == b
    direct = []
    for e, i in enumerate(pairs):  # each pair's trajectory, sampled directly by the lagged copy
        g = torch.Generator().manual_seed(derive_seed(seed, i, epoch, DRO_STREAM))
        ts = trajectory_timesteps(1000, STEPS, g)
        x_T = torch.randn(3, 8, 8, generator=g)
        c = {k: v[e: e + 1] for k, v in cond.items()}
        direct.append((x_T, *_direct_trajectory(model, sampler.lagged, c, x_T, ts)))
        states, preds, t_used, sigmas = direct[-1][1:]
        torch.testing.assert_close(sampler.buffer["states"][e], states, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sampler.buffer["preds"][e], preds, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sampler.buffer["timesteps"][e].double(), t_used.double())
        assert torch.equal(sampler.buffer["states"][e, 0], x_T)  # state 0 is x_T: state k is prediction k's input
        assert torch.equal(sampler.buffer["expert"][e], latents[e])  # the preferred image, not the loser
        if model.prediction_type != "flow_matching":  # the DDPM families (SD1.5, SDXL)
            assert torch.equal(t_used.long(), ts)  # the trajectory's t are training timesteps
        else:
            torch.testing.assert_close(sampler.buffer["sigmas"][e], sigmas.float())
        with torch.no_grad():  # the policy's own prediction differs: the targets are the lagged copy's
            assert not torch.allclose(model.predict(policy, states, t_used, {k: v.expand(STEPS, *v.shape[1:])
                                                                            for k, v in c.items()}), preds, atol=1e-3)

    assert noised.noisy.shape == noised.target.shape == (2 * b, 3, 8, 8)
    expert_t, online_t = noised.timesteps.chunk(2)
    assert torch.equal(expert_t, online_t)  # only t is shared
    for j in range(b):
        # online row j: a stored state, its lagged prediction as the target, its t
        stored = sampler.buffer["states"]
        hits = [(e, k) for e in range(b) for k in range(STEPS) if torch.equal(noised.noisy[b + j], stored[e, k])]
        assert len(hits) == 1, "the online half must be states of the lagged trajectories"
        e, k = hits[0]
        x_T, states, preds, t_used, sigmas = direct[e]
        torch.testing.assert_close(noised.target[b + j], preds[k], rtol=1e-4, atol=1e-5)
        assert float(online_t[j]) == pytest.approx(float(t_used[k]))
        for name_, v in cond_out.items():  # both halves under the entry's prompt
            assert torch.equal(v[j], cond[name_][e]) and torch.equal(v[b + j], cond[name_][e])
        # expert row j: the entry's preferred image noised at the same t with its own noise ε
        x0, noisy, target = latents[e], noised.noisy[j], noised.target[j]
        if model.prediction_type != "flow_matching":  # the DDPM families (SD1.5, SDXL)
            t = expert_t[j: j + 1].long()
            a = model.scheduler.alphas_cumprod[t].float()
            eps = (noisy - a.sqrt() * x0) / (1 - a).sqrt()
            expected = eps if model.prediction_type == "epsilon" else model.scheduler.get_velocity(x0[None], eps[None], t)[0]
            torch.testing.assert_close(target, expected, rtol=1e-4, atol=1e-4)
        else:
            eps = target + x0  # target ε − x0
            s = sigmas[k].float()
            torch.testing.assert_close(noisy, (1 - s) * x0 + s * eps, rtol=1e-5, atol=1e-5)
        # fresh noise: unrelated to the trajectory's starting noise and to the lagged prediction
        assert abs(_corr(eps, x_T)) < 0.4 and abs(_corr(eps, preds[k])) < 0.4
        assert abs(_corr(eps, noised.noisy[b + j])) < 0.4


def test_the_lagged_copy_refreshes_exactly_every_n_steps():
    model = tiny_model(lora=2, lora_b=0.1)
    policy = model.denoiser
    trained = [n for n, p in policy.named_parameters() if p.requires_grad]
    sampler = DROSampler(model, policy, seed=0, buffer_size=2, num_inference_steps=STEPS, refresh_steps=3)

    def weights(module):
        named = dict(module.named_parameters())
        return [named[n].detach().clone() for n in trained]

    snapshots = {0: weights(policy)}
    for step in range(1, 8):
        with torch.no_grad():  # an "optimizer step"
            for n, p in policy.named_parameters():
                if p.requires_grad:
                    p.add_(0.01 * step)
        snapshots[step] = weights(policy)
        sampler.after_optimizer_step(step, policy)
        expected = snapshots[step // 3 * 3]  # the policy at the last multiple of 3
        got = weights(sampler.lagged)
        assert all(torch.equal(x, y) for x, y in zip(got, expected)), f"step {step}"
        assert sampler.refreshed_at == step // 3 * 3
    base = dict(sampler.lagged.named_parameters())  # the frozen base weights are those of the policy
    assert all(torch.equal(base[n], p) for n, p in policy.named_parameters() if not p.requires_grad)


def test_the_loop_refreshes_after_every_nth_optimizer_step(tmp_path, monkeypatch):
    seen = []
    original = DROSampler.refresh
    monkeypatch.setattr(DROSampler, "refresh",
                        lambda self, policy, step: (seen.append(step), original(self, policy, step)))
    cfg = run_config(tmp_path, loss="dro", lora_rank=0, max_train_steps=4, gradient_accumulation_steps=2,
                     dro_refresh_steps=2, dro_num_inference_steps=STEPS, synthetic_size=12)
    train(cfg, model=tiny_model())
    assert seen == [2, 4]


def _dro_config(output_dir, **kw) -> TrainConfig:
    return run_config(output_dir, loss="dro", lora_rank=0, dro_num_inference_steps=STEPS, dro_refresh_steps=2,
                      dro_buffer_size=3, synthetic_size=12, checkpointing_steps=1, **kw)


LOGGED = ("loss", "u", "model_err_win", "model_err_lose", "ref_err_win", "ref_err_lose", "grad_norm")


def test_runs_are_finite_deterministic_and_resume_exactly(tmp_path):
    """Two runs give the same numbers; a run resumed from step 3 (the lagged copy is the policy of step 2,
    the buffer holds trajectories of steps 2 and 3) repeats step 4 of the uninterrupted run: the
    checkpoint holds the lagged copy and the buffer (neither can be rebuilt from the policy)."""
    first, m1 = _dro_config(tmp_path / "a", max_train_steps=4), tiny_model()
    a = train(first, model=m1)
    b = train(_dro_config(tmp_path / "b", max_train_steps=4), model=tiny_model())
    assert [r["step"] for r in a.history] == [1, 2, 3, 4]
    for key in LOGGED:
        assert all(torch.isfinite(torch.tensor(r[key])) for r in a.history), key
        assert [r[key] for r in a.history] == [r[key] for r in b.history], key
    assert a.history[0]["loss"] == pytest.approx(0.001)  # policy = reference at the start: d = 0, ℓ = m
    assert any(r["loss"] != a.history[0]["loss"] for r in a.history[1:])

    ckpt = os.path.join(first.output_dir, "checkpoint-3")
    assert {"dro_lagged.safetensors", "dro_buffer_0.safetensors"} <= set(os.listdir(ckpt))
    run = tmp_path / "resumed"
    run.mkdir()
    shutil.copytree(ckpt, run / "run" / "checkpoint-3")
    m2 = tiny_model()
    c = train(_dro_config(run, max_train_steps=4, resume_from_checkpoint="latest"), model=m2)
    assert [r["step"] for r in c.history] == [4]
    for key in LOGGED:
        assert [r[key] for r in c.history] == [r[key] for r in a.history[3:]], key
    for (n, p), q in zip(m1.denoiser.state_dict().items(), m2.denoiser.state_dict().values()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("argv,match", [
    (["--reference_mode", "none"], "cannot use --reference_mode none"),
    (["--dro_refresh_steps", "0"], "--dro_refresh_steps must be an integer ≥ 1"),
    (["--dro_buffer_size", "0"], "--dro_buffer_size must be an integer ≥ 1"),
    (["--dro_num_inference_steps", "0"], "--dro_num_inference_steps must be an integer ≥ 1"),
    (["--dro_margin", "-1"], "--dro_margin must be a finite number ≥ 0"),
])
def test_bad_dro_flags_are_refused(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(["--loss", "dro", "--output_dir", "unused"] + argv)


def test_dro_flags_from_toml_and_their_defaults(tmp_path):
    cfg = parse_args(["--loss", "dro", "--output_dir", "unused"])
    flags = (cfg.dro_margin, cfg.dro_refresh_steps, cfg.dro_buffer_size, cfg.dro_num_inference_steps)
    assert flags == (0.001, 1, 4, 20)
    toml = tmp_path / "run.toml"
    toml.write_text('loss = "dro"\ndro_refresh_steps = 5\ndro_buffer_size = 8\ndro_margin = 0\n')
    cfg = parse_args(["--config", str(toml), "--dro_num_inference_steps", "10", "--output_dir", "unused"])
    assert (cfg.dro_margin, cfg.dro_refresh_steps, cfg.dro_buffer_size, cfg.dro_num_inference_steps) == (0.0, 5, 8, 10)
    assert isinstance(cfg.dro_margin, float)


def test_more_sampling_steps_than_training_timesteps_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="--dro_num_inference_steps must be at most the scheduler's 1000"):
        DROSampler(model, model.denoiser, seed=0, buffer_size=2, num_inference_steps=1001, refresh_steps=1)


def test_the_reference_modes_agree_on_both_halves(cpu_accelerator):
    """copy, adapter_off and batched give the same DRO loss and errors on the same draws (the reference
    runs on the online half too); the online reference error is the base model's, not zero."""
    from fastpref.train.data import build_dataset, collate_pairs
    from fastpref.train.loop import compute_loss
    from fastpref.train.objectives import get_objective
    from fastpref.train.reference import make_reference

    data = build_dataset("synthetic", resolution=8, synthetic_size=6, seed=0)
    batch = collate_pairs([data[i] for i in (1, 4)])
    cfg = TrainConfig(loss="dro", seed=2)
    out = {}
    for mode in ("copy", "adapter_off", "batched"):
        model = tiny_model(lora=2, lora_b=0.2)
        sampler = DROSampler(model, model.denoiser, seed=2, buffer_size=4, num_inference_steps=STEPS, refresh_steps=1)
        with torch.no_grad():  # the policy one update ahead of its lagged copy
            for n, p in model.denoiser.named_parameters():
                if "lora_B" in n:
                    p.add_(0.05)
        step = compute_loss(model, model.denoiser, make_reference(mode, model), get_objective("dro"), batch, cfg,
                            cpu_accelerator, dro=sampler)
        st = step.stats
        out[mode] = (step.loss.detach(), st.model_err_win, st.model_err_lose, st.ref_err_win, st.ref_err_lose)
    for mode in ("adapter_off", "batched"):
        for got, want in zip(out[mode], out["copy"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    _, _, model_online, _, ref_online = out["copy"]
    assert (ref_online > 0).all() and not torch.allclose(ref_online, model_online)
