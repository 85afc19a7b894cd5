"""Mutation testing on a fixed list: does the suite fail when one line of the implementation is wrong?

Each mutation names a file, an exact text that must occur there once, its replacement (a one-line change), the
tests that should catch it and the claim it breaks. The repository is copied once to a temporary folder (the
working tree is never touched); each mutation is written into the copy, the named tests run with `pytest -x` and a
time limit, and the file is restored. A mutation is *killed* when the tests fail, *survives* when they pass.

    python benchmarks/mutation.py                   # all, writes runs/mutation/result.{json,md}
    python benchmarks/mutation.py --only ddp-off lr-flat
    python benchmarks/mutation.py --check           # only check that every mutation still applies (fast)

The list grows with the code: when a mutated text no longer occurs, `--check` (and tests/test_mutation_list.py)
names it. Results and the survivors' explanations are in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    claim: str


def M(id: str, file: str, old: str, new: str, tests: str, claim: str) -> Mutation:  # noqa: N802 (a table row)
    return Mutation(id, file, old, new, tuple(tests.split()), claim)


TR, TS, TRS = "fae/training.py", "fae/transport.py", "tests/test_training_steps.py"
SMP, TPT, ECL = "tests/test_sample.py", "tests/test_transport.py", "tests/test_metrics_cli.py"
GF = "tests/test_generator_families.py"
INC, GOLD = "fae/metrics/inception.py", "tests/test_golden_metrics.py::test_inception_matches_the_reference"
SF, STT, MM, MMT = "fae/models/starflow.py", "tests/test_starflow.py", "fae/models/mmdit.py", "tests/test_mmdit.py"
PR, PRT, LT = "fae/precision.py", "tests/test_precision.py", "fae/data/latents.py"
IO, IOT, SCT, FST = "fae/io.py", "tests/test_io.py", "tests/test_scale.py", "tests/test_fae_stage.py"
MUTATIONS: list[Mutation] = [
    # ---- the rows of issue 17's table
    M("ddp-off", TR, "if self.world > 1:\n            stage.modules", "if False:\n            stage.modules",
      f"{TRS}::test_two_process_step_equals_single_process_step", "multi-process training all-reduces gradients"),
    M("generate-shift-1", "fae/generators/dit.py", "time_shift=self.time_shift, generators=generators,",
      "time_shift=1.0, generators=generators,", f"{SMP}::test_sampling_calls_the_model_at_the_trained_shift",
      "sampling uses the time shift the model was trained with"),
    M("dit-default-transport", "fae/stages/dit.py", 'batch["label"], self.cfg.transport)',
      'batch["label"], TransportConfig())', "tests/test_dit.py::test_dit_stage_trains_at_the_configured_shift",
      "training uses the configured shift"),
    M("lr-flat", TR, "    return factor\n", "    return lambda step: 1.0\n",
      f"{TRS}::test_lr_at_chosen_steps_follows_the_formula", "warm-up and cosine schedules"),
    M("no-grad-clip", TR, "clip_grad_norm_(params, clip)", 'clip_grad_norm_(params, float("inf"))',
      f"{TRS}::test_gradients_are_clipped_before_the_update", "optim.grad_clip"),
    M("inception-7c-avg", INC, 'else F.max_pool2d(x, 3, stride=1, padding=1)', "else _avg_pool_tf(x)", GOLD,
      "FID parity: Mixed_7c pools with max"),
    M("inception-count-pad", INC, "count_include_pad=False", "count_include_pad=True", GOLD,
      "FID parity: TF average pools exclude padding"),
    M("inception-bn-eps", INC, "nn.BatchNorm2d(cout, eps=1e-3)", "nn.BatchNorm2d(cout, eps=1e-5)", GOLD,
      "FID parity: TF batch-norm epsilon"),
    M("fae-no-pos-table", "fae/models/autoencoder.py",
      'self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, d)) if cfg.decoder_pos_embed == "learned" else None',
      "self.pos_embed = None", "tests/test_paper_counts.py", "exactly 38,166,592 / 170,428,416 parameters"),
    # ---- transport
    M("shift-formula-unflipped", TS, "return t / (shift + (1.0 - shift) * t)",
      "return shift * t / (1 + (shift - 1.0) * t)", "tests/test_transport.py", "paper shift 0.4 on t=0-is-data axis"),
    M("path-swapped", TS, "return (1 - t) * x0 + t * eps", "return t * x0 + (1 - t) * eps",
      "tests/test_transport.py", "x_t = (1 - t) x0 + t eps"),
    M("velocity-sign", TS, "    return eps - x0", "    return x0 - eps", "tests/test_transport.py", "v = eps - x0"),
    M("cfg-from-cond", TS, "guided = v_uncond + scales[0] * (v_cond - v_uncond)",
      "guided = v_cond + scales[0] * (v_cond - v_uncond)", "tests/test_transport.py", "classifier-free guidance"),
    M("sde-drift-ignores-norm", TS, "x_mean = x - h * (v + cfg.diffusion_norm * (x + (1 - t) * v))",
      "x_mean = x - h * (v + (x + (1 - t) * v))", f"{TPT}::test_sde_with_diffusion_norm_reaches_the_data",
      "diffusion_norm != 1 keeps the SDE's marginals"),
    M("sde-noise-ignores-norm", TS, "w = cfg.diffusion_norm * t", "w = t",
      f"{TPT}::test_sde_with_diffusion_norm_reaches_the_data", "diffusion_norm != 1 keeps the SDE's marginals"),
    M("sde-noisy-last-step", TS, "last = i == cfg.steps - 1", "last = False", "tests/test_transport.py",
      "the SDE's last step goes to the mean"),
    M("time-shift-override-ignored", TS, "shift = cfg.time_shift if cfg.time_shift is not None else time_shift",
      "shift = time_shift", f"{SMP}::test_sampling_calls_the_model_at_the_trained_shift", "--time-shift overrides"),
    M("no-shift-in-training", TS, "return shift_time(t, cfg.time_shift) if cfg.shift_in_training else t",
      "return t", "tests/test_transport.py", "training times are shifted"),
    M("logit-normal-no-mean", TS, "t = torch.sigmoid(cfg.logit_normal_mean + cfg.logit_normal_std * n)",
      "t = torch.sigmoid(cfg.logit_normal_std * n)", "tests/test_transport.py",
      "logit-normal time distribution"),
    M("guidance-open-interval", TS, "if iv.t_min <= t <= iv.t_max:", "if iv.t_min < t < iv.t_max:",
      "tests/test_transport.py", "guidance intervals are closed"),
    M("heun-full-step", TS, "x = x - h * 0.5 * (v + velocity(x_pred, t_next, y))",
      "x = x - h * (v + velocity(x_pred, t_next, y))", "tests/test_transport.py", "Heun averages two slopes"),
    M("cfg-null-is-cond", TS, "both = torch.cat([y, torch.full_like(y, self.null_class)])", "both = torch.cat([y, y])",
      "tests/test_transport.py",
      "the unconditional half uses the null class"),
    M("sample-seed-ignores-index", TS, 'f"fae-sample:{seed}:{index}"', 'f"fae-sample:{seed}:0"', "tests/test_transport.py",
      "each sample has its own noise"),
    # ---- training
    M("warmup-off-by-one", TR, "return (step + 1) / cfg.warmup_steps", "return step / cfg.warmup_steps",
      f"{TRS}::test_lr_at_chosen_steps_follows_the_formula", "warm-up starts at lr / warmup_steps, not 0"),
    M("cosine-ignores-min-lr", TR, "floor = cfg.min_lr / cfg.lr", "floor = 0.0",
      f"{TRS}::test_lr_at_chosen_steps_follows_the_formula", "cosine ends at min_lr"),
    M("accum-unscaled", TR, "(loss / len(micro)).backward()", "loss.backward()",
      f"tests/test_training.py::test_grad_accumulation_matches_full_batch "
      f"{TRS}::test_accumulated_gradient_is_the_full_batch_gradient",
      "grad accumulation = full batch"),
    M("ema-decay-swapped", TR, "torch._foreach_lerp_(ema, live, 1.0 - decay)", "torch._foreach_lerp_(ema, live, decay)",
      "tests/test_training.py", "EMA of the weights"),
    M("signal-no-checkpoint", TR, "if self.step % self.cfg.checkpoint_every and self.step != end:",
      "if False:", f"{TRS}::test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly",
      "SIGTERM: finish the step, checkpoint, stop"),
    M("signal-ignored", TR, "        self._stop_signal = signum\n", "        pass\n",
      f"{TRS}::test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly", "SIGTERM stops the run"),
    M("workers-ignored", TR, "loader_options(self.cfg.num_workers, self.device)", "loader_options(0, self.device)",
      f"{TRS}::test_dataloader_workers_give_the_same_run", "train.num_workers > 0"),
    M("no-autocast-in-training", TR, "autocast = self.precision.autocast()", "autocast = contextlib.nullcontext()",
      f"{TRS}::test_bf16_training_runs_under_autocast", "train.precision: bf16"),
    M("resume-data-from-zero", TR, "self.cfg.seed, self.step * self.cfg.batch_size, self.rank",
      "self.cfg.seed, 0, self.rank", "tests/test_training.py::test_resume_is_exact", "exact resume: data order"),
    M("step-not-seeded", TR, "seed_step(self.cfg.seed, self.rank, self.step)", "None",
      "tests/test_training.py::test_resume_is_exact", "exact resume: per-step random streams"),
    M("resume-oldest-checkpoint", TR, "for path in reversed(ckpts):", "for path in ckpts:",
      f"tests/test_training.py::test_resume_is_exact {TRS}::test_resume_starts_from_the_newest_checkpoint",
      "resume from the newest checkpoint"),
    M("nan-step-applied", TR, "        if finite:\n            opt.step()", "        if True:\n            opt.step()",
      "tests/test_training.py::test_non_finite_loss_is_skipped_then_stops", "non-finite updates are skipped"),
    M("images-skip-not-counted", "fae/data/images.py", "                self.skipped += 1\n", "                pass\n",
      "tests/test_data.py::test_image_folder_in_workers_drops_corrupt_files_and_counts_per_process",
      "corrupt images are dropped and counted (per process)"),
    M("sampler-stride-one", TR, "            position += self.world\n", "            position += 1\n",
      "tests/test_training.py", "process r takes positions r, r+W, ..."),
    M("ema-buffers-not-copied", TR, "            e_buf.copy_(b)\n", "            pass\n",
      "tests/test_training.py", "EMA copies buffers"),
    M("ranks-share-streams", TR, "seed_step(self.cfg.seed, self.rank, self.step)",
      "seed_step(self.cfg.seed, 0, self.step)",
      f"{TRS}::test_each_process_draws_its_own_random_numbers_at_every_step "
      f"{TRS}::test_two_process_resume_restores_each_process_rng",
      "each process draws its own random streams"),
    # ---- io (checkpoints)
    M("atomic-write-in-place", "fae/io.py", "        write(Path(tmp))\n        _kill_point()",
      "        write(path)\n        _kill_point()", f"{IOT}::test_atomic_write_leaves_no_half_file",
      "every write is atomic"),
    M("prune-keeps-one-more", TR, "checkpoint_dirs(self.out_dir)[: -self.cfg.keep_checkpoints]",
      "checkpoint_dirs(self.out_dir)[: -self.cfg.keep_checkpoints - 1]",
      "tests/test_training.py::test_loss_goes_down_and_checkpoints_are_pruned", "train.keep_checkpoints"),
    M("ema-not-saved", TR, 'tmp / f"{name}.ema.safetensors"', 'tmp / f"{name}.safetensors"',
      "tests/test_training.py::test_resume_is_exact", "checkpoints hold the EMA"),
    # ---- stages
    M("dit-record-default-transport", "fae/stages/dit.py", '{"transport": to_dict(self.cfg.transport)}',
      '{"transport": to_dict(TransportConfig())}', f"{SMP}::test_sampling_calls_the_model_at_the_trained_shift",
      "the bundle records the trained shift"),
    M("fae-stage-no-kl", "fae/stages/autoencoder.py", "posterior, self.cfg.loss.kl_weight)", "posterior, 0.0)",
      f"{FST}::test_fae_stage_loss_uses_the_configured_kl_weight", "loss.kl_weight"),
    M("cli-sample-drops-time-shift", "fae/sampling.py", "steps=steps, time_shift=time_shift, guidance=schedule",
      "steps=steps, time_shift=None, guidance=schedule", f"{SMP}::test_sample_cli_flags_reach_the_sampler", "--time-shift"),
    M("cli-sample-drops-cfg-batch", "fae/sampling.py", "SamplerConfig(method=chosen, cfg_batch=cfg_batch,",
      "SamplerConfig(method=chosen, cfg_batch=\"concat\",", f"{SMP}::test_sample_cli_flags_reach_the_sampler",
      "--cfg-batch"),
    M("cli-sample-drops-precision", "fae/cli/generate.py", "precision=args.precision, prompts", 'precision="auto", prompts',
      f"{SMP}::test_sample_cli_flags_reach_the_sampler", "fae sample --precision bf16"),
    M("cli-encode-drops-workers", "fae/cli/generate.py", "num_workers=args.num_workers,", "num_workers=0,",
      "tests/test_latents.py::test_encode_cli_passes_num_workers", "fae encode --num-workers"),
    M("sampling-no-autocast", "fae/sampling.py", "with choice.autocast():", "with torch.no_grad():",
      f"{SMP}::test_bf16_sampling_runs_the_model_under_autocast", "fae sample --precision bf16"),
    # ---- watching a run, fast data paths (issue 15)
    M("tensorboard-no-purge", "fae/monitoring.py", "purge_step=resumed_step + 1", "purge_step=None",
      "tests/test_monitoring.py::test_a_resume_does_not_duplicate_steps", "a resume does not duplicate steps"),
    # ---- metrics / inception
    M("inception-logits-biased", INC, '"logits": (pool @ self.fc.weight.T).float()', '"logits": self.fc(pool).float()',
      GOLD, "IS logits without the bias"),
    M("inception-spatial-chw", INC, "mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)",
      "mixed_6_conv[:, :SPATIAL_CHANNELS].flatten(1)", GOLD, "sFID features in TF (h, w, c) order"),
    M("inception-pytorch-resize-corners", INC, 'mode="bilinear", align_corners=False)',
      'mode="bilinear", align_corners=True)', GOLD, "pytorch-fid resize"),
    M("inception-tf1-norm", INC, "(resize_bilinear_tf1(x, INPUT_SIZE) - 128.0) / 128.0",
      "(resize_bilinear_tf1(x, INPUT_SIZE) - 127.5) / 127.5", GOLD, "TF-1 input scaling (x - 128) / 128"),
    M("inception-tf1-half-pixel", INC, "src = torch.arange(out, device=t.device, dtype=torch.float32) * torch",
      "src = 0.5 + torch.arange(out, device=t.device, dtype=torch.float32) * torch", GOLD,
      "TF-1 resize has no half-pixel offset"),
    M("network-pytorch-is-tf1", "fae/metrics/networks.py", 'InceptionNetwork(inception_weights, resize="pytorch"',
      'InceptionNetwork(inception_weights, resize="tf1"', f"{ECL}::test_eval_is_command", "--network inception:pytorch"),
    M("is-cli-drops-split-size", "fae/cli/eval.py", "splits=args.splits, split_size=args.split_size)",
      "splits=args.splits, split_size=None)", f"{ECL}::test_eval_is_command",
      "fae eval is --split-size"),
    M("gen-cli-drops-is-split-size", "fae/cli/eval.py", "is_split_size=args.is_split_size, pr_k",
      "is_split_size=None, pr_k", f"{ECL}::test_eval_is_command", "--is-split-size"),
    # ---- metrics / frechet
    M("fd-trace-sign", "fae/metrics/frechet.py", "- 2.0 * tr_covmean)", "+ 2.0 * tr_covmean)",
      "tests/test_metrics_frechet.py", "FID formula"),
    M("fd-biased-cov", "fae/metrics/frechet.py", "self.m2 / (self.n - 1)", "self.m2 / self.n",
      "tests/test_metrics_frechet.py", "unbiased covariance as np.cov"),
    M("fd-chan-update", "fae/metrics/frechet.py", "np.outer(delta, delta) * (self.n * nb / n)",
      "np.outer(delta, delta) * (nb / n)", "tests/test_metrics_frechet.py", "streaming covariance is exact"),
    M("fd-sqrt-of-sum", "fae/metrics/frechet.py", "return float(w.clamp_min(0.0).sqrt().sum())",
      "return float(w.clamp_min(0.0).sum() ** 0.5)", "tests/test_metrics_frechet.py", "tr sqrt(S1 S2)"),
    M("fd-cholesky-untransposed", "fae/metrics/frechet.py", "            factor = lower.T\n",
      "            factor = lower\n", "tests/test_metrics_frechet.py", "S1 = F^T F with F = L^T"),
    # ---- models
    M("dit-time-scale", "fae/models/dit.py", "args = 1000.0 * t.float()[:, None] * freqs[None]",
      "args = t.float()[:, None] * freqs[None]",
      "tests/test_dit.py::test_time_embedding_feeds_1000_t_to_dit_sinusoids",
      "DiT time embedding of t in [0, 1] x 1000"),
    M("dit-no-label-dropout", "fae/nn.py",
      "drop = torch.rand(y.shape, generator=generator, device=y.device) < self.dropout",
      "drop = torch.zeros_like(y, dtype=torch.bool)", "tests/test_dit.py", "label dropout for CFG"),
    M("fae-kl-not-normalised", "fae/models/autoencoder.py", "kl = posterior.kl().mean() / posterior.mean[0].numel()",
      "kl = posterior.kl().mean()", f"{FST}::test_fae_stage_loss_uses_the_configured_kl_weight",
      "beta on per-element KL"),
    M("rope-theta", "fae/nn.py", "theta: float = 10000.0", "theta: float = 100.0",
      "tests/test_dit.py::test_rope_rotates_each_pair_by_position_times_the_standard_frequency",
      "2-D RoPE frequencies"),
    M("adaln-no-one-plus", "fae/nn.py", "return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))",
      "return torch.addcmul(shift.unsqueeze(1), x, scale.unsqueeze(1))", "tests/test_dit.py tests/test_pixel_decoder.py",
      "adaLN modulation x (1 + scale) + shift"),
    M("denormalize-no-mean", "fae/data/latents.py", "return z * (std.to(z).view(-1, 1, 1) + eps) + mean.to(z).view(-1, 1, 1)",
      "return z * (std.to(z).view(-1, 1, 1) + eps)",
      f"tests/test_latents.py {SMP}::test_generator_returns_latents_in_the_fae_space",
      "generators return de-normalised latents"),
    # ---- losses (LPIPS parity)
    M("lpips-shift", "fae/losses.py", "_LPIPS_SHIFT = (-0.030, -0.088, -0.188)", "_LPIPS_SHIFT = (-0.030, -0.088, -0.118)",
      "tests/test_golden_metrics.py", "LPIPS input scaling"),
    M("lpips-vgg-taps", "fae/losses.py", "_VGG16_TAPS = (3, 8, 15, 22, 29)", "_VGG16_TAPS = (3, 8, 15, 22, 28)",
      "tests/test_golden_metrics.py", "LPIPS VGG layers relu1_2 .. relu5_3"),
    M("lpips-sum-not-mean", "fae/losses.py", "self.lins[k].weight.float()).mean((1, 2, 3))",
      "self.lins[k].weight.float()).sum((1, 2, 3))", "tests/test_golden_metrics.py", "LPIPS spatial average"),
    # ---- scale (issue 15): FSDP2, resume across process counts, sharded evaluation
    M("fsdp-optimizer-not-restored", "fae/sharding.py",
      '        set_optimizer_state_dict(container, opt, state["optim"][group])', "        pass",
      "tests/test_scale.py::test_resume_on_another_number_of_processes", "a sharded resume restores AdamW's moments"),
    M("fsdp-export-unloaded", "fae/sharding.py", "    module.load_state_dict(state)\n", "    state.clear()\n",
      "tests/test_scale.py::test_two_processes_train_as_one", "a sharded run exports its gathered weights"),
    M("eval-shares-not-merged", "fae/metrics/reconstruction.py",
      "paired, seams, stats = D.merged(paired), D.merged(seams), D.merged(stats)", "paired, seams, stats = paired, seams, stats",
      "tests/test_pixel_decoder.py::test_torchrun_two_processes_with_gan", "each process's evaluation share is merged"),
    M("eval-features-not-split", "fae/metrics/features.py", "share if D.is_distributed() else None", "None",
      "tests/test_metrics_cli.py::test_eval_under_torchrun_splits_the_features_and_gives_the_one_process_score",
      "fae eval under torchrun splits the feature extraction"),
    M("stats-merge-no-mean-shift", "fae/metrics/frechet.py", "np.outer(delta, delta) * (self.n * other.n / n)",
      "0 * np.outer(delta, delta)", "tests/test_scale.py::test_merged_feature_statistics_equal_one_pass",
      "merged feature statistics equal one pass (Chan's correction)"),
    # ---- issue 28: multi-node (two torchrun nodes on this machine: both have LOCAL_RANK 0)
    M("rank-from-local-rank", "fae/distributed.py", "    rank = dist.get_rank() if dist.is_initialized() else 0\n",
      '    rank = int(os.environ.get("LOCAL_RANK", "0")) if dist.is_initialized() else 0\n',
      "tests/test_multinode.py::test_two_nodes_killed_and_resumed_train_as_one_process",
      "the trainer's rank is the global RANK, not the node's LOCAL_RANK"),
    M("resume-folders-not-compared", TR, "        self._check_same_checkpoints(ckpts)\n", "",
      "tests/test_multinode.py::test_node_local_run_folders_are_refused_at_resume",
      "processes that see different checkpoints (node-local run folders) stop at resume instead of hanging"),
    # ---- issue 22: STARFlow, MMDiT, the precision verdict, checkpoint manifests, FSDP gradient sync, latent stats
    M("starflow-no-reverse", SF, "return x.flip(1) if self.reverse else x", "return x",
      f"{STT}::test_flow_blocks_alternate_the_token_order_and_the_stack_sees_every_token",
      "the token order is reversed between flow blocks"),
    M("starflow-positions-not-reversed", SF, "order = torch.arange(n).flip(0) if reverse else torch.arange(n)",
      "order = torch.arange(n)", f"{STT}::test_each_flow_block_places_every_token_at_its_own_grid_position",
      "a reversed block puts each token at its own grid position"),
    M("starflow-cond-top-is-first", SF, "(i == last or not", "(i == 0 or not",
      f"{STT}::test_cond_top_only_conditions_the_deep_block_alone",
      "cond_top_only conditions only the deep block (the last, sampled first)"),
    M("starflow-guidance-time-off-by-one", SF, "times = [1.0 - (i + 1) / n for i in range(n)]",
      "times = [1.0 - i / n for i in range(n)]",
      f"{STT}::test_flow_guidance_time_of_token_i_is_one_minus_i_plus_one_over_t",
      "token i of T is guided at t = 1 - (i + 1) / T"),
    M("starflow-sample-shallow-first", SF, "for block in reversed(self.blocks):", "for block in self.blocks:",
      f"{STT}::test_forward_then_inverse_returns_the_input", "the inverse runs the deep block first"),
    M("mmdit-no-image-rope", MM, "qi, ki = rope(qi), rope(ki)", "qi, ki = qi, ki",
      f"{MMT}::test_mmdit_image_tokens_carry_their_grid_positions {MMT}::test_overfits_two_captions",
      "image tokens get 2-D RoPE"),
    M("mmdit-pooled-ignored", MM, "c = self.t_embedder(t) + self.pooled_embedder(pooled.to(dtype))",
      "c = self.t_embedder(t)", f"{MMT}::test_mmdit_pooled_text_conditions_the_output",
      "adaLN is conditioned on embed(t) + embed(pooled text)"),
    M("mmdit-text-stream-frozen", MM, "txt = self.text.output(txt, out[:, :lt], *mod_t)", "txt = txt",
      f"{MMT}::test_mmdit_text_stream_is_updated_by_every_block_but_the_last",
      "the text stream is updated by every block but the last"),
    M("precision-verdict-inverted", PR, "return self.bf16_ms < self.fp32_ms", "return self.bf16_ms > self.fp32_ms",
      f"{PRT}::test_auto_follows_the_timed_matmul", "auto takes bf16 only where the timed bf16 matmul is faster"),
    M("precision-env-overrides-explicit", PR, 'if requested == "auto" and forced:', "if forced:",
      f"{PRT}::test_environment_overrides_auto_only", "FAE_PRECISION overrides auto only"),
    M("precision-timing-multithreaded", PR, "    torch.set_num_threads(1)\n", "    pass\n",
      f"{PRT}::test_the_bf16_verdict_times_its_matmuls_on_one_thread_and_restores_the_threads",
      "the bf16 verdict times its matmuls on one thread"),
    M("manifest-top-level-only", IO, 'for p in sorted(folder.rglob("*"))', 'for p in sorted(folder.glob("*"))',
      f"{IOT}::test_a_checkpoint_manifest_covers_files_in_sub_folders",
      "a checkpoint manifest covers sub-folders (a sharded checkpoint's dcp/)"),
    M("manifest-hash-not-compared", IO, "if file_sha256(folder / name) != expected:", "if False:",
      f"{IOT}::test_a_checkpoint_manifest_covers_files_in_sub_folders "
      "tests/test_faults.py::test_a_damaged_checkpoint_is_passed_over_for_the_previous_one",
      "an altered checkpoint file is found at resume"),
    M("fsdp-sync-every-micro", TR, "sharding.set_gradient_sync(m, last_micro)", "sharding.set_gradient_sync(m, True)",
      f"{SCT}::test_gradient_sync_is_off_on_every_micro_batch_but_the_last",
      "grad accumulation turns FSDP's gradient sync off on all but the last micro-batch"),
    M("fsdp-sync-flag-ignored", "fae/sharding.py", "module.set_requires_gradient_sync(sync)",
      "module.set_requires_gradient_sync(True)",
      f"{SCT}::test_set_gradient_sync_switches_a_sharded_module_and_leaves_others_alone",
      "set_gradient_sync turns a sharded module's gradient sync off and on"),
    M("latent-stats-no-flip", LT, 'keys = ["latents", "latents_flip"] if flip else ["latents"]', 'keys = ["latents"]',
      "tests/test_latents.py::test_statistics_exact_and_byte_identical_on_rerun",
      "latent statistics cover the plain and the flipped latents"),
    M("latent-std-unbiased", LT, "std = np.sqrt(ss / count)", "std = np.sqrt(ss / (count - 1))",
      "tests/test_latents.py::test_statistics_exact_and_byte_identical_on_rerun", "latent std is the population std"),
    M("resume-dropped-not-saved", TR, '"dropped_items": self.dropped_items,', '"dropped_items_": self.dropped_items,',
      "tests/test_faults.py::test_a_resumed_run_counts_the_unreadable_items_of_the_whole_run",
      "run.json counts the unreadable draws of the whole run, resumed or not"),
    # ---- generator families, the pipeline's device, the demo configs' caches
    M("family-bundle-class-twice", "fae/generators/base.py",
      "if other.name != family.name and other.bundle_class == family.bundle_class:", "if False:",
      f"{GF}::test_a_family_name_or_bundle_class_is_taken_once",
      "a bundle class belongs to one family only"),
    M("run-stage-not-read", "fae/stages/generator.py", 'named = data.pop("stage", None)',
      'named = data.pop("stage", None) and None', f"{GF}::test_an_interrupted_toy_run_resumes_to_the_same_weights",
      "an unfinished run loads as the family its config.yaml names"),
    M("stage-exports-to-dit", "fae/stages/generator.py", "out_dir / self.spec.folder", 'out_dir / "dit"',
      f"{GF}::test_fae_train_trains_the_toy_family_and_exports_its_bundle",
      "a family's run keeps its bundle in the family's folder"),
    M("pipeline-forgets-device", "fae/pipeline.py", "batch_size=batch_size, device=self.device,",
      'batch_size=batch_size, device="cpu",',
      "tests/test_sample.py::test_a_generation_pipeline_samples_on_the_device_it_was_loaded_on",
      "a generation pipeline samples on the device it was loaded on"),
    M("feature-cache-path-as-written", "fae/data/features.py",
      'reference["name_or_path"] = str(Path(source).expanduser().resolve())', "pass",
      "tests/test_demo.py::test_documented_commands_work_after_the_demo",
      "the demo's configs, run by hand, reuse the demo's feature cache"),
    # latent spaces as units (fae.tokenizers): the cache, the record, the checks, the diffusers kinds
    M("tokenizer-identity-unchecked", "fae/tokenizers/base.py", "    if identity and tokenizer.identity != identity:",
      "    if False:", "tests/test_tokenizers.py", "a tokenizer of other weights is refused"),
    M("tokenizer-kind-unchecked", "fae/sampling.py", "check_tokenizer(tokenizer, trained_tokenizer_kind(gen),",
      "check_tokenizer(tokenizer, tokenizer.kind,", "tests/test_tokenizers.py",
      "a tokenizer of another kind is refused before its identity is compared"),
    M("tokenizer-cache-unflipped", "fae/encoding.py",
      "outs = batched_halves(latents, [images, *([images.flip(-1)] if with_flip else [])])",
      "outs = batched_halves(latents, [images, *([images] if with_flip else [])])", "tests/test_tokenizers.py",
      "a tokenizer's cache holds the latents of the flipped images"),
    M("tokenizer-reference-unrecorded", "fae/encoding.py", '"reference": tokenizer.reference(),',
      '"reference": None,', "tests/test_tokenizers.py", "sampling reloads the tokenizer the cache recorded"),
    M("sd-vae-unscaled", "fae/tokenizers/baselines.py", "return ((posterior.mean - shift) * scale).float()",
      "return (posterior.mean - shift).float()", "tests/test_tokenizers_baselines.py",
      "SD-VAE latents are in diffusers' scaled space"),
    M("va-vae-up-levels-in-ldm-order", "fae/tokenizers/baselines.py",
      'return f"decoder.up_blocks.{levels - 1 - int(m[1])}.{m[2]}."', 'return f"decoder.up_blocks.{m[1]}.{m[2]}."',
      "tests/test_tokenizers_baselines.py", "the VA-VAE key map reverses LDM's decoder levels"),
    M("kl-vae-no-kl", "fae/stages/kl_vae.py", "loss = rec_term + cfg.kl_weight * kl", "loss = rec_term",
      "tests/test_kl_vae_stage.py", "the KL-VAE stage's loss holds the KL term"),
    # portable bundles: the frozen encoder named by its weights' hash, a small one carried inside the bundle
    M("encoder-hash-unchecked", "fae/encoders/image.py", "        if encoder.weights_sha256 != recorded:",
      "        if False:", "tests/test_portable.py", "a bundle's encoder with other weights than recorded is refused"),
    M("bundled-encoder-cwd-relative", IO, "str((folder / source[len(BUNDLE_PREFIX):]).resolve())",
      "str(Path(source[len(BUNDLE_PREFIX):]).resolve())", "tests/test_portable.py",
      "a bundle finds the encoder it carries from any working directory"),
    # your own data (issue 30): what the model sees, what a cached stage opens, statistics at the training crop
    M("features-only-opens-images", "fae/data/features.py", "        if self.images:\n            base = self.base[index]",
      "        if True:\n            base = self.base[index]",
      "tests/test_data.py::test_features_only_items_open_no_image tests/test_own_data.py",
      "stage 1 on cached features opens no image"),
    M("alpha-dropped", "fae/data/pixels.py", "return Image.alpha_composite(canvas, rgba).convert(\"RGB\"), True",
      "return rgba.convert(\"RGB\"), True", "tests/test_data_loading.py tests/test_own_data.py",
      "transparent pixels take the background colour"),
    M("pad-on-black", "fae/data/pixels.py", "canvas = Image.new(\"RGB\", (image_size, image_size), background)",
      "canvas = Image.new(\"RGB\", (image_size, image_size), (0, 0, 0))", "tests/test_data_loading.py tests/test_own_data.py",
      "pad letterboxes in the background colour"),
    M("stats-ignore-data-overrides", "fae/metrics/datasets.py",
      "block = apply_overrides(block, section_overrides(overrides, \"data\"))", "block = dict(block)",
      "tests/test_own_data.py", "`fae eval stats --data CONFIG data.k=v` measures the data the overrides describe"),
    M("stats-matched-by-folder", "fae/metrics/reference.py", "    return (isinstance(mine, dict) and isinstance(theirs, dict)",
      "    return False and (isinstance(mine, dict) and isinstance(theirs, dict)",
      "tests/test_eval_folder.py::test_statistics_follow_the_encoder_weights_not_its_folder",
      "reference statistics serve the same encoder weights from another folder"),
    # kernels chosen by measurement (issue 26): the faster wins, each product runs where chosen, verdicts are shared
    M("kernel-slower-wins", "fae/kernels.py", "min(ms, key=ms.__getitem__)", "max(ms, key=ms.__getitem__)",
      "tests/test_kernels.py", "the measured-faster kernel is the one used"),
    M("kernel-verdict-not-shared", "fae/kernels.py", "        stored = on_disk.get(f\"{kind} {key}\")",
      "        stored = None", "tests/test_kernels.py::test_the_machines_verdicts_are_shared_between_processes",
      "a second process on the machine reads the first one's verdicts instead of timing"),
    M("grad-weight-transposed", "fae/nn.py", "\"aten\": lambda g, x: g.t() @ x}", "\"aten\": lambda g, x: g.t() @ x.flip(0)}",
      "tests/test_kernels.py", "the ATen weight gradient of a chosen linear is grad.T @ x"),
    M("modulate-grad-scale-dropped", "fae/nn.py",
      "grad_scale = (grad * x).sum(1).to(scale_dtype) if ctx.needs_input_grad[2] else None",
      "grad_scale = grad.sum(1).to(scale_dtype) if ctx.needs_input_grad[2] else None",
      "tests/test_kernels.py", "adaLN's lean backward gives autograd's gradients"),
    M("fused-gelu-timed-against-stock", "fae/nn.py",
      "gelu_tanh_(_forward_product(x, w, b, rows) if dtype == torch.float32 else F.linear(x, w, b))",
      "F.gelu(F.linear(x, w, b), approximate=\"tanh\")",
      "tests/test_kernels.py::test_the_fused_gelu_is_timed_against_faes_own_linear_and_in_place_gelu",
      "the fused linear + GELU is timed against fae's own separate path, not stock PyTorch's"),
    M("in-place-gelu-chunk-skipped", "fae/nn.py", "    for chunk in h.view(-1).split(GELU_CHUNK):",
      "    for chunk in h.view(-1).split(GELU_CHUNK)[:1]:",
      "tests/test_kernels.py::test_the_in_place_gelu_writes_its_input_and_is_the_same_function",
      "the inference GELU covers every chunk of its input, in place"),
    # sample-parallel CPU inference (issue 26): the parts run in the caller's modes, and only where they may
    M("split-without-autocast", "fae/threads.py",
      "    cast = torch.autocast(\"cpu\", dtype=autocast) if autocast is not None else contextlib.nullcontext()",
      "    cast = contextlib.nullcontext()",
      "tests/test_threads.py::test_the_parts_run_in_the_callers_autocast_and_inference_mode",
      "each part runs under the caller's autocast (per thread in PyTorch)"),
    M("split-grads-of-one-part", "fae/threads.py", "functools.reduce(torch.add, present) if present else None",
      "present[0] if present else None",
      "tests/test_threads.py::test_a_split_training_step_gives_the_whole_batchs_loss_and_gradients",
      "a split backward sums the parameters' gradients over every part"),
    M("split-backward-on-the-caller", "fae/threads.py", "        results = _on_workers([functools.partial(part_grads",
      "        results = (lambda jobs, threads: [job() for job in jobs])([functools.partial(part_grads",
      "tests/test_threads.py::test_a_split_training_step_gives_the_whole_batchs_loss_and_gradients",
      "each part's backward runs on its worker, the parts at once"),
    M("split-measure-accumulates", "fae/threads.py",
      "    torch.autograd.grad(call().sum(), list(inputs), allow_unused=True)", "    call().sum().backward()",
      "tests/test_threads.py::test_the_split_is_measured_on_the_wall_clock_once_per_machine",
      "timing a split with its backward leaves no gradient in .grad"),
    M("split-graph-not-kept", "fae/threads.py", "        keep = _keeps_graph()", "        keep = False",
      "tests/test_threads.py::test_a_split_keeps_its_graph_where_backward_retains_it",
      "backward(retain_graph=True) through a split keeps the parts' graphs for a second pass"),
    M("split-memory-unguarded", "fae/threads.py", "> _free_memory() // 4:", "> _free_memory():",
      "tests/test_threads.py::test_a_training_split_that_would_crowd_memory_stays_whole",
      "a training split whose parts' gradient copies would take over a quarter of free memory stays whole"),
    M("split-despite-hooks", "fae/threads.py", " and not _hooked(module)", "",
      "tests/test_threads.py::test_hooks_and_one_thread_keep_the_call_whole",
      "a module hook under the model keeps the call whole (it would see a part, on a worker)"),
    M("split-thread-count-left", "fae/threads.py", "        torch.set_num_threads(threads)\n", "        pass\n",
      "tests/test_threads.py::test_the_callers_thread_count_and_the_default_of_new_threads_are_kept",
      "threads started after a split begin with the caller's thread count, not the workers' one"),
    M("split-under-a-mode", "fae/threads.py", "_get_current_dispatch_mode() is None", "True",
      "tests/test_threads.py::test_a_mode_in_force_keeps_the_call_whole",
      "a dispatch mode (FlopCounterMode) in force keeps the call on this thread"),
    # `fae plan` (issue 28): the memory arithmetic and the layout that keeps the global batch
    M("plan-no-ddp-buckets", "fae/planning.py", "buckets = 4 * self.trainable if gpus > 1 else 0", "buckets = 0",
      "tests/test_plan.py", "DDP on several GPUs holds its gradient buckets"),
    M("plan-fsdp-unsharded", "fae/planning.py", "return state / gpus + 4 * self.frozen", "return state + 4 * self.frozen",
      "tests/test_plan.py", "FSDP2 holds 1/N of the training state"),
    M("plan-no-recompute", "fae/planning.py", "return self.checkpointed_per_sample + recompute",
      "return self.checkpointed_per_sample", "tests/test_plan.py",
      "checkpointing's backward recomputes one block's activations"),
    M("plan-micro-not-divisor", "fae/planning.py", "min(share, fits) + 1) if share % d == 0)",
      "min(share, fits) + 1))", "tests/test_plan.py",
      "micro-batch x grad_accum x GPUs is the config's global batch"),
    M("plan-no-loss-network", "fae/planning.py",
      "activation, checkpointed = activation + loss_network, checkpointed + loss_network",
      "activation, checkpointed = activation, checkpointed", "tests/test_plan.py",
      "the pixel decoder's step keeps the ConvNeXt loss network's activations"),
    # `fae eval t2i` (issue 28 item 8): the CLIP score's definition, SigLIP's unmasked text, FID against the reference
    M("clip-score-unclamped", "fae/metrics/clip_score.py",
      "return 100.0 * np.clip(self.cosines(images, captions, batch_size, progress), 0.0, None)",
      "return 100.0 * self.cosines(images, captions, batch_size, progress)",
      "tests/test_eval_t2i.py::test_t2i_writes_fid_and_clip_score_as_transformers_computes_it",
      "the CLIP score is 100 * max(cos, 0), averaged"),
    M("siglip-text-masked", "fae/metrics/clip_score.py", 'if not siglip and "attention_mask" in batch:',
      'if "attention_mask" in batch:', "tests/test_eval_t2i.py::test_a_siglip_model_scores_through_the_same_path",
      "SigLIP text is embedded at full length without a mask, as trained"),
    M("t2i-fid-against-itself", "fae/evaluation.py", 'fd: frechet_distance(compute_stats(fs["pool"]), ref.stats["pool"]),',
      'fd: frechet_distance(compute_stats(fs["pool"]), compute_stats(fs["pool"])),',
      "tests/test_eval_t2i.py::test_samples_equal_to_their_references_give_zero_fid",
      "`fae eval t2i` measures the samples against the caption set's images"),
    # ---- init_from (issue 28, item 4; docs/training.md)
    M("init-from-on-resume", TR, "if start is not None and not checkpoint_dirs(self.out_dir):",
      "if start is not None:", "tests/test_init_from.py::test_init_from_run_records_the_source_and_resumes_exactly_without_it",
      "a resumed init_from run resumes its own checkpoint and never reads the source again"),
    M("init-from-record-not-resumed", TR, 'self.init_record = state.get("init_from")', "pass",
      "tests/test_init_from.py::test_init_from_run_records_the_source_and_resumes_exactly_without_it",
      "run.json of a resumed init_from run still records the source"),
    M("init-from-rule-never-fires", "fae/init_from.py",
      "if r is not None and (r.always or differs(k))}", "if r is not None and r.always}",
      "tests/test_init_from.py::test_another_class_count_reinitialises_the_class_table",
      "another class count re-initialises the class table instead of refusing the source"),
    M("init-from-latent-shape-unchecked", "fae/stages/generator.py", "        if their_shape != my_shape:", "        if False:",
      "tests/test_init_from.py::test_another_latent_shape_or_width_is_refused",
      "a generator refuses a source of another latent shape, also where RoPE would load it silently"),
    # ---- samplers and autoguidance (issue 28)
    M("dopri5-no-step-ladder", "fae/solvers.py", "    return torch.exp2(torch.floor(4 * torch.log2(h)) / 4)",
      "    return h", "tests/test_samplers.py::test_a_sample_does_not_depend_on_its_batch",
      "dopri5: a sample takes the same steps in any batch"),
    M("dpmpp-first-order-only", TS, "        data = x0 + (x0 - previous[0]) / (2 * r)", "        data = x0",
      "tests/test_samplers.py::test_dpmpp_2m_first_step_is_euler_and_it_converges_faster_than_euler",
      "DPM-Solver++(2M) is second order"),
    M("dpmpp-history-across-guidance-edge", TS, "                previous = None   # the velocity jumped at a guidance edge",
      "                pass   # the velocity jumped at a guidance edge",
      "tests/test_samplers.py::test_dpmpp_2m_keeps_its_order_across_a_guidance_edge",
      "DPM-Solver++ restarts its history where the guidance scale jumps"),
    M("autoguide-unconditional-guide", TS, "return self.model(x, tt, y), self.guide(x, tt, y)",
      "return self.model(x, tt, y), self.guide(x, tt, None)",
      "tests/test_samplers.py::test_autoguidance_respects_the_interval_and_gives_the_guide_the_same_condition",
      "autoguidance is conditional against conditional"),
]


# ---------------------------------------------------------------------------------------------------------------
def check(mutations: list[Mutation], root: Path = ROOT) -> list[str]:
    """Problems that make a mutation meaningless: its text not found exactly once, a missing test file, a no-op."""
    problems = []
    seen = set()
    for m in mutations:
        if m.id in seen:
            problems.append(f"{m.id}: duplicate id")
        seen.add(m.id)
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.id}: {m.file} does not exist")
            continue
        count = path.read_text().count(m.old)
        if count != 1:
            problems.append(f"{m.id}: the text to mutate occurs {count} times in {m.file} (must be once): {m.old!r}")
        if m.old == m.new:
            problems.append(f"{m.id}: old and new text are the same")
        for t in m.tests:
            if not (root / t.split("::")[0]).is_file():
                problems.append(f"{m.id}: test file {t.split('::')[0]} does not exist")
    return problems


def copy_repo(dest: Path) -> Path:
    """Tracked and untracked-but-not-ignored files (what the suite sees), symlinks kept."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src, dst = ROOT / name, dest / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the work tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    return dest


def run_tests(repo: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """('pass' | 'fail' | 'timeout' | 'error', seconds, last output line)."""
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0, f"over {timeout:.0f} s"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    last = (failed or [line for line in lines if " passed" in line or " failed" in line] or lines or [""])[-1]
    last = last[:200] if last else proc.stderr.strip()[-200:]
    status = {0: "pass", 1: "fail"}.get(proc.returncode, "error")
    if proc.returncode in (2, 3, 4):  # interrupted / internal / usage: e.g. the mutant does not import
        status = "fail"
    return status, time.time() - t0, last


def _verdict(result: dict) -> str:
    if not result["killed"]:
        return "**survived**"
    if result["status"] == "timeout":
        return "killed (timeout)"
    test = result["last"].removeprefix("FAILED ").removeprefix("ERROR ").split(" - ")[0]
    return f"killed: `{test.split('::', 1)[-1]}`" if "::" in test else "killed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="mutation ids to run")
    parser.add_argument("--check", action="store_true", help="only check that every mutation applies")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mutation (a timeout counts as killed)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the named tests")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "mutation")
    args = parser.parse_args()

    chosen = [m for m in MUTATIONS if not args.only or m.id in args.only]
    if args.only and len(chosen) != len(args.only):
        sys.exit(f"unknown mutation ids: {sorted(set(args.only) - {m.id for m in MUTATIONS})}")
    problems = check(chosen)
    if problems or args.check:
        print("\n".join(problems) or f"all {len(chosen)} mutations apply")
        return 1 if problems else 0

    results = []
    with tempfile.TemporaryDirectory(prefix="fae-mutation-") as tmp:
        repo = copy_repo(Path(tmp) / "repo")
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            status, secs, last = run_tests(repo, tests, args.timeout * 4)
            print(f"baseline ({len(tests)} targets): {status} in {secs:.0f} s: {last}", flush=True)
            if status != "pass":
                sys.exit("the unmutated tests do not pass; fix them before reading a mutation score")
        for m in chosen:
            path = repo / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new, 1))
            try:
                status, secs, last = run_tests(repo, m.tests, args.timeout)
            finally:
                path.write_text(original)
            killed = status in ("fail", "timeout")
            results.append({**asdict(m), "status": status, "killed": killed, "seconds": round(secs, 1), "last": last})
            print(f"{'killed ' if killed else 'SURVIVED'} {m.id:32s} {status:8s} {secs:5.0f} s  {last}", flush=True)

    killed = sum(r["killed"] for r in results)
    score = killed / len(results)
    survivors = [r["id"] for r in results if not r["killed"]]
    print(f"mutation score {killed}/{len(results)} = {score:.1%}; survivors: {', '.join(survivors) or 'none'}")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"score": score, "killed": killed, "total": len(results), "survivors": survivors, "results": results}
    (args.out / "result.json").write_text(json.dumps(summary, indent=2))
    rows = ["| mutation | file | claim | result (first failing test) |", "|---|---|---|---|"]
    rows += [f"| `{r['id']}` | {r['file']} | {r['claim']} | {_verdict(r)} |" for r in results]
    (args.out / "result.md").write_text(f"Mutation score {killed}/{len(results)} = {score:.1%}\n\n" + "\n".join(rows) + "\n")
    print(f"written: {args.out / 'result.json'}, {args.out / 'result.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
