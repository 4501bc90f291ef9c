"""Diffusion-DRO's online half: a lagged copy of the policy, its sampling trajectories, and the step's batch.

Diffusion-DRO ("Ranking-based Preference Optimization for Diffusion Models from Implicit User Feedback",
Yi-Lun Wu et al., 2025, arXiv:2510.18353) ranks an offline *expert* sample above the policy's own *online*
sample. The recipe here is the authors' code (github.com/basiclab/DiffusionDRO, ``train.py``, the
training step around lines 753-768, and ``misc/buffer.py``, ``ReplayBuffer.callback_fn``):

* a **lagged copy** of the policy (their ``unet_policy``) is refreshed from the policy every
  ``--dro_refresh_steps`` optimizer steps (and once at the start);
* for every micro-batch, the lagged copy **samples** an image for each pair's prompt, no guidance,
  from x_T ~ N(0, I); every state x_t of that trajectory is stored with the timestep t it was
  evaluated at and the lagged copy's own prediction there (``callback_fn`` pushes ``t``, ``latents``
  and ``noise_pred``; x_T is pushed first, so state k is the input of prediction k). The trajectory,
  the prompt's conditioning and the pair's preferred image (the expert, encoded like every image)
  go into a **buffer** of the last ``--dro_buffer_size`` trajectories (``ReplayBuffer.commit`` /
  ``trim``);
* the step **draws** B entries of the buffer (distinct entries when the buffer holds at least B, else
  with replacement; ``ReplayBuffer.sample``) and one trajectory step k per entry. The online half is
  that state x_t with the lagged prediction as its target; the expert half is the entry's expert
  latent noised at the **same t** with **fresh, independent noise** (``noise_scheduler.add_noise``
  with ``torch.randn_like``). Only t is shared between the halves.

Both halves then go through the policy and the run's reference mode (``copy``, ``adapter_off`` or
``batched``; DRO's online half is not in the dataset, so ``cache`` and ``none`` cannot serve it), and
``fastpref.dro_loss`` ranks them: d_i = (e_θ − e_ref)[expert_i] − (e_θ − e_ref)[online_i],
ℓ = mean relu(d_i + m).

Sampler and timesteps, as the authors' buffer (``--buffer_scheduler DPMSolver++``,
``--buffer_num_inference_steps 20``, ``--buffer_perturb_timesteps``): T steps on the grid
t_k = (T − 1 − k)·⌊N/T⌋ + r (N = 1000 training timesteps), the offset r ∈ [0, ⌊N/T⌋) drawn per
trajectory, so the stored t cover every training timestep. The DDPM family samples with
DPM-Solver++ (diffusers' ``DPMSolverMultistepScheduler`` with these custom timesteps); those
integer t are the training timesteps the expert is noised at (``scheduler.add_noise``), and the
target is the scheduler's (ε or v). The flow family (SD3) samples with diffusers'
``FlowMatchEulerDiscreteScheduler`` at σ_k = (t_k + 1)/N (then the scheduler's shift); the expert
is noised as x = (1 − σ)·x0 + σ·ε with the trajectory's σ, target ε − x0. The authors trained only
SD1.5/SDXL; the flow variant is this package's transfer of the same recipe.

Left out of the authors' recipe: prompt dropout (``--random_drop_prompt_probability 0.2``, used for
both sampling and training there) and the EMA of the policy; fastpref's trainer has neither for any
loss.

Determinism: x_T and r of pair i at epoch e come from a generator seeded with
``(seed, i, e, DRO_STREAM)``; the draw of micro-batch n on process p (entries, steps, expert noise)
from ``(seed, n, p, DRO_STREAM + 1)``. The lagged weights, the buffer and n are saved in every
checkpoint (``dro_lagged.safetensors`` by process 0 — the lagged copy is the same on every process —
and ``dro_buffer_<p>.safetensors`` by each process), so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from fastpref.train.noise import NoisedPairs, derive_seed

__all__ = ["DRO_STREAM", "DROSampler", "Trajectories", "sample_trajectories", "trajectory_timesteps",
           "refuse_reference_mode", "register_dro_hooks"]

DRO_STREAM = 0x44524F  # "DRO": keeps these draws apart from the (seed, pair, epoch) noise of the other losses
_DRAW_STREAM = DRO_STREAM + 1


def refuse_reference_mode(mode: str) -> None:
    """``--loss dro`` needs a reference model that can run on the online half, which is generated during
    training: the precomputed reference errors (``cache``) cannot exist for it, and ``none`` has none."""
    if mode in ("cache", "none"):
        raise ValueError(f"--loss dro cannot use --reference_mode {mode}: Diffusion-DRO's online half is sampled "
                         "by the lagged policy during training, so its reference error cannot be precomputed "
                         "(and the loss needs one); use --reference_mode auto (copy for a full fine-tune, "
                         "adapter_off or batched with LoRA)")


def _is_flow(model) -> bool:
    return model.prediction_type == "flow_matching"  # SD3, Flux (SDXL is DDPM like SD1.5)


def trajectory_timesteps(num_train_timesteps: int, num_inference_steps: int,
                         generator: torch.Generator) -> torch.Tensor:
    """The authors' perturbed grid ``(T,)``, descending: ``(T − 1 − k)·⌊N/T⌋ + r``, r ∈ [0, ⌊N/T⌋)."""
    ratio = num_train_timesteps // num_inference_steps
    r = torch.randint(0, ratio, (1,), generator=generator)
    return (torch.arange(num_inference_steps) * ratio).flip(0) + r


def _scheduler(model, timesteps: torch.Tensor, device):
    """A fresh sampler for one trajectory on ``timesteps`` (DPM-Solver++ for DDPM, Euler for flow)."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if _is_flow(model):
        sched = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config)
        n = sched.config.num_train_timesteps
        sched.set_timesteps(sigmas=((timesteps.double() + 1) / n).tolist(), device=device)
    else:
        sched = DPMSolverMultistepScheduler.from_config(model.scheduler.config, algorithm_type="dpmsolver++")
        sched.set_timesteps(timesteps=timesteps.tolist(), device=device)
    return sched


@torch.no_grad()
def sample_trajectories(model, denoiser: nn.Module, cond: dict, x_T: torch.Tensor, timesteps: torch.Tensor):
    """Sample ``x_T`` (B, *S) with ``denoiser`` under ``cond``, trajectory b on ``timesteps[b]`` (B, T).

    Returns ``(states, preds, model_t, sigmas)``: ``states[:, k]`` is the input of step k (state 0 is
    x_T), ``preds[:, k]`` the denoiser's prediction there, ``model_t[:, k]`` the timestep it was given,
    ``sigmas[:, k]`` the flow σ (zeros for the DDPM family). One batched denoiser call per step; each
    trajectory has its own scheduler, since their timesteps differ (the authors patch diffusers'
    schedulers to step per sample, ``misc/patch.py``)."""
    b, steps = timesteps.shape
    device = x_T.device
    scheds = [_scheduler(model, timesteps[i], device) for i in range(b)]
    x = x_T.float() * getattr(scheds[0], "init_noise_sigma", 1.0)
    states, preds, model_t = [], [], []
    for k in range(steps):
        t = torch.stack([s.timesteps[k] for s in scheds]).to(device)
        pred = model.predict(denoiser, x, t, cond).float()
        states.append(x)
        preds.append(pred)
        model_t.append(t)
        x = torch.cat([s.step(pred[i: i + 1], s.timesteps[k], x[i: i + 1]).prev_sample for i, s in enumerate(scheds)])
    sigmas = (torch.stack([s.sigmas[:steps] for s in scheds]).float() if _is_flow(model)
              else torch.zeros(b, steps))
    return torch.stack(states, 1), torch.stack(preds, 1), torch.stack(model_t, 1), sigmas.to(device)


class Trajectories:
    """The buffer's columns, one row per trajectory: ``expert`` (N, *S), ``states`` / ``preds`` (N, T, *S),
    ``timesteps`` / ``sigmas`` (N, T), ``cond.<name>`` (N, …)."""

    def __init__(self, columns: dict[str, torch.Tensor] | None = None):
        self.columns = dict(columns or {})

    def __len__(self) -> int:
        return next(iter(self.columns.values())).shape[0] if self.columns else 0

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.columns[name]

    def items(self):
        return self.columns.items()

    def append(self, rows: dict, size: int) -> None:
        for k, v in rows.items():
            self.columns[k] = (torch.cat([self.columns[k], v]) if k in self.columns else v)[-size:]  # the newest


class DROSampler:
    """The lagged policy and the trajectory buffer of one process.

    ``batch(latents, cond, batch)`` turns the step's encoded pairs into the DRO batch: the expert half
    (rows ``[0, B)``) and the online half (rows ``[B, 2B)``), ``NoisedPairs`` with a ``(2B, *S)`` target,
    and the conditioning of both halves. ``after_optimizer_step(step, policy)`` refreshes the lagged copy
    every ``refresh_steps``."""

    def __init__(self, model, policy: nn.Module, *, seed: int, buffer_size: int, num_inference_steps: int,
                 refresh_steps: int, process_index: int = 0, autocast=None):
        for name, v in (("buffer_size", buffer_size), ("num_inference_steps", num_inference_steps),
                        ("refresh_steps", refresh_steps)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"--dro_{name} must be an integer ≥ 1, got {v!r}")
        n_train = int(model.scheduler.config.num_train_timesteps)
        if num_inference_steps > n_train:
            raise ValueError(f"--dro_num_inference_steps must be at most the scheduler's {n_train} training timesteps, "
                             f"got {num_inference_steps}")
        self.model, self.seed, self.process_index = model, seed, process_index
        self.buffer_size, self.num_inference_steps, self.refresh_steps = buffer_size, num_inference_steps, refresh_steps
        self.autocast = autocast
        self.lagged = copy.deepcopy(policy).requires_grad_(False).eval()
        # the weights a refresh copies: the trained ones (LoRA: the adapters; full fine-tune: all)
        self._trained = [n for n, p in policy.named_parameters() if p.requires_grad]
        self.buffer = Trajectories()
        self.draws = 0  # micro-batches drawn so far on this process (seeds the next draw)
        self.refreshed_at = 0  # the optimizer step of the last refresh

    # -- the lagged copy -----------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self, policy: nn.Module, step: int) -> None:
        """Copy the policy's trained weights into the lagged copy."""
        theirs = dict(policy.named_parameters())
        mine = dict(self.lagged.named_parameters())
        for n in self._trained:
            mine[n].copy_(theirs[n])
        self.refreshed_at = step

    def after_optimizer_step(self, step: int, policy: nn.Module) -> None:
        """Called after optimizer step ``step`` (1-based): refresh on every multiple of ``refresh_steps``."""
        if step % self.refresh_steps == 0:
            self.refresh(policy, step)

    # -- the buffer ---------------------------------------------------------------------------------
    def push(self, experts: torch.Tensor, cond: dict, pair_indices, epoch: int) -> None:
        """Sample one trajectory per pair with the lagged copy and add them (with the experts and the
        conditioning) to the buffer, keeping its newest ``buffer_size`` rows."""
        n_train = int(self.model.scheduler.config.num_train_timesteps)
        x_T, ts = [], []
        for i in torch.as_tensor(pair_indices).reshape(-1).tolist():
            g = torch.Generator().manual_seed(derive_seed(self.seed, i, epoch, DRO_STREAM))
            ts.append(trajectory_timesteps(n_train, self.num_inference_steps, g))
            x_T.append(torch.randn(tuple(experts.shape[1:]), generator=g))
        device = experts.device
        with self.autocast() if self.autocast is not None else torch.autocast(device.type, enabled=False):
            states, preds, model_t, sigmas = sample_trajectories(self.model, self.lagged, cond,
                                                                 torch.stack(x_T).to(device), torch.stack(ts))
        rows = {"expert": experts.float(), "states": states, "preds": preds, "timesteps": model_t, "sigmas": sigmas,
                **{f"cond.{k}": v for k, v in cond.items()}}
        self.buffer.append({k: v.detach() for k, v in rows.items()}, self.buffer_size)

    def draw(self, b: int):
        """``(entries (b,), steps (b,), expert noise (b, *S))`` of the next micro-batch (the authors'
        ``ReplayBuffer.sample``: distinct entries when the buffer holds ≥ b, else with replacement)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.draws, self.process_index, _DRAW_STREAM))
        self.draws += 1
        n, steps = len(self.buffer), self.buffer["states"].shape[1]
        entries = torch.randperm(n, generator=g)[:b] if b <= n else torch.randint(0, n, (b,), generator=g)
        k = torch.randint(0, steps, (b,), generator=g)
        noise = torch.randn((b, *self.buffer["expert"].shape[1:]), generator=g)
        return entries, k, noise

    def batch(self, latents: torch.Tensor, cond: dict, batch: dict) -> tuple[NoisedPairs, dict]:
        """The DRO batch of a micro-batch whose encoded pairs are ``latents`` (2B, *S) ``[w; l]`` and
        ``cond`` (2B rows): push the pairs' trajectories (experts = the preferred images), then draw."""
        b = latents.shape[0] // 2
        self.push(latents[:b], {k: v[:b] for k, v in cond.items()}, batch["index"], batch.get("epoch", 0))
        entries, k, noise = self.draw(b)
        buf = self.buffer
        device = latents.device
        entries, k = entries.to(device), k.to(device)
        x0 = buf["expert"][entries]
        noise = noise.to(device, x0.dtype)
        online = buf["states"][entries, k]
        online_target = buf["preds"][entries, k]
        t = buf["timesteps"][entries, k]
        if _is_flow(self.model):
            sigma = buf["sigmas"][entries, k].reshape(-1, *([1] * (x0.dim() - 1)))
            expert, expert_target = (1.0 - sigma) * x0 + sigma * noise, noise - x0
        else:
            sched = self.model.scheduler
            t_int = t.long()
            expert = sched.add_noise(x0, noise, t_int)
            expert_target = (noise if sched.config.prediction_type == "epsilon"
                             else sched.get_velocity(x0, noise, t_int))
            t = t_int
        cond_rows = {name[len("cond."):]: v[entries] for name, v in buf.items() if name.startswith("cond.")}
        noised = NoisedPairs(torch.cat([expert, online]), torch.cat([t, t]), torch.cat([expert_target, online_target]))
        return noised, {name: torch.cat([v, v]) for name, v in cond_rows.items()}

    # -- checkpoints --------------------------------------------------------------------------------
    def save(self, folder: str, is_main_process: bool) -> None:
        from safetensors.torch import save_file

        if is_main_process:
            lagged = dict(self.lagged.named_parameters())
            save_file({n: lagged[n].detach().contiguous() for n in self._trained},
                      os.path.join(folder, "dro_lagged.safetensors"), metadata={"refreshed_at": str(self.refreshed_at)})
        save_file({k: v.contiguous() for k, v in self.buffer.items()},
                  os.path.join(folder, f"dro_buffer_{self.process_index}.safetensors"),
                  metadata={"draws": str(self.draws)})

    @torch.no_grad()
    def load(self, folder: str) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        device = next(self.lagged.parameters()).device
        lagged = dict(self.lagged.named_parameters())
        path = os.path.join(folder, "dro_lagged.safetensors")
        with safe_open(path, framework="pt") as fh:
            self.refreshed_at = int(fh.metadata()["refreshed_at"])
        for n, v in load_file(path).items():
            lagged[n].copy_(v)
        path = os.path.join(folder, f"dro_buffer_{self.process_index}.safetensors")
        with safe_open(path, framework="pt") as fh:
            self.draws = int(fh.metadata()["draws"])
        self.buffer = Trajectories({k: v.to(device) for k, v in load_file(path).items()})


def register_dro_hooks(accelerator, sampler: DROSampler) -> None:
    """Save and restore the sampler with every ``accelerator.save_state`` / ``load_state`` (so with every
    checkpoint the trainer writes, inside its crash-safe temporary folder)."""

    def save_hook(models, weights, out_dir):
        sampler.save(out_dir, accelerator.is_main_process)

    def load_hook(models, in_dir):
        sampler.load(in_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
