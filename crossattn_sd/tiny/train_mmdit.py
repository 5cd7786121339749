"""Train the embedded joint-attention model (a toy Stable Diffusion 3) on the shapes world (CPU).

`crossattn-sd train-tiny --model mmdit ...`. The shipped VAE is reused as it is (not retrained); a fixed pool of
scenes is encoded to its posterior means (as for the UNet model, `train.Pool`), and the SD3 transformer and its two
CLIP text encoders train jointly with rectified flow as SD3 trains it: x_s = (1 - s) x_0 + s noise, the
transformer predicts noise - x_0 at timestep 1000 s, s drawn logit-normal and shifted by the scheduler's `shift`,
plain MSE. The prompt embeddings are computed by `StableDiffusion3Pipeline.encode_prompt` itself (with gradients),
with the `max_sequence_length` the model is used with, so training sees exactly what sampling feeds the model.
Caption dropout (to ""), and the UNet trainer's context and prefix dropout (`train.dropout_cuts`): the text states
from a cut on are replaced by the empty prompt's, and so is the pooled embedding of any cut caption (it is read
from the end-of-text token, which sees the whole caption). AdamW with warm-up and cosine decay to 10%, EMA weights,
checkpoints and an exported pipeline (EMA weights) every --checkpoint-minutes, exact --resume. Images alone: no
grounding loss.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 MALLOC_TOP_PAD_=1073741824 OMP_NUM_THREADS=1 \\
    OMP_WAIT_POLICY=PASSIVE crossattn-sd train-tiny --model mmdit --out runs/tiny-mmdit --threads 1
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn.functional as F

from ..cli import HelpFormatter
from . import build, build_mmdit
from .train import Pool, bad_value, dropout_cuts, ema_update, lr_lambda, run_folder, save_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crossattn-sd train-tiny --model mmdit", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--model", choices=["mmdit"], default="mmdit",
                   help="the model to train (`train-tiny --model unet --help` for the UNet model)")
    p.add_argument("--out", required=True, help="run folder (checkpoint.pt, pipeline export)")
    p.add_argument("--arch", choices=sorted(build_mmdit.ARCHITECTURES), default="4x128",
                   help="transformer size: layers x joint width (see build_mmdit.ARCHITECTURES)")
    p.add_argument("--steps", type=int, default=4000,
                   help="total transformer steps; also the length of the cosine LR schedule")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--vae", default=str(build_mmdit.WEIGHTS_DIR / "vae"),
                   help="the (trained) VAE folder whose latents the model learns; default: the shipped one")
    p.add_argument("--seed", type=int, default=0, help="seed for data, init and noise")
    p.add_argument("--batch-size", type=int, default=32, help="batch size")
    p.add_argument("--lr", type=float, default=8e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=150, help="linear LR warm-up steps")
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay (ramped up from ~0.9 over the first steps)")
    p.add_argument("--p-two", type=float, default=0.7, help="probability of a two-object scene")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="fraction of captions replaced by \"\"")
    p.add_argument("--context-dropout", type=float, default=0.5,
                   help="fraction of captions whose end-of-text and padding states (and pooled embedding) are "
                        "replaced by the empty prompt's, so the transformer reads the words")
    p.add_argument("--prefix-dropout", type=float, default=0.2,
                   help="fraction of captions cut after a random word (later states and the pooled embedding "
                        "replaced by the empty prompt's), so each word's own state is read")
    p.add_argument("--logit-mean", type=float, default=0.0, help="mean of the logit-normal timestep density")
    p.add_argument("--logit-std", type=float, default=1.0, help="std of the logit-normal timestep density")
    p.add_argument("--pool-size", type=int, default=16000,
                   help="number of pre-encoded training scenes (small values for smoke tests)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0,
                   help="wall-clock minutes between checkpoints and pipeline exports")
    p.add_argument("--export", default=None, help="where to write the pipeline folder (default OUT/pipeline)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps in this invocation; for testing resume")
    p.add_argument("--log-every", type=int, default=50, help="print a plain log line every N steps")
    return p


def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching time shift FlowMatchEulerDiscreteScheduler applies to its sigmas."""
    return shift * u / (1 + (shift - 1) * u)


def sample_sigmas(gen: torch.Generator, n: int, shift: float, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """SD3's logit-normal timestep density (Esser et al. 2024), then the scheduler's shift."""
    u = torch.sigmoid(mean + std * torch.randn(n, generator=gen))
    return shifted(u, shift)


def encode(pipe, texts: list[str], ids: torch.Tensor | None = None, cut: torch.Tensor | None = None):
    """(prompt_embeds, pooled) for `texts` exactly as `pipe(prompt=texts, max_sequence_length=
    build_mmdit.MAX_SEQUENCE_LENGTH)` computes them, with gradients; with `cut` (from `dropout_cuts` over `ids`,
    the texts' token ids) each caption's states from its cut on, and the pooled embedding of every cut caption,
    are the empty prompt's."""
    if cut is None:
        embeds, _, pooled, _ = pipe.encode_prompt(texts, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=build_mmdit.MAX_SEQUENCE_LENGTH)
        return embeds, pooled
    embeds, _, pooled, _ = pipe.encode_prompt(texts + [""], None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=build_mmdit.MAX_SEQUENCE_LENGTH)
    embeds, empty, pooled, empty_pooled = embeds[:-1], embeds[-1:], pooled[:-1], pooled[-1:]
    length = ids.shape[1]  # the CLIP positions (the T5 part, if any, is zeros either way)
    position = torch.arange(embeds.shape[1])[None, :]
    replaced = (position >= cut[:, None]) & (position < length)
    embeds = torch.where(replaced[..., None], empty, embeds)
    pooled = torch.where((cut < length)[:, None], empty_pooled, pooled)
    return embeds, pooled


def flow_loss(transformer, embeds, pooled, latents, sigmas, noise) -> torch.Tensor:
    """Rectified-flow loss: the transformer's output at x_s = (1 - s) x_0 + s noise against noise - x_0."""
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    pred = transformer(noisy, encoder_hidden_states=embeds, pooled_projections=pooled,
                       timestep=sigmas * 1000).sample
    return F.mse_loss(pred, noise - latents)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    error = bad_value(args, dict(context_dropout=1.0, prefix_dropout=1.0, caption_dropout=1.0))
    if error is not None:
        print(error, file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        _, export_dir, ckpt_path, ckpt = run_folder(args, ("seed", "pool_size", "p_two", "arch"))
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    tokenizer = build.build_tokenizer()
    vae = build_mmdit.load_vae(args.vae).eval().requires_grad_(False)
    text_encoder = build_mmdit.build_text_encoder(len(tokenizer), layers=3)
    text_encoder_2 = build_mmdit.build_text_encoder(len(tokenizer), layers=1)
    transformer = build_mmdit.build_transformer(args.arch)
    models = dict(transformer=transformer, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    print(f"params: transformer {build.n_params(transformer):,} text encoders {build.n_params(text_encoder):,} + "
          f"{build.n_params(text_encoder_2):,} (vae {build.n_params(vae):,}, not trained)", flush=True)

    t0 = time.time()
    pool = Pool(vae, tokenizer, args.seed, args.pool_size, args.p_two)
    scaling, shift_factor = vae.config.scaling_factor, vae.config.shift_factor
    print(f"pool: {len(pool)} scenes encoded in {time.time() - t0:.0f} s; scaling_factor {scaling:.4f}", flush=True)

    pipe = build_mmdit.make_pipeline(vae, text_encoder, text_encoder_2, transformer, tokenizer)
    shift = pipe.scheduler.config.shift
    params = [p for m in models.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup, args.steps))
    ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in models.items()}
    gen = torch.Generator().manual_seed(args.seed + 1000)
    step = 0
    if ckpt is not None:
        for k, m in models.items():
            m.load_state_dict(ckpt[k])
            ema[k].load_state_dict(ckpt["ema_" + k])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["lr_scheduler"])
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        step = ckpt["step"]
        print(f"resumed at step {step}", flush=True)

    def checkpoint(reason: str) -> None:
        t = time.time()
        state = dict(args=vars(args), step=step, optimizer=opt.state_dict(), lr_scheduler=sched.state_dict(),
                     generator=gen.get_state(), torch_rng=torch.get_rng_state(),
                     **{k: m.state_dict() for k, m in models.items()},
                     **{"ema_" + k: m.state_dict() for k, m in ema.items()})
        save_checkpoint(ckpt_path, state)
        build_mmdit.save_pipeline(export_dir, vae, ema["text_encoder"], ema["text_encoder_2"], ema["transformer"])
        print(f"checkpoint ({reason}) at step {step}: {ckpt_path}, pipeline {export_dir} "
              f"({time.time() - t:.1f} s)", flush=True)

    for m in models.values():
        m.train()
    stop = args.steps if args.stop_after is None else min(args.steps, step + args.stop_after)
    smooth, tick, last_save = None, time.time(), time.time()
    eos = text_encoder.config.eos_token_id
    while step < stop:
        idx, order, dropped = pool.draw(gen, args.batch_size, args.caption_dropout)
        texts = pool.captions(idx, order, dropped)
        ids = pool.ids[idx, order].clone()
        ids[dropped] = pool.empty
        latents = (pool.latents[idx] - shift_factor) * scaling
        cut = dropout_cuts(ids, eos, args.context_dropout, gen, args.prefix_dropout)
        sigmas = sample_sigmas(gen, len(ids), shift, args.logit_mean, args.logit_std)
        noise = torch.randn(latents.shape, generator=gen)
        embeds, pooled = encode(pipe, texts, ids, cut)
        loss = flow_loss(transformer, embeds, pooled, latents, sigmas, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        for k, m in models.items():
            ema_update(ema[k], m, decay)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % args.log_every == 0 or step == stop:
            now = time.time()
            print(f"step {step}/{args.steps} loss {loss.item():.4f} smooth {smooth:.4f} "
                  f"lr {sched.get_last_lr()[0]:.2e} {(now - tick) / args.log_every:.2f} s/step", flush=True)
            tick = now
        if time.time() - last_save >= args.checkpoint_minutes * 60:
            checkpoint("timer")
            last_save = time.time()
    checkpoint("done" if step >= args.steps else "stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
