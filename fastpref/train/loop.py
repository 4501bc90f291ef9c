"""The training loop: one function, readable top to bottom (the diffusers DPO example's shape).

    for each micro-batch (B pairs, winner and loser images):
        latents, cond   = encode(batch)                  → (2B, *S)  [w_0 … w_{B−1}, l_0 … l_{B−1}]
                          (VAE + text encoders, or the --cache_latents cache)
        noised          = noise_pairs(latents, pairs, epoch)   one ε and one t per pair
        model_pred, ref = reference(policy, noised, cond, batch)   the policy (+ the reference mode)
        loss, stats     = fastpref.<loss>(model_pred, target, **ref, return_stats=True)
        accelerator.backward(loss); clip; optimizer step every gradient_accumulation_steps

Randomness that decides a step's numbers (VAE posterior samples, noise, timesteps) is drawn per
(seed, pair[, image], epoch) (:mod:`fastpref.train.noise`) and the data order from (seed, epoch): with
the optimizer, scheduler and RNG states accelerate saves, a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import dataclass, field, fields, is_dataclass

import torch

from fastpref.reference import pair_errors
from fastpref.stats import implicit_accuracy
from fastpref.train.cache import collate_cached, encode, latent_cache_for_run, ref_cache_for_run, vae_dtype
from fastpref.train.cache import weight_dtype as frozen_dtype
from fastpref.train.checkpoint import load_checkpoint, register_model_hooks, save_checkpoint
from fastpref.train.config import TrainConfig
from fastpref.train.data import EpochSampler, build_dataset, collate_pairs
from fastpref.train.launch import build_accelerator, start_line
from fastpref.train.memory import adamw_class, apply_allow_tf32, build_optimizer, enable_gradient_checkpointing
from fastpref.train.metrics import MetricsLogger, plot_curves
from fastpref.train.models import DiffusionModel, load_model, load_vae, save_model
from fastpref.train.noise import noise_pairs
from fastpref.train.pipelines import UNET_FAMILIES, save_lora_weights
from fastpref.train.objectives import get_objective
from fastpref.train.reference import make_reference, resolve_reference_mode
from fastpref.train.preflight import preflight

__all__ = ["train", "compute_loss", "StepOutput", "TrainResult"]

EVAL_SEEDS = 8  # rows of the evaluation grid: each prompt is sampled from this many fixed seeds


@dataclass
class StepOutput:
    loss: torch.Tensor
    stats: object  # the loss's stats (PreferenceStats for the paired losses)
    model_pred: torch.Tensor
    ref: dict
    target: torch.Tensor
    timesteps: torch.Tensor
    num_pairs: int


@dataclass
class TrainResult:
    global_step: int
    output_dir: str
    history: list = field(default_factory=list)  # the train rows this process logged
    eval_history: list = field(default_factory=list)
    data_skipped: dict = field(default_factory=dict)


def compute_loss(model: DiffusionModel, policy, reference, objective, batch: dict, cfg: TrainConfig,
                 accelerator, *, clip=None, tau: float | None = None, group=None, dro=None) -> StepOutput:
    """The loss of one micro-batch: encode (or read the latent cache) → noise the pairs (per pair and
    ``batch["epoch"]``, 0 when absent) → the policy, once on the stacked ``[w; l]`` batch, and the
    reference mode → the objective. ``group``: the process group of a training step, passed to every
    objective (KTO's reference point and RPO's weight matrix span it; ``None``: this batch only).
    ``--loss rpo/orrpo``: ``clip`` (a :class:`~fastpref.train.clip_embed.ClipEmbedder`) gives the pairs'
    embeddings, ``tau`` the weights' temperature. An unpaired batch (``batch["labels"]``, one image per
    row, :mod:`fastpref.train.unpaired`) goes through the same steps with one image per row.
    ``--loss dro``: ``dro`` (a :class:`~fastpref.train.dro.DROSampler`) replaces the noised pairs by the
    expert half and the lagged policy's online half (``None``, as in the held-out evaluation: the pairs)."""
    extra = {}
    if "labels" in batch:
        if not objective.unpaired:
            raise ValueError(f"--loss {objective.name} needs preference pairs; this dataset holds unpaired labelled "
                             "images, which only --loss kto trains on")
        extra["labels"] = batch["labels"]
    if objective.needs_clip:
        if clip is None or tau is None:
            raise ValueError(f"--loss {objective.name} needs the pairs' CLIP embeddings: pass clip= and tau=")
        win_emb, lose_emb = clip(batch, accelerator.device)  # no gradient
        extra.update(win_emb=win_emb, lose_emb=lose_emb, tau=tau)
    latents, cond = encode(model, batch, cfg.seed, accelerator.device)
    if dro is not None:
        noised, cond = dro.batch(latents, cond, batch)
    else:
        noised = noise_pairs(model, latents, batch["index"], batch.get("epoch", 0), cfg.seed)
    with accelerator.autocast():
        model_pred, ref = reference(policy, noised, cond, batch)
    loss, stats = objective.call(model_pred, ref, noised.target, cfg, group=group, **extra)
    return StepOutput(loss, stats, model_pred.detach(), ref, noised.target, noised.timesteps, len(batch["index"]))


def _reduce_stat_means(pending: list, accelerator, device) -> dict[str, float]:
    """The logged statistics of an update: the mean over every process's readable micro-batches of their
    batch means (``pending``: ``(stats, readable)`` per micro-batch; a stand-in micro-batch is not
    counted, but every process reduces every statistic, so none waits for another). NaN when no process
    had a readable micro-batch."""
    if not pending:
        return {}
    weight = torch.tensor([1.0 if readable else 0.0 for _, readable in pending], device=device)
    count = accelerator.reduce(weight.sum(), "sum")
    out = {}
    for k in pending[0][0]:
        v = torch.stack([stats[k].to(device) for stats, _ in pending])
        total = accelerator.reduce(torch.where(weight > 0, v, torch.zeros_like(v)).sum(), "sum")
        out[k] = (total / count).item() if count > 0 else float("nan")
    return out


def _stat_means(out: StepOutput) -> dict[str, torch.Tensor]:
    """Batch means of the loss's stats, as detached device tensors (synchronised only when logged)."""
    values = {"loss": out.loss.detach().float()}
    if is_dataclass(out.stats):
        for f in fields(out.stats):
            v = getattr(out.stats, f.name)
            if isinstance(v, torch.Tensor):
                values["u" if f.name == "margin" else f.name] = v.detach().float().mean()
    return values


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB → MiB (process peak RSS)


def _default_prompts(dataset, indices: list[int], n: int = 4) -> list[str]:
    """The first ``n`` distinct captions of readable pairs (held-out ones first)."""
    out: list[str] = []
    for i in indices:
        item = dataset[i]
        if isinstance(item, dict) and item["caption"] not in out:
            out.append(item["caption"])
        if len(out) == n:
            break
    return out


def _sft_marker(model: DiffusionModel, dataset, indices: list[int], cfg: TrainConfig) -> dict:
    """What a saved warm-up must match to be reused: the settings that decide it and the architecture
    (an embedded model whose definition changed must not reuse an old warm-up). diffusers' private
    config keys are left out: ``_use_default_values`` is a set, listed in a per-process order."""
    config = {k: v for k, v in dict(model.denoiser.config).items() if not k.startswith("_")}
    return {"model": cfg.pretrained_model_name_or_path, "sft_steps": cfg.sft_steps, "seed": cfg.seed,
            "dataset": cfg.dataset, "learning_rate": cfg.sft_learning_rate or cfg.learning_rate,
            "train_batch_size": cfg.train_batch_size, "pairs": len(indices), "resolution": dataset.resolution,
            "denoiser_config": json.loads(json.dumps(config, default=str))}


def supervised_warmup(model: DiffusionModel, dataset, indices: list[int], cfg: TrainConfig, accelerator) -> DiffusionModel:
    """``cfg.sft_steps`` steps of the plain diffusion loss (MSE to the target) on both images of every
    pair — no preference — so that preference training starts from a model that can generate the
    data (a randomly initialised model cannot: DPO from scratch only pushes errors apart). The result
    is saved in ``output_dir/sft_model`` and reused when the same run is resumed.

    Every process runs the same seeded warm-up (no gradient sync needed: they agree bit for bit)."""
    from tqdm.auto import tqdm

    folder = os.path.join(cfg.output_dir, "sft_model")
    lr = cfg.sft_learning_rate or cfg.learning_rate
    marker = _sft_marker(model, dataset, indices, cfg)
    marker_path = os.path.join(folder, "fastpref_sft.json")
    if os.path.isfile(marker_path):
        with open(marker_path) as fh:
            if json.load(fh) == marker:
                accelerator.print(f"supervised warm-up: reusing {folder}")
                reused = load_model(folder, **model.options())
                reused.vae_encode_batch_size = model.vae_encode_batch_size
                return reused
    accelerator.print(f"supervised warm-up: {cfg.sft_steps} steps of the plain diffusion loss on both images of "
                      f"each pair, saved to {folder} (a later run with the same settings reuses it)")
    device = accelerator.device
    for m in model.frozen_modules():
        m.requires_grad_(False).eval().to(device)
    denoiser = model.denoiser.to(device).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=lr, weight_decay=cfg.adam_weight_decay)
    sampler = EpochSampler(indices, cfg.seed + 1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train_batch_size, sampler=sampler, drop_last=True,
                                         collate_fn=collate_pairs, num_workers=cfg.dataloader_num_workers)
    step, epoch = 0, 0
    progress = tqdm(total=cfg.sft_steps, desc="sft", disable=not accelerator.is_main_process)
    while step < cfg.sft_steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            if batch["pixel_values"] is None:
                continue
            latents, cond = encode(model, batch, cfg.seed, device)
            noised = noise_pairs(model, latents, batch["index"], epoch, cfg.seed + 1)  # its own stream of draws
            with accelerator.autocast():
                pred = model.predict(denoiser, noised.noisy, noised.timesteps, cond)
            target = noised.target if noised.target.shape[0] == pred.shape[0] else torch.cat([noised.target] * 2)
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(denoiser.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            progress.set_postfix(mse=f"{loss.item():.4f}")
            if step >= cfg.sft_steps:
                break
        epoch += 1
    progress.close()
    denoiser.requires_grad_(False)
    if accelerator.is_main_process:
        save_model(model, folder)
        with open(marker_path, "w") as fh:
            json.dump(marker, fh)
    accelerator.wait_for_everyone()
    return model


def train(cfg: TrainConfig, *, model: DiffusionModel | None = None, dataset=None, on_step=None) -> TrainResult:
    """Run one training job. ``model`` / ``dataset`` override what ``cfg`` names (for programmatic use);
    ``on_step(global_step, StepOutput)`` is called after every micro-batch's forward."""
    from accelerate.utils import ProjectConfiguration
    from tqdm.auto import tqdm

    cfg.validate()
    adamw_class(cfg.use_8bit_adam)  # a missing bitsandbytes is refused now, before any model is loaded
    apply_allow_tf32(cfg.allow_tf32)
    objective = get_objective(cfg.loss)
    mode_name = resolve_reference_mode(cfg, objective)
    accelerator = build_accelerator(  # every launched process in one job, or a ValueError saying how
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir),
    )
    device, world = accelerator.device, accelerator.num_processes
    if device.type == "cpu" and accelerator.mixed_precision == "fp16":  # else: a dtype clash deep in the model
        raise ValueError("--mixed_precision fp16 needs a GPU: on a CPU accelerate does not autocast to fp16, so the "
                         "fp16 weights would meet fp32 activations; use --mixed_precision bf16 or no")

    # ---- data (refused here, before any model is loaded, when unusable) ----------------------------
    if dataset is None:
        dataset = build_dataset(cfg.dataset, resolution=cfg.resolution or 0, synthetic_size=cfg.synthetic_size,
                                seed=cfg.seed, random_flip=cfg.random_flip, random_crop=cfg.random_crop)
    if getattr(dataset, "unpaired", False) and not objective.unpaired:
        raise ValueError(f"--dataset {cfg.dataset!r} holds unpaired labelled images; --loss {cfg.loss} needs "
                         "preference pairs (only --loss kto trains on unpaired data)")
    train_idx, eval_idx = cfg.split_rows(len(dataset))  # held-out pairs: the last ones, never trained on
    n_eval = len(eval_idx)
    if len(train_idx) < cfg.train_batch_size * world:
        raise ValueError(f"--dataset has {len(train_idx)} training pairs (after holding out {n_eval} for evaluation), "
                         f"fewer than one batch (--train_batch_size {cfg.train_batch_size} × {world} processes); "
                         "use more data or a smaller --train_batch_size")
    accelerator.print(start_line(accelerator, cfg, model_name=cfg.pretrained_model_name_or_path if model is None
                                 else f"{type(model.denoiser).__name__} given to train()", reference=mode_name,
                                 train_pairs=len(train_idx), eval_pairs=len(eval_idx), skipped=dict(dataset.skipped)))

    t_start = time.perf_counter()
    preflight(cfg, dataset, cfg.validation_prompts, accelerator.print,  # unwritable output, unscorable prompts
              writes=accelerator.is_main_process)

    # ---- model -----------------------------------------------------------------------------------
    if model is None:
        model = load_model(cfg.pretrained_model_name_or_path, revision=cfg.revision,
                           variant=cfg.variant, vae=cfg.pretrained_vae_model_name_or_path, **cfg.model_options())
    elif cfg.pretrained_vae_model_name_or_path:  # a model given to train(): the flag's VAE replaces its own
        model.vae = load_vae(cfg.pretrained_vae_model_name_or_path, model, variant=cfg.variant)
    model.vae_encode_batch_size = cfg.vae_encode_batch_size
    resolution = cfg.resolution or model.resolution
    if resolution % model.vae_scale_factor:
        raise ValueError(f"--resolution {resolution} must be a multiple of the VAE's factor {model.vae_scale_factor}")
    dataset.resolution = resolution
    if cfg.sft_steps:
        model = supervised_warmup(model, dataset, train_idx, cfg, accelerator)
    weight_dtype = frozen_dtype(accelerator.mixed_precision)
    def place(module, dtype):  # .to(dtype) only when it changes something (diffusers warns otherwise)
        module.to(device)
        return module.to(dtype) if dtype != torch.float32 else module

    for m in model.frozen_modules():
        place(m.requires_grad_(False).eval(), vae_dtype(m, accelerator.mixed_precision) if m is model.vae else weight_dtype)
    model.latents_dtype = weight_dtype  # what the VAE hands on, whatever dtype it runs in

    denoiser = model.denoiser
    if cfg.is_lora:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        place(denoiser.requires_grad_(False), weight_dtype)
        with torch.random.fork_rng(devices=[]):  # adapter init must not depend on what ran before
            torch.manual_seed(cfg.seed)
            denoiser.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                            init_lora_weights="gaussian", target_modules=model.lora_target_modules))
        cast_training_params(denoiser, dtype=torch.float32)  # trainable LoRA weights stay fp32
    else:
        place(denoiser.requires_grad_(True), torch.float32)  # fp32 master weights
    denoiser.train()
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(denoiser)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    rows = sorted(train_idx + eval_idx)  # what the caches hold
    ref_cache = ref_cache_for_run(cfg, model, dataset, rows) if mode_name == "cache" else None
    reference = make_reference(mode_name, model, dtype=weight_dtype, cache=ref_cache)
    dro = None
    if objective.name == "dro":  # the lagged copy of the policy and its trajectory buffer
        from fastpref.train.dro import DROSampler

        dro = DROSampler(model, denoiser, seed=cfg.seed, buffer_size=cfg.dro_buffer_size,
                         num_inference_steps=cfg.dro_num_inference_steps, refresh_steps=cfg.dro_refresh_steps,
                         process_index=accelerator.process_index, autocast=accelerator.autocast)
    source, collate = dataset, collate_pairs
    if cfg.cache_latents:  # the step reads latents and text embeddings: no VAE, no text encoder
        source, collate = latent_cache_for_run(cfg, model, dataset, rows, device, build=accelerator.is_main_process,
                                              wait=accelerator.wait_for_everyone), collate_cached

    group = torch.distributed.group.WORLD if world > 1 else None  # what KTO's z and RPO's matrix span
    clip, tau = None, None
    if objective.needs_clip:  # --loss rpo/orrpo: CLIP embeddings of the pairs; the matrix over all processes
        from fastpref.train.clip_embed import build_clip_embedder, clip_cache_for_run, default_tau

        tau = cfg.rpo_tau if cfg.rpo_tau is not None else default_tau(model)
        if cfg.cache_latents:  # the cached batches hold no pixels: every row's embeddings once, on disk
            clip = clip_cache_for_run(cfg, source, dataset, rows, device, build=accelerator.is_main_process,
                                      wait=accelerator.wait_for_everyone)
        else:
            clip = build_clip_embedder(cfg, device)

    optimizer = build_optimizer(cfg, params)  # AdamW, or bitsandbytes' AdamW8bit with --use_8bit_adam
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process per update: hence the × world (diffusers does the same)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * world,
                                 num_training_steps=cfg.max_train_steps * world)
    sampler = EpochSampler(train_idx, cfg.seed)
    loader = torch.utils.data.DataLoader(source, batch_size=cfg.train_batch_size, sampler=sampler, drop_last=True,
                                         collate_fn=collate, num_workers=cfg.dataloader_num_workers)
    denoiser, optimizer, loader, lr_scheduler = accelerator.prepare(denoiser, optimizer, loader, lr_scheduler)
    model.denoiser = accelerator.unwrap_model(denoiser)

    register_model_hooks(accelerator, cfg.is_lora)  # checkpoints hold the adapters or the full denoiser
    if dro is not None:  # … and the lagged copy and the buffer
        from fastpref.train.dro import register_dro_hooks

        register_dro_hooks(accelerator, dro)

    updates_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    if ref_cache is not None:  # refuse now a run the reference-error cache does not cover
        ref_cache.check_covers(rows, math.ceil(cfg.max_train_steps / updates_per_epoch))
    global_step, corrupt_rows = 0, {}  # corrupt_rows: dataset index → where (each unreadable row counted once)
    # the data position is counted in optimizer steps: a resume needs the same batch geometry
    resume_must_match = {"loss": cfg.loss, "lora_rank": cfg.lora_rank, "train_batch_size": cfg.train_batch_size,
                         "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "num_processes": world}
    if cfg.resume_from_checkpoint:
        state = load_checkpoint(accelerator, cfg.resume_from_checkpoint, cfg.output_dir,
                                expected=resume_must_match)
        if state is not None:
            global_step = state["global_step"]
            corrupt_rows = {int(i): "" for i in state.get("corrupt_rows", [])}

    # ---- logging ---------------------------------------------------------------------------------
    log_dir = os.path.join(cfg.output_dir, "logs")
    logger = MetricsLogger(log_dir, cfg.report_to, resume_step=global_step) if accelerator.is_main_process else None
    result = TrainResult(global_step, cfg.output_dir, data_skipped=dict(dataset.skipped))
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "run_config.json"), "w") as fh:
            json.dump({**cfg.to_dict(), "reference_mode_resolved": mode_name, "device": str(device),
                       "num_processes": world, "train_pairs": len(train_idx), "eval_pairs": len(eval_idx),
                       "data_skipped": dict(dataset.skipped)}, fh, indent=2)

    prompts = cfg.validation_prompts or (dataset.prompts() if hasattr(dataset, "prompts") else
                                         _default_prompts(dataset, eval_idx + train_idx))

    def say(msg: str) -> None:  # a console line that does not break the progress bar
        if accelerator.is_main_process:
            tqdm.write(msg)

    def merge_corrupt() -> None:
        """Every process's unreadable rows into each one's count (a collective: called where all processes
        are, before a log line, a checkpoint and the end), so the count is the job's, each row once."""
        if world > 1:
            from accelerate.utils import gather_object

            for i in gather_object([sorted(corrupt_rows)]):
                for row in i:
                    corrupt_rows.setdefault(int(row), "")

    stand_in_batch: dict | None = None

    def stand_in(epoch: int) -> dict:
        """A readable micro-batch for a process whose every image of this one was unreadable: the first
        readable training row, run at zero weight. With several processes, each one must run the step's
        forward and backward — DDP's gradient buckets, KTO's all-reduce of z and RPO's gathers are
        collectives that the other processes would otherwise wait on forever."""
        nonlocal stand_in_batch
        if stand_in_batch is None:
            for i in train_idx:
                candidate = collate([source[i]])
                if len(candidate["index"]):
                    stand_in_batch = candidate
                    break
            else:
                raise ValueError("no training pair is readable: every image of the training rows failed to load")
        return {**stand_in_batch, "epoch": epoch}

    def note_corrupt(found: dict) -> None:
        """Count each unreadable row once (epochs re-read it) and say where the first few are."""
        for i, where in found.items():
            if i not in corrupt_rows:
                corrupt_rows[i] = where
                if len(corrupt_rows) <= 5:
                    say(f"data: skipped an unreadable pair: {where}")

    def evaluate(step: int) -> None:
        """Held-out implicit accuracy at fixed noise; a sample grid from fixed prompts and seeds (one
        column per prompt, one row per seed); the dataset's reward of those samples, when it has one.

        Every process runs the same forwards, through the prepared (wrapped) denoiser: under FSDP each
        forward gathers the sharded weights, which every rank must join (process 0 alone would wait
        forever); under DDP the wrapper's forward may broadcast buffers. Process 0 alone writes."""
        policy = denoiser
        correct = []
        with torch.no_grad():
            for start in range(0, len(eval_idx), cfg.train_batch_size):
                batch = collate([source[i] for i in eval_idx[start: start + cfg.train_batch_size]])
                note_corrupt(batch["corrupt"])
                if not len(batch["index"]):
                    continue
                out = compute_loss(model, policy, reference, objective, batch, cfg, accelerator, clip=clip,
                                   tau=tau)  # epoch 0: fixed draws; this process's batch only
                model_err = pair_errors(out.model_pred, out.target)
                if "ref_pred" in out.ref:
                    ref_err = pair_errors(out.ref["ref_pred"], out.target)
                else:
                    ref_err = out.ref.get("ref_err", torch.zeros_like(model_err))
                if "labels" in batch:  # unpaired: does the policy move each image's error the label's way?
                    sign = 2.0 * batch["labels"].to(model_err) - 1.0
                    correct.append(sign * (ref_err.float() - model_err))
                    continue
                mw, ml = model_err.chunk(2)
                rw, rl = ref_err.float().chunk(2)
                correct.append(-((mw - ml) - (rw - rl)))  # the sign of u (β > 0)
            with accelerator.autocast():
                seeds = [cfg.validation_seed + k for k in range(EVAL_SEEDS) for _ in prompts]
                # the family's diffusers pipeline reads the module's .config: the DDP wrapper has none
                images = model.sample(accelerator.unwrap_model(policy), prompts * EVAL_SEEDS, seeds,
                                      cfg.num_inference_steps, device)
        if not accelerator.is_main_process:
            return
        scored = torch.cat(correct) if correct else torch.empty(0)
        row = {"heldout_accuracy": implicit_accuracy(scored).item() if correct else None,
               "heldout_pairs": int(scored.numel())}
        if hasattr(dataset, "reward"):
            rewards = dataset.reward(images.cpu(), prompts * EVAL_SEEDS).double()
            row["reward"] = rewards.mean().item()
            row["reward_sem"] = (rewards.std() / math.sqrt(rewards.numel())).item()  # standard error of the mean
        from torchvision.utils import save_image

        os.makedirs(os.path.join(cfg.output_dir, "samples"), exist_ok=True)
        scale = max(1, 64 // images.shape[-1])  # tiny models: nearest-upscale so the grid can be looked at
        grid = torch.nn.functional.interpolate((images + 1) / 2, scale_factor=scale, mode="nearest") if scale > 1 else (images + 1) / 2
        sample_path = os.path.join(cfg.output_dir, "samples", f"step-{step:06d}.png")
        save_image(grid, sample_path, nrow=len(prompts))
        logger.log("eval", step, row)
        result.eval_history.append({"step": step, **row})
        parts = [f"eval step {step}:"]
        if row["heldout_accuracy"] is not None:
            parts.append(f"held-out accuracy {row['heldout_accuracy']:.3f} ({row['heldout_pairs']} pairs)")
        if "reward" in row:
            parts.append(f"sample reward {row['reward']:+.3f} ± {row['reward_sem']:.3f}")
        say("  ".join(parts) + f"  → {os.path.relpath(sample_path)}")

    # ---- the loop --------------------------------------------------------------------------------
    if global_step == 0 and cfg.validation_steps:
        evaluate(0)  # the starting point, so the curves show the change
    first_epoch = global_step // updates_per_epoch
    resume_batches = (global_step % updates_per_epoch) * cfg.gradient_accumulation_steps
    progress = tqdm(total=cfg.max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_main_process)
    pending: list[tuple[dict, bool]] = []  # (batch means of the stats, whether the micro-batch was readable)
    pairs_in_update, t_update = 0, time.perf_counter()
    epoch = first_epoch
    while global_step < cfg.max_train_steps:
        # on the prepared loader: it re-sets its sampler's epoch from its own counter when iterated
        loader.set_epoch(epoch)
        batches = loader
        if epoch == first_epoch and resume_batches:
            batches = accelerator.skip_first_batches(loader, resume_batches)
        for batch in batches:
            note_corrupt(batch["corrupt"])
            batch["epoch"] = epoch  # the reference-error cache is per (pair, epoch)
            with accelerator.accumulate(denoiser):
                readable = len(batch["index"]) > 0
                if not readable:  # every image of the micro-batch was unreadable: the same step on a readable
                    batch = stand_in(epoch)  # pair, at zero weight (its gradient is 0, its stats not logged)
                out = compute_loss(model, denoiser, reference, objective, batch, cfg, accelerator, clip=clip,
                                   tau=tau, group=group, dro=dro)
                loss = out.loss if readable else out.loss * 0.0
                pending.append((_stat_means(out), readable))
                if readable:
                    pairs_in_update += out.num_pairs
                    if on_step is not None:
                        on_step(global_step + 1, out)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if dro is not None:
                dro.after_optimizer_step(global_step, accelerator.unwrap_model(denoiser))
            progress.update(1)
            if global_step % cfg.logging_steps == 0 or global_step == cfg.max_train_steps:
                merge_corrupt()
                means = _reduce_stat_means(pending, accelerator, device)
                pairs = accelerator.reduce(torch.tensor(float(pairs_in_update), device=device), "sum").item()
                dt = time.perf_counter() - t_update
                row = {**means, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "lr": lr_scheduler.get_last_lr()[0], "pairs_per_s": pairs / dt if dt > 0 else None,
                       "peak_mem_mb": _peak_memory_mb(device), "corrupt_images": len(corrupt_rows)}
                if accelerator.is_main_process:
                    logger.log("train", global_step, row)
                    result.history.append({"step": global_step, **row})
                    progress.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}",
                                         acc=f"{row.get('implicit_accuracy', float('nan')):.2f}")
            pending, pairs_in_update, t_update = [], 0, time.perf_counter()
            if global_step % cfg.checkpointing_steps == 0:
                merge_corrupt()
                save_checkpoint(accelerator, cfg.output_dir, global_step,
                                {**resume_must_match, "seed": cfg.seed, "corrupt_images": len(corrupt_rows),
                                 "corrupt_rows": sorted(corrupt_rows)},
                                total_limit=cfg.checkpoints_total_limit)
            if cfg.validation_steps and global_step % cfg.validation_steps == 0:
                evaluate(global_step)
            if global_step >= cfg.max_train_steps:
                break
        epoch += 1
    progress.close()

    # ---- the end: final evaluation, weights, plots ---------------------------------------------------
    accelerator.wait_for_everyone()
    if not (cfg.validation_steps and global_step % cfg.validation_steps == 0):
        evaluate(global_step)
    result.global_step = global_step
    merge_corrupt()
    if corrupt_rows:
        result.data_skipped["corrupt_image"] = len(corrupt_rows)
    if accelerator.is_main_process:
        _save_final(accelerator.unwrap_model(denoiser), model, cfg)
        logger.close()
        curves = None
        if "png" in cfg.report_to.split(","):
            curves = plot_curves(log_dir, os.path.join(cfg.output_dir, "curves.png"))
        say(_summary(cfg, result, curves, time.perf_counter() - t_start))
    # not accelerator.end_training(): it destroys the process group, and a second train() in the same job
    # (a sweep, a notebook, a resume test) would find none. The job's entry point destroys it (main()).
    accelerator.wait_for_everyone()
    return result


def _summary(cfg: TrainConfig, result: TrainResult, curves: str | None, seconds: float) -> str:
    """The closing lines: the first and last evaluation, and where everything was written."""
    out = cfg.output_dir
    lines = [f"fastpref-train: done, {result.global_step} steps in {seconds / 60:.1f} min → {out}"]
    evals = result.eval_history
    if evals:
        first, last = evals[0], evals[-1]
        for key, name in (("heldout_accuracy", "held-out implicit accuracy"), ("reward", "mean sample reward")):
            if last.get(key) is not None:
                start = f"{first[key]:+.3f} (step {first['step']}) → " if first is not last and first.get(key) is not None else ""
                sem = f" ± {last['reward_sem']:.3f}" if key == "reward" else ""
                lines.append(f"  {name}: {start}{last[key]:+.3f}{sem} (step {last['step']})")
    skipped = ", ".join(f"{v} {k}" for k, v in result.data_skipped.items())
    if skipped:
        lines.append(f"  data skipped: {skipped}")
    weights = "pytorch_lora_weights.safetensors" if cfg.is_lora else "unet/ or transformer/"
    lines.append(f"  weights: {os.path.join(out, weights)}")
    lines.append(f"  samples: {os.path.join(out, 'samples')}/step-*.png (one column per prompt, one row per seed)")
    lines.append(f"  logs: {os.path.join(out, 'logs')}/train.csv, eval.csv" + ("" if "tensorboard" not in cfg.report_to
                 else f", tensorboard --logdir {os.path.join(out, 'logs', 'tensorboard')}"))
    if curves:
        lines.append(f"  curves: {curves}")
    return "\n".join(lines)


def _save_final(denoiser, model: DiffusionModel, cfg: TrainConfig) -> None:
    """LoRA: ``pytorch_lora_weights.safetensors`` in the diffusers format (``pipe.load_lora_weights``);
    full fine-tune: the denoiser folder (``unet/`` or ``transformer/``)."""
    if cfg.is_lora:  # the family pipeline's save_lora_weights: its load_lora_weights reads it
        save_lora_weights(model, denoiser, cfg.output_dir)
    else:
        denoiser.save_pretrained(os.path.join(cfg.output_dir, "unet" if model.family in UNET_FAMILIES else "transformer"))
