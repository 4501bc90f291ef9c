"""Mutation check of the test suite: realistic one-line bugs, each applied to a scratch copy of the
repository and run against the tests that should catch it. Every mutant must be caught.

    python tools/mutants.py              # all mutants, then a table (make mutants)
    python tools/mutants.py --list       # the mutants, nothing run
    python tools/mutants.py --only T1 C2 # some of them

A mutant names its file, an exact piece of source that must occur exactly once there (optionally
within the block that starts at ``scope``, up to the next top-level definition), and its replacement —
no line numbers, so code that moves does not break it, and a piece that is no longer found (or found
twice) stops the run with an error instead of silently testing nothing. C++ mutants rebuild the
extension in the scratch copy (~1 min each on 2 cores). Not part of ``make test``: a full run takes
tens of minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "outputs", ".pytest_cache",
                                     "results", "*.so")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]  # pytest arguments; a bare test-file name is looked up anywhere under tests/
    what: str
    scope: str | None = None


M = Mutant
MUTANTS = [
    # ---- Triton kernels (fastpref/ops/pair_loss.py) ---------------------------------------------
    M("T1", "fastpref/ops/pair_loss.py", "split_mask = splits < SPLITS", "split_mask = splits < SPLITS - 1",
      ("test_triton.py", "-k", "split_reduction"), "finalize drops the last split's partial sums"),
    M("T2", "fastpref/ops/pair_loss.py", "start = split * CHUNK", "start = split * BLOCK",
      ("test_triton.py", "-k", "split_reduction"), "backward: split offset in blocks, not chunks",
      scope="def _pair_err_bwd_kernel("),
    M("T3", "fastpref/ops/pair_loss.py",
      "dl = tl.load(model_ptr + lose * stride_m + idx, mask=lmask, other=0.0).to(tl.float32) - tlo",
      "dl = tl.load(model_ptr + lose * stride_m + idx, mask=lmask, other=0.0).to(tl.float32) - tw",
      ("test_losses.py", "-k", "matches_reference and triton and odd"), "forward: loser against the winner's target"),
    M("T4", "fastpref/ops/pair_loss.py", "gl = cl * (pl - tlo)", "gl = cl * (pl - tw)",
      ("test_triton.py", "-k", "finite_differences"), "backward: loser against the winner's target"),
    M("T5", "fastpref/ops/pair_loss.py", "return tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))",
      "return tl.where(x >= 0.0, e / (1.0 + e), 1.0 / (1.0 + e))",
      ("test_losses.py", "-k", "closed_form and triton"), "sigmoid: branches swapped"),
    M("T6", "fastpref/ops/pair_loss.py", "loss = s_pos * (-_softplus(-u) - c0) + s_neg * (-_softplus(u) - c1)",
      "loss = s_pos * (-_softplus(-u) - c1) + s_neg * (-_softplus(u) - c0)",
      ("test_losses.py", "-k", "dmpo and triton and not nan and not extreme"),
      "DMPO: KL against Bern(α) instead of Bern(1 − α)"),
    M("T7", "fastpref/ops/pair_loss.py", "dl_dd = tl.where(u < 1.0, -1.0, 0.0) * (-0.5 * beta)",
      "dl_dd = tl.where(u < 0.0, -1.0, 0.0) * (-0.5 * beta)",
      ("test_losses.py", "-k", "hinge and triton and closed_form"), "hinge: gradient kink at 0, not 1"),
    M("T8", "fastpref/ops/pair_loss.py", "r = -d - c0", "r = d - c0",
      ("test_losses.py", "-k", "ipo and triton and closed_form"), "IPO: h = Δθ − Δref (sign)"),
    M("T9", "fastpref/ops/pair_loss.py", "z = tl.maximum(tl.sum(g_sum, axis=0) / N, 0.0)",
      "z = tl.maximum(tl.sum(g_sum, axis=0) / B, 0.0)",
      ("test_losses.py", "-k", "kto and triton and closed_form"), "KTO: reference point averaged over pairs, not rows"),
    M("T10", "fastpref/ops/pair_loss.py", "g = beta * _sigmoid(-u) * c1  # −∂(β_M·softplus(−u))/∂u",
      "g = beta * _sigmoid(-u)  # −∂(β_M·softplus(−u))/∂u",
      ("test_triton.py", "-k", "finite_differences and mapo"), "MaPO backward: factor T dropped"),
    M("T11", "fastpref/ops/pair_loss.py",
      "coef = 2.0 / numel / ((n if unpaired else num_pairs) if reduction == \"mean\" else 1)",
      "coef = 2.0 / numel / (num_pairs if reduction == \"mean\" else 1)",
      ("test_losses.py", "-k", "kto and triton and matches_reference"), "KTO backward: mean over pairs, not rows"),
    # ---- Diffusion-RPO kernels (fastpref/ops/rpo.py) --------------------------------------------
    M("R1", "fastpref/ops/rpo.py", "new_max = tl.maximum(row_max, tl.max(s, axis=1))",
      "new_max = tl.zeros_like(row_max)",
      ("test_rpo.py", "-k", "unrelated or near_duplicate or closed_form"),
      "row normaliser without its max subtraction", scope="elif FROM_EMB:  # online"),
    M("R2", "fastpref/ops/rpo.py", "dy_tile = w * _sigmoid(-u)", "dy_tile = w * _sigmoid(u)",
      ("test_rpo.py", "-k", "closed_form and triton"), "loser gradient with σ(u) for σ(−u)"),
    # ---- the C++ op (csrc/) ---------------------------------------------------------------------
    M("C1", "csrc/cpu/pair_loss_cpu.cpp", "using acc_t = at::opmath_type<scalar_t>;", "using acc_t = scalar_t;",
      ("test_losses.py", "-k", "cpu and matches_reference and bfloat16 and sigmoid"),
      "partial sums accumulated in bf16/fp16 lanes", scope="void chunk_sums("),
    M("C2", "csrc/pair_loss.h", "dl_dd = sp * sn * (u - (c0 - c1)) * du_dd;",
      "dl_dd = sp * sn * (u + (c0 - c1)) * du_dd;",
      ("test_losses.py", "-k", "cpu and dmpo and closed_form"), "DMPO gradient: minimum at −u*"),
    M("C3", "csrc/cpu/pair_loss_cpu.cpp",
      "const acc_t g = gop[reduction == kNone ? pair : 0] * static_cast<acc_t>(coef);",
      "const acc_t g = gop[0] * static_cast<acc_t>(coef);",
      ("test_losses.py", "-k", "cpu and reductions"), "backward ignores per-pair upstream gradients"),
    M("C4", "csrc/cpu/pair_loss_cpu.cpp",
      "_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb)",
      "_mm256_add_epi32(bits, _mm256_set1_epi32(0x8000))",
      ("test_cpp_backend.py", "-k", "rounds_to_nearest_even"), "bf16 gradient: ties rounded away from zero"),
    M("C5", "csrc/cpu/pair_loss_cpu.cpp", "lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, x));",
      "lo = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, x));",
      ("test_losses.py", "-k", "cpu and matches_reference and bfloat16 and sigmoid"),
      "bf16 widening reads the upper elements twice"),
    # ---- the public API (fastpref/losses.py) and the reference --------------------------------
    M("A1", "fastpref/ops/family.py", 'return 2.0, float(p["margin"]), 0.0', 'return 1.0, float(p["margin"]), 0.0',
      ("test_losses.py", "-k", "dro and closed_form"), "DRO margin scaled by ½"),
    M("A2", "fastpref/losses.py", "beta = float(model_pred[0].numel()) if beta is None else",
      "beta = float(model_pred.numel()) if beta is None else",
      ("test_losses.py", "-k", "orpo_default_beta"), "ORPO default β counts the whole batch"),
    M("A3", "fastpref/reference.py", "return (h - 1.0 / (2.0 * beta)).square()",
      "return (h + 1.0 / (2.0 * beta)).square()", ("test_losses.py", "-k", "ipo and torch"),
      "reference IPO: target margin of the wrong sign"),
    M("A4", "fastpref/reference.py", "return torch.clamp(g.mean(), min=0.0)", "return g.mean()",
      ("test_losses.py", "-k", "kto and torch and closed_form"), "reference KTO: reference point not clamped at 0"),
    M("A5", "fastpref/reference.py", "return torch.softmax(-d / tau, dim=1)", "return torch.softmax(d / tau, dim=1)",
      ("test_rpo.py", "-k", "closed_form and torch"), "reference RPO weights favour distant pairs"),
    M("A6", "fastpref/reference.py",
      "return torch.sigmoid(u) * (-F.softplus(-u) - math.log1p(-alpha)) + torch.sigmoid(-u) * (",
      "return (1 - alpha) * (math.log1p(-alpha) + F.softplus(-u)) + alpha * (math.log(alpha) + F.softplus(u)) + 0 * (",
      ("test_losses.py", "-k", "dmpo and torch and (closed_form or minimum)"),
      "reference DMPO: the reversed KL(Bern(1 − α) ‖ Bern σ(u)), same minimum u*"),
    # ---- trainer pieces -------------------------------------------------------------------------
    M("O1", "fastpref/train/objectives.py", "labels = torch.cat([torch.ones(b), torch.zeros(b)])",
      "labels = torch.cat([torch.zeros(b), torch.ones(b)])",
      ("test_objectives.py",), "--loss kto labels the losers desirable"),
    M("O3", "fastpref/train/objectives.py", "    if labels is None:\n", "    if True:\n",
      ("test_unpaired.py", "-k", "own_noise"), "--loss kto ignores an unpaired batch's labels"),
    M("U1", "fastpref/train/noise.py", "eps = torch.cat([noise] * images)", "eps = torch.cat([noise[:1]] * x0.shape[0])",
      ("test_unpaired.py", "-k", "own_noise"), "unpaired images share one noise"),
    M("E1", "fastpref/train/loop.py", "        policy = denoiser\n        correct = []",
      "        if not accelerator.is_main_process:\n            return\n        policy = denoiser\n        correct = []",
      ("test_distributed_resume.py",), "evaluation on process 0 alone (a sharded model would hang)"),
    M("V1", "fastpref/train/models.py",
      "return latents if self.latents_dtype is None else latents.to(self.latents_dtype)", "return latents",
      ("test_train.py", "-k", "latents_are_handed_on"), "an fp32 VAE's latents reach the denoiser in fp32"),
    M("V2", "fastpref/train/cache.py", "if dtype == torch.float16 and getattr(", "if False and getattr(",
      ("test_memory_flags.py", "-k", "vae_stays"), "--mixed_precision fp16 casts an upcast VAE to fp16"),
    M("B1", "fastpref/train/loop.py", "loss = out.loss if readable else out.loss * 0.0", "loss = out.loss",
      ("test_unreadable_batch.py",), "a stand-in micro-batch trains at full weight"),
    M("B2", "fastpref/train/loop.py", "pending.append((_stat_means(out), readable))",
      "pending.append((_stat_means(out), True))", ("test_unreadable_batch.py",),
      "a stand-in micro-batch's stats are logged"),
    M("B3", "fastpref/train/loop.py", "                merge_corrupt()\n                means =",
      "                means =", ("test_unreadable_batch.py",), "the log counts process 0's unreadable rows only"),
    M("O2", "fastpref/train/objectives.py", "alpha=cfg.alpha, ", "", ("test_objectives.py",),
      "--loss dmpo ignores --alpha"),
    M("L1", "fastpref/train/loop.py", "first_epoch = global_step // updates_per_epoch", "first_epoch = 0",
      ("test_resume.py", "-k", "across_epochs"), "resume restarts at epoch 0 (the data order of epoch 0 again)"),
    M("L2", "fastpref/train/loop.py", "        loader.set_epoch(epoch)\n", "        loader.sampler.set_epoch(epoch)\n",
      ("test_resume.py", "-k", "across_epochs"),
      "epoch set on the sampler: accelerate's prepared loader resets it when a resumed run iterates"),
    M("K1", "fastpref/train/checkpoint.py", "        if not problems:\n            return path",
      "        if True:\n            return path", ("test_resume.py", "-k", "incomplete or killed"),
      "--resume_from_checkpoint latest picks an incomplete checkpoint"),
    M("G1", "fastpref/train/memory.py", "use_reentrant=False, context_fn=_recompute_contexts,", "use_reentrant=False,",
      ("test_memory_flags.py", "-k", "checkpointing"),
      "--gradient_checkpointing: the batched mode's adapter mask is not re-applied in the recompute"),
    M("G2", "fastpref/train/loop.py", "    if cfg.gradient_checkpointing:\n        enable_gradient_checkpointing",
      "    if False:\n        enable_gradient_checkpointing", ("test_memory_flags.py", "-k", "trainer_with"),
      "--gradient_checkpointing never reaches the denoiser"),
    M("G3", "fastpref/train/models.py", "chunk = self.vae_encode_batch_size or pixels.shape[0]",
      "chunk = pixels.shape[0]", ("test_memory_flags.py", "-k", "vae_encode"), "--vae_encode_batch_size ignored"),
    M("G4", "fastpref/train/loop.py", "    adamw_class(cfg.use_8bit_adam)  #", "    pass  #",
      ("test_memory_flags.py", "-k", "missing_bitsandbytes"),
      "--use_8bit_adam without bitsandbytes fails only after the model is loaded"),
    M("G5", "fastpref/train/models.py", 'kw = {"revision": revision, "variant": variant}', 'kw = {"revision": revision}',
      ("test_memory_flags.py", "-k", "variant"), "--variant not passed to from_pretrained"),
    M("D1", "fastpref/train/data.py", "elif float(label_0) == 0.5:", 'elif label_0 == "0.5":',
      ("test_train.py", "-k", "ties"), "Pick-a-Pic ties (label_0 = 0.5) no longer dropped"),
    M("DRO1", "fastpref/train/dro.py", "torch.cat([expert, online]), torch.cat([t, t]), torch.cat([expert_target, online_target])",
      "torch.cat([online, expert]), torch.cat([t, t]), torch.cat([online_target, expert_target])",
      ("test_dro_train.py", "-k", "online_half"), "--loss dro: expert and online halves swapped"),
    M("DRO2", "fastpref/train/dro.py", "noise = noise.to(device, x0.dtype)", "noise = buf['states'][entries, 0].to(device, x0.dtype)",
      ("test_dro_train.py", "-k", "online_half"), "--loss dro: the expert shares the trajectory's noise x_T"),
    M("DRO3", "fastpref/train/dro.py", "if step % self.refresh_steps == 0:", "if True:",
      ("test_dro_train.py", "-k", "refreshes"), "--loss dro: the lagged copy refreshed every step"),
    M("DRO4", "fastpref/train/dro.py", "            lagged[n].copy_(v)\n", "            pass\n",
      ("test_dro_train.py", "-k", "resume"), "--loss dro: resume does not restore the lagged copy"),
    M("S1", "fastpref/train/sdxl.py", "torch.cat([original, crop, target], dim=1)",
      "torch.cat([original, target, crop], dim=1)", ("test_sdxl.py", "-k", "conditioning"),
      "SDXL time ids in the wrong order (original, target, crop)"),
    M("S2", "fastpref/train/sdxl.py", "crop if crop is not None else [(0, 0)] * b", "[(0, 0)] * b",
      ("test_sdxl.py", "-k", "conditioning"), "SDXL time ids ignore the pair's crop"),
    M("S3", "fastpref/train/transforms.py", "stacked = stacked.flip(-1)",
      "stacked = torch.cat([stacked[:3].flip(-1), stacked[3:]])", ("test_sdxl.py", "-k", "random_flip"),
      "--random_flip flips the winner only"),
    M("S4", "fastpref/train/pipelines.py", "unet_lora_adapter_metadata=metadata)", "unet_lora_adapter_metadata=None)",
      ("test_sdxl.py", "-k", "lora_file"), "LoRA file without its alpha: load_lora_weights scales it by 1"),
    M("S5", "fastpref/train/cache.py", "{n: v[k].to(\"cpu\", copy=True) for n, v in cond.items()}",
      "{n: v[k].to(\"cpu\", copy=True) for n, v in cond.items() if n != \"time_ids\"}",
      ("test_sdxl.py", "-k", "latent_cache"), "--cache_latents drops SDXL's time ids"),
]  # fmt: skip


def _block(text: str, scope: str | None, mutant: Mutant) -> tuple[int, int]:
    """[start, end) of the text the mutant may touch: the whole file, or from ``scope`` to the next
    top-level definition (a line starting with "def ", "class ", "@" or a C/C++ "}")."""
    if scope is None:
        return 0, len(text)
    count = text.count(scope)
    if count != 1:
        raise SystemExit(f"mutant {mutant.id}: scope {scope!r} occurs {count} times in {mutant.file} (expected 1)")
    start = text.index(scope)
    end = len(text)
    offset = text.find("\n", start) + 1
    for line in text[offset:].splitlines(keepends=True):
        if line.startswith(("def ", "class ", "@", "}")):
            end = offset
            break
        offset += len(line)
    return start, end


def apply(mutant: Mutant, root: Path) -> None:
    """Apply ``mutant`` to the copy at ``root``; SystemExit when its source piece is not unique."""
    path = root / mutant.file
    if not path.is_file():
        raise SystemExit(f"mutant {mutant.id}: {mutant.file} does not exist")
    text = path.read_text()
    start, end = _block(text, mutant.scope, mutant)
    region = text[start:end]
    count = region.count(mutant.find)
    if count != 1:
        where = f" within {mutant.scope!r}" if mutant.scope else ""
        raise SystemExit(f"mutant {mutant.id}: {mutant.find!r} occurs {count} times in {mutant.file}{where} "
                         "(expected exactly 1): update tools/mutants.py")  # fmt: skip
    path.write_text(text[:start] + region.replace(mutant.find, mutant.replace) + text[end:])


def resolve_tests(args: tuple[str, ...], root: Path) -> list[str]:
    """Bare test-file names are looked up under tests/ (the suite may be reorganised into folders)."""
    out = []
    for a in args:
        if a.endswith(".py") and "/" not in a:
            found = sorted((root / "tests").rglob(a))
            if len(found) != 1:
                raise SystemExit(f"test file {a!r}: found {len(found)} under tests/ (expected 1)")
            a = str(found[0].relative_to(root))
        out.append(a)
    return out


def baseline_selection(mutants, root: Path) -> dict[str, set]:
    """test file → the -k expressions the mutants use on it (None: the whole file)."""
    out: dict[str, set] = {}
    for m in mutants:
        tests = resolve_tests(m.tests, root)
        key = tests[tests.index("-k") + 1] if "-k" in tests else None
        out.setdefault(tests[0], set()).add(key)
    return out


def run_tests(root: Path, tests: list[str], ext_dir: Path, timeout: float) -> tuple[str, float, str]:
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"), HF_HUB_OFFLINE="1",
               TORCH_EXTENSIONS_DIR=str(ext_dir), PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not fresh_inputs", *tests]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0, ""
    tail = (proc.stdout + proc.stderr)[-3000:]
    # pytest: 0 all passed, 1 some failed; 2–5 usage/collection problems (5: nothing collected)
    status = {0: "passed", 1: "failed"}.get(proc.returncode, f"error (exit {proc.returncode})")
    return status, time.time() - t0, tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", metavar="ID", help="run these mutants only")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mutant (default 900)")
    args = p.parse_args(argv)

    chosen = [m for m in MUTANTS if not args.only or m.id in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        raise SystemExit(f"unknown mutant ids: {sorted(set(args.only) - {m.id for m in MUTANTS})}")
    for m in chosen:  # every source piece must be found before anything runs
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy2(ROOT / m.file, Path(tmp) / "f")
            apply(dataclasses.replace(m, file="f"), Path(tmp))
    if args.list:
        for m in chosen:
            print(f"{m.id:4} {m.file:32} {m.what}")
        return 0

    with tempfile.TemporaryDirectory(prefix="fastpref-mutants-") as tmp:
        tmp = Path(tmp)
        clean = tmp / "clean"
        shutil.copytree(ROOT, clean, ignore=COPY_IGNORE)
        shared_ext = tmp / "ext-clean"  # the unmutated C++ build, reused by every non-C++ mutant
        if not args.no_baseline:  # the selected tests pass before any mutation: one run per test file
            for file, keys in baseline_selection(chosen, clean).items():
                sel = [file] + (["-k", " or ".join(f"({k})" for k in sorted(keys))] if None not in keys else [])
                status, secs, tail = run_tests(clean, sel, shared_ext, args.timeout * 2)
                print(f"baseline (unmutated) {' '.join(sel)}: {status} in {secs:.0f} s", flush=True)
                if status != "passed":
                    print(tail)
                    return 2
        rows = []
        for m in chosen:
            work = tmp / m.id
            shutil.copytree(clean, work)
            apply(m, work)
            ext = tmp / f"ext-{m.id}" if m.file.startswith("csrc/") else shared_ext
            status, secs, tail = run_tests(work, resolve_tests(m.tests, work), ext, args.timeout)
            caught = status != "passed" and not status.startswith("error")
            rows.append((m, "caught" if caught else ("SURVIVED" if status == "passed" else status), secs))
            print(f"{m.id:4} {rows[-1][1]:9} {secs:6.0f} s  {m.what}", flush=True)
            if not caught and status != "passed":
                print(tail)
            shutil.rmtree(work, ignore_errors=True)

    print("\n| id | file | bug | tests | result | s |\n| --- | --- | --- | --- | --- | --- |")
    for m, result, secs in rows:
        print(f"| {m.id} | {m.file} | {m.what} | {' '.join(m.tests)} | {result} | {secs:.0f} |")
    caught = sum(r == "caught" for _, r, _ in rows)
    print(f"\n{caught} of {len(rows)} mutants caught")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
