"""The embedded model's components, with Stable Diffusion's structure at toy size.

- tokenizer: a CLIPTokenizer whose closed vocabulary makes every caption word one token,
  so a word's attention map is one token's map;
- text encoder: a small CLIPTextModel (causal, as in Stable Diffusion: each token sees only
  the words before it), 4 layers of width 128, so the pipeline is a plain
  StableDiffusionPipeline that loads and behaves like a real checkpoint;
- UNet: UNet2DConditionModel on 16 x 16 x 4 latents with cross-attention at 16 x 16, 8 x 8
  and (mid block) 4 x 4;
- VAE: AutoencoderKL with a down factor of 4 (64 x 64 RGB <-> 16 x 16 x 4);
- schedulers: DDPM (scaled-linear betas, v-prediction) for training and a DPM-Solver++
  config with the same betas for 20-step sampling.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .world import COLOURS, POSITIONS, SHAPES

MAX_LENGTH = 20  # longest caption: 13 words + BOS + EOS = 15
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CAPTION_WORDS = ("a", "on", "the", "and") + tuple(COLOURS) + SHAPES + POSITIONS
# A few extra words a user may plausibly type, so they get a token of their own rather than
# being spelled out letter by letter (the model never saw them; their embeddings stay random).
EXTRA_WORDS = ("an", "of", "with", "in", "at", "image", "photo", "picture", "shape", "object")
LETTERS = "abcdefghijklmnopqrstuvwxyz"

# Zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"): with
# SD's schedule the last timestep keeps 7% of the latent, and on 16 x 16 flat-colour latents that leak shows
# where the objects are. A model trained on it took the layout from the noise instead of from "left"/"top"
# (measured: a 5.9k-step run drew top/bottom captions side by side and put "on the left" objects anywhere,
# while colours and shapes were right). Rescaled betas leave nothing at t = T, so only the text can decide.
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                beta_end=0.012, prediction_type="v_prediction", rescale_betas_zero_snr=True)


def tokenizer_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and BPE merges in which every word of CAPTION_WORDS + EXTRA_WORDS is one
    ``word</w>`` token, and any other lowercase word falls back to single letters.

    Each word is built by a left-to-right chain of merges (w[:1] + w[1], w[:2] + w[2], ...).
    BPE always applies the lowest-ranked applicable merge, so a short word's merge could fire
    inside a longer word ("to" of "top" inside "bottom"); ranking longer words' chains first
    makes each word's own chain win. ``build_tokenizer`` checks the result.
    """
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for ch in LETTERS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    words = sorted(set(CAPTION_WORDS + EXTRA_WORDS), key=lambda w: (-len(w), w))
    for word in words:
        for k in range(1, len(word)):
            left = word[:k]
            right = word[k] + ("</w>" if k == len(word) - 1 else "")
            merged = left + right
            if (left, right) not in merges:
                merges.append((left, right))
            vocab.setdefault(merged, len(vocab))
    return vocab, merges


def build_tokenizer() -> CLIPTokenizer:
    # CLIPTokenizer (a tokenizers-backed class in transformers 5) takes the vocabulary and
    # merges directly; unknown characters become the unk token (EOS, as in CLIP).
    vocab, merges = tokenizer_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok) -> None:
    """Every caption word must be exactly one token, else per-word maps would be split."""
    for word in CAPTION_WORDS + EXTRA_WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1 or tok.convert_ids_to_tokens(ids)[0] != word + "</w>":
            raise AssertionError(f"{word!r} tokenizes to {tok.convert_ids_to_tokens(ids)}")
    if tok.model_max_length != MAX_LENGTH:
        raise AssertionError(f"model_max_length {tok.model_max_length} != {MAX_LENGTH}")


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    vocab, _ = tokenizer_vocab()
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                            num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=128,
                            bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    return CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    # Sized for ~1.5 s per training step at batch 64 on one CPU thread: convolutions and
    # self-attention at 16 x 16 dominate, so the first level is narrow (32 channels) and its
    # attention uses 2 heads (head size 16; 8-dim heads made CPU attention 2x slower).
    # ``attention_head_dim`` is diffusers' legacy name for the number of heads per block.
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, cross_attention_dim=128, attention_head_dim=(2, 4, 4), norm_num_groups=16,
    )


def build_film_unet() -> UNet2DConditionModel:
    """The FiLM model's UNet (`tiny-film`): the embedded UNet's levels, widths and depth with no attention at all.

    The text reaches it only through Diffusers' `addition_embed_type="text"`: `TextTimeEmbedding` pools the text
    states into one vector (LayerNorm, then `AttentionPooling`: one query, the tokens' mean plus a learned vector,
    attends over the tokens), projects it to the time-embedding width and adds it to the time embedding. With
    `resnet_time_scale_shift="scale_shift"` every ResNet block applies that embedding to its normalised features as
    `h * (1 + scale) + shift`, one (scale, shift) pair per channel: feature-wise linear modulation (FiLM, Perez et
    al. 2018). No pixel reads a token of its own, so the model has no word maps. The mid block is one ResNet (no
    attention). `addition_embed_type_num_heads` 4 gives the pooling 32-dim heads (Diffusers' default, 64, would
    split width 128 into 2-dim heads). StableDiffusionPipeline calls it unchanged (`unet(latents, t,
    encoder_hidden_states=...)`)."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
        mid_block_type="UNetMidBlock2D",
        layers_per_block=1, cross_attention_dim=128, norm_num_groups=16,
        addition_embed_type="text", addition_embed_type_num_heads=4, resnet_time_scale_shift="scale_shift",
    )


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=16,
    )


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE)


def sample_scheduler() -> DPMSolverMultistepScheduler:
    # "trailing" spacing starts sampling at t = T, the pure-noise step a zero-terminal-SNR model is trained
    # for. steps_offset=1 only silences StableDiffusionPipeline's legacy-config warning.
    return DPMSolverMultistepScheduler(**SCHEDULE, timestep_spacing="trailing", steps_offset=1)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_pipeline(folder: str | Path, vae, text_encoder, tokenizer, unet, fp16: bool = False) -> Path:
    """Write a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads offline.

    Written into a temporary sibling folder and renamed into place, so readers never see a
    half-written model. With ``fp16`` the safetensors tensors are halved *after* saving:
    saving a half-precision model writes ``dtype: float16`` into the text encoder's config,
    which then makes default (float32) loads come back in float16.
    """
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=sample_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return save_atomically(pipe, folder, fp16=fp16)


def save_atomically(pipe, folder: str | Path, fp16: bool = False) -> Path:
    """`pipe.save_pretrained(folder)` through a temporary sibling folder renamed into place (see
    `save_pipeline`); with `fp16` the safetensors are halved after saving."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if fp16:
        halve_safetensors(tmp)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def halve_safetensors(folder: Path) -> None:
    from safetensors.torch import load_file, save_file
    for path in Path(folder).rglob("*.safetensors"):
        tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})


def folder_size(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def ship_weights(src: str | Path, dst: str | Path | None = None, limit_mb: float = 30.0,
                 share: str | Path | None = None) -> Path:
    """Copy a trained pipeline folder (e.g. runs/tiny/pipeline) into the package as the embedded model:
    safetensors halved to fp16 (they load back as float32), at most `limit_mb` MB in all.

    With `share` (another shipped pipeline folder, e.g. crossattn_sd/tiny/weights), each component subfolder whose
    files are byte for byte that folder's (after halving) is left out; the model's preset then names the folder in
    `components_from`, and `load_pipeline` loads those components from it."""
    from ..config import EMBEDDED_MODEL_DIR

    src, dst = Path(src), Path(dst or EMBEDDED_MODEL_DIR)
    if not (src / "model_index.json").is_file():
        raise FileNotFoundError(f"{src} is not a pipeline folder (no model_index.json); train one with "
                                "`crossattn-sd train-tiny --out runs/tiny`")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    halve_safetensors(tmp)
    shared = [sub.name for sub in sorted(tmp.iterdir()) if share is not None and same_files(sub, Path(share) / sub.name)]
    for name in shared:
        shutil.rmtree(tmp / name)
    size = folder_size(tmp) / 2**20
    if size > limit_mb:
        shutil.rmtree(tmp)
        raise ValueError(f"{src} takes {size:.1f} MB in fp16; the embedded model must stay under {limit_mb:g} MB")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    if shared:
        print(f"shared with {share} (left out): {', '.join(shared)}")
    return dst


def same_files(a: Path, b: Path) -> bool:
    """Whether folders `a` and `b` hold the same files with the same bytes."""
    if not (a.is_dir() and b.is_dir()):
        return False
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return (files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
            and all((a / f).read_bytes() == (b / f).read_bytes() for f in files))


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m crossattn_sd.tiny.build", description=ship_weights.__doc__)
    p.add_argument("src", help="a trained pipeline folder, e.g. runs/tiny/pipeline")
    p.add_argument("dst", nargs="?", default=None, help="the package folder to write (default: the embedded model's, "
                   "crossattn_sd/tiny/weights)")
    p.add_argument("--share", default=None, metavar="FOLDER",
                   help="leave out the components identical to this shipped folder's (see components_from)")
    args = p.parse_args(argv)
    print(f"shipped {args.src} -> {ship_weights(args.src, args.dst, share=args.share)}")


if __name__ == "__main__":  # python -m crossattn_sd.tiny.build runs/tiny/pipeline [crossattn_sd/tiny/weights-mmdit]
    main()
