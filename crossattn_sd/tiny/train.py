"""Train the embedded tiny text-to-image model on the shapes world (CPU).

Stage 1 trains the VAE (64 x 64 RGB <-> 16 x 16 x 4) on freshly rendered scenes. Stage 2
encodes a fixed pool of scenes to posterior *means* (the posterior of this small VAE stays
wide, and sampling it would make half of every UNet target VAE noise) and trains the UNet and
the text encoder jointly: v-prediction on a zero-terminal-SNR schedule, v-loss with min-SNR-5
style down-weighting of low-noise steps, AdamW with warm-up and a
cosine decay to 10% over --steps, EMA weights, 10% of captions dropped to "" (what the
pipeline encodes as the unconditional prompt). Held-out scene types are never trained on.
Optionally (--grounding W) a token-grounding loss pulls each colour, shape and position word's
cross-attention map onto its object's mask, which the synthetic world knows exactly, and
(--concept-grounding W) a concept-grounding loss does the same for each shape's name encoded alone ("a
triangle", as `concepts.py` encodes a concept), attending on the side as the app's concept maps do.

Every --checkpoint-minutes the full state goes to OUT/checkpoint.pt (atomically) and the EMA
weights are exported as a diffusers StableDiffusionPipeline folder (atomically), so the
latest model is usable at any time. --resume continues exactly where the checkpoint left
off; the pool is regenerated from the seed rather than stored. --init-from starts a new run
(fresh optimiser and schedule) from a pipeline folder's weights, e.g. the shipped model, to
fine-tune it when no checkpoint is at hand.

On the 2-core VM run it with glibc malloc tuned, or steps are ~20x slower:

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 MALLOC_TOP_PAD_=1073741824 \\
    OMP_WAIT_POLICY=PASSIVE python -m crossattn_sd.tiny.train --out runs/tiny --threads 1
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..cli import HelpFormatter
from ..maps import layer_hw, text_attention
from ..processors import CaptureProcessor, install
from . import WEIGHTS_DIR, build
from .judge import palette_labels
from .world import SHAPES, Scene, caption, describe, render, sample_scene
from .world import object_mask as world_object_mask

CHECKPOINT = "checkpoint.pt"
FILM_VAE = WEIGHTS_DIR / "vae"  # --model film learns the shipped VAE's latents (as tiny-mmdit does)
MAX_OBJECTS = 2  # a scene holds one object or two
MODELS = ("unet", "film", "mmdit")  # train-tiny --model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crossattn-sd train-tiny", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--model", choices=MODELS, default="unet",
                   help="unet: the embedded StableDiffusionPipeline (these flags); film: the same pipeline with a "
                        "UNet that has no attention, conditioned by FiLM on the pooled text (build.build_film_unet; "
                        "these flags; the shipped VAE unless --vae); mmdit: the joint-attention "
                        "StableDiffusion3Pipeline (train_mmdit.py; `--model mmdit --help` lists its flags)")
    p.add_argument("--out", required=True, help="run folder (checkpoint.pt, pipeline export)")
    p.add_argument("--steps", type=int, default=4000,
                   help="total UNet steps; also the length of the cosine LR schedule")
    p.add_argument("--vae-steps", type=int, default=1000, help="VAE training steps (stage 1)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--init-from", default=None, metavar="FOLDER",
                   help="start from this pipeline folder's VAE, text encoder and UNet (an export of this trainer or "
                        "crossattn_sd/tiny/weights) with a fresh optimiser and schedule; skips the VAE stage")
    p.add_argument("--vae", default=None, metavar="FOLDER",
                   help="use this trained VAE folder (with its scaling factor) as it is and skip the VAE stage; "
                        f"--model film defaults to the shipped one ({FILM_VAE})")
    p.add_argument("--seed", type=int, default=0, help="seed for data, init and noise")
    p.add_argument("--batch-size", type=int, default=64, help="UNet batch size")
    p.add_argument("--vae-batch-size", type=int, default=8, help="VAE batch size")
    p.add_argument("--lr", type=float, default=5e-4, help="peak UNet/text-encoder learning rate")
    p.add_argument("--vae-lr", type=float, default=2e-3, help="VAE learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear LR warm-up steps")
    p.add_argument("--ema", type=float, default=0.999,
                   help="EMA decay (ramped up from ~0.9 over the first steps)")
    p.add_argument("--p-two", type=float, default=0.7, help="probability of a two-object scene")
    p.add_argument("--context-dropout", type=float, default=0.5,
                   help="fraction of captions whose end-of-text and padding states are replaced by the empty "
                        "prompt's, so the UNet reads the words (see encode_text)")
    p.add_argument("--prefix-dropout", type=float, default=0.0,
                   help="fraction of captions cut after a random word (later states replaced by the empty "
                        "prompt's), so each word's own state is read (see encode_text)")
    p.add_argument("--grounding", type=float, default=0.0,
                   help="weight of the token-grounding loss: each colour, shape and position word's cross-attention "
                        "map should spread over its object's mask (see grounding_loss); 0 leaves it out")
    p.add_argument("--concept-grounding", type=float, default=0.0,
                   help="weight of the concept-grounding loss: each shape's name encoded alone (\"a triangle\", "
                        "the app's concept template) should spread its side attention (the 'joint' concept map) "
                        "over the objects of that shape (see concept_grounding); 0 leaves it out")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="fraction of captions replaced by the empty prompt")
    p.add_argument("--pool-size", type=int, default=50000,
                   help="number of pre-encoded training scenes (small values for smoke tests)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0,
                   help="wall-clock minutes between checkpoints and pipeline exports")
    p.add_argument("--export", default=None,
                   help="where to write the diffusers pipeline folder (default OUT/pipeline)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this many UNet steps in this invocation; "
                        "for testing exact resume")
    p.add_argument("--log-every", type=int, default=50, help="print a plain log line every N steps")
    return p


# ----------------------------------------------------------------------------- data

def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def render_batch(rng: np.random.Generator, n: int, p_two: float) -> tuple[list[Scene], np.ndarray]:
    scenes = [sample_scene(rng, p_two=p_two) for _ in range(n)]
    return scenes, np.stack([render(s) for s in scenes])


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    # Exactly as StableDiffusionPipeline encodes prompts (padded to model_max_length, no
    # attention mask), so training and sampling see the same token sequences.
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


class Pool:
    """Pre-encoded training scenes: VAE posterior means and both caption orders' captions and token ids.

    Regenerated deterministically from (seed, size) so checkpoints need not store it."""

    def __init__(self, vae, tokenizer, seed: int, size: int, p_two: float, chunk: int = 256):
        rng = np.random.default_rng([seed, 1])
        latents, fwd, rev, masks, owners, texts, shapes = [], [], [], [], [], [], []
        with torch.no_grad():
            for start in tqdm(range(0, size, chunk), desc="encoding pool", mininterval=10,
                              file=sys.stdout):
                scenes, images = render_batch(rng, min(chunk, size - start), p_two)
                latents.append(vae.encode(to_tensor(images)).latent_dist.mean)
                orders = [[tuple(range(len(s.objects))), tuple(reversed(range(len(s.objects))))] for s in scenes]
                texts += [(caption(s, o[0]), caption(s, o[1])) for s, o in zip(scenes, orders)]
                fwd.append(tokenize(tokenizer, [t[0] for t in texts[start:]]))
                rev.append(tokenize(tokenizer, [t[1] for t in texts[start:]]))
                masks.append(object_masks(scenes, images.shape[1], latents[-1].shape[-2:]))
                owners.append(torch.tensor([[word_owners(s, o, fwd[-1].shape[1]) for o in pair]
                                            for s, pair in zip(scenes, orders)]))
                shapes.append(torch.tensor([[SHAPES.index(o.kind[1]) for o in s.objects]
                                            + [-1] * (MAX_OBJECTS - len(s.objects)) for s in scenes]))
        self.latents = torch.cat(latents)
        self.ids = torch.stack([torch.cat(fwd), torch.cat(rev)], dim=1)  # (N, 2, L)
        self.texts = texts  # per scene: (caption, caption in reverse object order), tokenized as self.ids
        self.empty = tokenize(tokenizer, [""])[0]
        # for the grounding loss: each scene's object masks at the latent size (area fractions), and for each
        # caption order the object each token describes (-1: none)
        self.masks = torch.cat(masks)  # (N, MAX_OBJECTS, h, w)
        self.owners = torch.cat(owners)  # (N, 2, L)
        self.shapes = torch.cat(shapes)  # (N, MAX_OBJECTS): each object's index in SHAPES (-1: absent)

    def __len__(self) -> int:
        return len(self.latents)

    def draw(self, gen: torch.Generator, n: int, dropout: float):
        """A random batch: (scene indices, caption orders (0 or 1), which captions are dropped to "")."""
        idx = torch.randint(len(self), (n,), generator=gen)
        order = torch.randint(2, (n,), generator=gen)  # random caption order
        dropped = torch.rand(n, generator=gen) < dropout
        return idx, order, dropped

    def captions(self, idx: torch.Tensor, order: torch.Tensor, dropped: torch.Tensor) -> list[str]:
        """The captions of a `draw` ("" where dropped), tokenized as `self.ids[idx, order]`."""
        return ["" if d else self.texts[i][o] for i, o, d in zip(idx.tolist(), order.tolist(), dropped.tolist())]

    def batch(self, gen: torch.Generator, n: int, dropout: float, *, grounding: bool = False):
        """(latents, ids), or with `grounding` (latents, ids, masks, owners, shapes) for `grounding_loss` and
        `concept_grounding`; the random draws are the same either way."""
        idx, order, dropped = self.draw(gen, n, dropout)
        ids = self.ids[idx, order].clone()
        ids[dropped] = self.empty
        if not grounding:
            return self.latents[idx], ids
        owners = self.owners[idx, order].clone()
        owners[dropped] = -1
        return self.latents[idx], ids, self.masks[idx], owners, self.shapes[idx]


def object_masks(scenes: list[Scene], size: int, latent_hw) -> torch.Tensor:
    """(N, MAX_OBJECTS, h, w) float: the fraction of each latent cell an object covers (0 for absent objects)."""
    out = torch.zeros(len(scenes), MAX_OBJECTS, size, size)
    for i, scene in enumerate(scenes):
        for j, obj in enumerate(scene.objects):
            out[i, j] = torch.from_numpy(world_object_mask(obj, size))
    return F.adaptive_avg_pool2d(out, tuple(latent_hw))


def word_owners(scene: Scene, order: tuple[int, ...], length: int) -> list[int]:
    """For `caption(scene, order)` tokenized to `length`: at each position, the index (into scene.objects) of the
    object whose colour, shape or position word sits there, else -1. Every caption word is one token (checked
    by build.check_tokenizer), after BOS."""
    owners = [-1] * length
    position = 1  # after BOS
    for k, j in enumerate(order):
        if k:
            position += 1  # "and"
        obj = scene.objects[j]
        for word in describe(obj).split():
            if word in obj.kind:
                owners[position] = j
            position += 1
    return owners


# ----------------------------------------------------------------------------- losses

def vae_loss(vae, x: torch.Tensor) -> torch.Tensor:
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    return F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()


def encode_text(text_encoder, ids: torch.Tensor, empty: torch.Tensor | None = None, context_dropout: float = 0.0,
                gen: torch.Generator | None = None, prefix_dropout: float = 0.0, return_cut: bool = False):
    """The text states the UNet cross-attends to, with *context dropout*: for a `context_dropout` fraction of
    the captions, the states from the end-of-text token on are replaced by the empty prompt's states there.

    CLIP's text encoder is causal, so the end-of-text and padding states are the only ones that see the whole
    caption. Left alone, the UNet read everything from them (a 5.9k-step run: red vs blue changed the padding
    states 14x more than the colour word's own state) and every word's map was flat, at the uniform baseline.
    Making those states unreliable in training sends the UNet to the word tokens, which is where the maps are
    read. Sampling is unchanged (the standard pipeline encodes the whole prompt).

    *Prefix dropout* goes further for a `prefix_dropout` fraction of the captions: the states from a random word
    on (uniform over the words after the first, and the end-of-text) are replaced, so the UNet is trained on
    every prefix "a red circle on the left and a blue" of the captions. A causal encoder writes each word into
    every later state, so with whole captions only the UNet reads a colour from the shape word after it, and
    the colour word's own map goes flat; a prefix that ends at the colour word leaves that word the only place
    to read it from.

    With `return_cut`, also returns each caption's cut: its states from that position on are the empty prompt's
    (the length of the sequence where nothing was replaced)."""
    if empty is None or (context_dropout <= 0 and prefix_dropout <= 0):
        states = text_encoder(ids)[0]
        return (states, torch.full((len(ids),), ids.shape[1])) if return_cut else states
    states = text_encoder(torch.cat([ids, empty[None]]))[0]
    states, empty_states = states[:-1], states[-1:]
    cut = dropout_cuts(ids, text_encoder.config.eos_token_id, context_dropout, gen, prefix_dropout)
    replaced = torch.arange(ids.shape[1])[None, :] >= cut[:, None]
    states = torch.where(replaced[..., None], empty_states, states)
    return (states, cut) if return_cut else states


def dropout_cuts(ids: torch.Tensor, eos_token_id: int, context_dropout: float, gen: torch.Generator | None,
                 prefix_dropout: float) -> torch.Tensor:
    """Per caption, the position from which `encode_text`'s context and prefix dropout replace its text states
    by the empty prompt's (the sequence length where nothing is replaced)."""
    n, length = ids.shape
    eos = (ids == eos_token_id).int().argmax(dim=1)  # first end-of-text
    cut = torch.full((n,), length)  # states at positions >= cut are replaced
    if context_dropout > 0:
        drop = torch.rand(n, generator=gen) < context_dropout
        cut = torch.where(drop, eos, cut)
    if prefix_dropout > 0:
        prefix = torch.rand(n, generator=gen) < prefix_dropout
        # keep BOS and the first word at least: cut in [2, eos]
        cut_at = 2 + (torch.rand(n, generator=gen) * (eos - 1).clamp(min=0)).long()
        cut = torch.where(prefix, torch.minimum(cut_at, cut), cut)
    return cut


def diffusion_loss(unet, text_encoder, scheduler, latents, ids, t, noise, *, empty=None, context_dropout=0.0,
                   gen=None, prefix_dropout=0.0) -> torch.Tensor:
    """The v-prediction loss of `training_loss`, without grounding."""
    return training_loss(unet, text_encoder, scheduler, latents, ids, t, noise, empty=empty,
                         context_dropout=context_dropout, gen=gen, prefix_dropout=prefix_dropout)[0]


def training_loss(unet, text_encoder, scheduler, latents, ids, t, noise, *, empty=None, context_dropout=0.0,
                  gen=None, prefix_dropout=0.0, grounding=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(v-prediction loss, grounding loss, concept-grounding loss); the last is 0 unless the recorder has concepts.
    The first is capped at low noise: weight min(snr + 1, 5) / (snr + 1).

    That is min-SNR-5 in the v domain: plain v-loss (weight 1) up to snr = 4, where the layout is decided,
    and the min-SNR down-weighting of the detail steps beyond. (The usual min(snr, 5) / (snr + 1) goes to 0
    as snr -> 0, so with a zero-terminal-SNR schedule the steps that must read the layout from the text
    would hardly be trained.)

    `grounding` is (recorder, masks, owners[, shapes]): a `TrainingAttention` installed on the UNet's cross-attention
    layers and the batch's object masks, token owners and object shapes (`Pool.batch(grounding=True)`; the shapes
    are needed when the recorder has concepts, `TrainingConcepts`); without it the
    grounding loss is 0. Tokens whose states were replaced by the empty prompt's (prefix or context dropout)
    are not grounded: they no longer name their object."""
    noisy = scheduler.add_noise(latents, noise, t)
    target = scheduler.get_velocity(latents, noise, t)
    states, cut = encode_text(text_encoder, ids, empty, context_dropout, gen, prefix_dropout, return_cut=True)
    concepts = None if grounding is None else grounding[0].concepts
    if concepts is not None:
        concepts.encode(text_encoder)  # this step's weights: the gradient reaches the concepts' encoding
    pred = unet(noisy, t, states).sample
    alpha_bar = scheduler.alphas_cumprod.to(latents.device)[t]
    snr = alpha_bar / (1 - alpha_bar)
    weight = (snr + 1).clamp(max=5.0) / (snr + 1)
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    v_loss = (weight * per_sample).mean()
    if grounding is None:
        return v_loss, torch.zeros(()), torch.zeros(())
    recorder, masks, owners, *shapes = grounding
    owners = torch.where(torch.arange(ids.shape[1])[None, :] < cut[:, None], owners, -1)
    g_loss = grounding_loss(recorder.maps, masks, owners, tuple(latents.shape[-2:]))
    c_loss = (torch.zeros(()) if concepts is None
              else concept_grounding(concepts.maps, masks, shapes[0], tuple(latents.shape[-2:])))
    return v_loss, g_loss, c_loss


class TrainingAttention:
    """Collects the cross-attention probabilities of one UNet call, with their gradients, for `grounding_loss`.

    It stands in for the `MapStore` of `processors.install`: `CaptureProcessor` in "explicit" mode computes the
    seed formula softmax(Q K^T / sqrt(d)) V and hands each layer's probabilities to `record`, so training
    grounds exactly the maps the app shows."""

    def __init__(self, concepts: "TrainingConcepts | None" = None):
        self.maps: list[torch.Tensor] = []  # per layer: (B, queries, tokens), averaged over heads
        self.concepts = concepts  # read by the capture processor (`record_concepts`), as a MapStore's

    def begin_call(self, latent_hw, timestep=None) -> None:
        self.maps = []
        if self.concepts is not None:
            self.concepts.maps = []

    def conditional(self, batch: int) -> slice:
        return slice(0, batch)  # no guidance in training: every image's maps are kept

    def record(self, layer: str, attention_probs: torch.Tensor, heads: int) -> None:
        self.maps.append(attention_probs.unflatten(0, (-1, heads)).mean(1))

    def flush(self) -> None:
        pass


class TrainingConcepts:
    """The shape names as concepts, for `concept_grounding`: encoded each step by the text encoder being trained,
    in the app's concept template (`concepts.DEFAULT_TEMPLATE`, only the word's own tokens kept), and recorded
    by the capture processor's concept path (`families.unet.record_concepts`, with gradients) as the "joint"
    kind: each image query's softmax over the caption's tokens and the concepts, the concept columns kept."""

    requires_grad = True  # record_concepts keeps the graph

    def __init__(self, tokenizer, names=None):
        from ..concepts import DEFAULT_TEMPLATE, concept_text, concept_token_positions

        self.names = list(SHAPES if names is None else names)
        self.ids = tokenize(tokenizer, [concept_text(n, DEFAULT_TEMPLATE) for n in self.names])
        self.positions = [concept_token_positions(tokenizer, n, DEFAULT_TEMPLATE) for n in self.names]
        if any(len(p) != 1 for p in self.positions):
            raise ValueError(f"every concept must be one token of this tokenizer: {self.names}")
        self.states: torch.Tensor | None = None
        self.stores = {"joint": self}
        self.cache: dict = {}
        self.maps: list[torch.Tensor] = []  # per layer: (B, queries, concepts), averaged over heads

    def encode(self, text_encoder) -> None:
        hidden = text_encoder(self.ids)[0]  # (concepts, L, dim)
        self.states = hidden[torch.arange(len(self.names)), [p[0] for p in self.positions]][None]  # (1, C, dim)
        self.cache = {}  # each layer's concept keys, from these states

    def record_attention(self, layer, query, key, mask, scale, columns=(0, None)) -> None:
        """The store's softmax (`maps.text_attention`), kept with its graph rather than deferred."""
        self.maps.append(text_attention(query.float(), key.float(), scale, mask, columns)[0])


def concept_grounding(maps: list[torch.Tensor], masks: torch.Tensor, shapes: torch.Tensor,
                      latent_hw: tuple[int, int]) -> torch.Tensor:
    """`grounding_loss` for the concepts: each shape name's concept map against the union of the masks of the
    scene's objects of that shape (shapes not in the scene are left out).

    maps: per layer (B, queries, concepts), concept c = SHAPES[c]; masks: (B, objects, h, w); shapes: (B, objects),
    each object's concept index or -1."""
    if not maps:
        return torch.zeros(())
    concepts = maps[0].shape[-1]
    which = F.one_hot(shapes.clamp_min(0), concepts).float() * (shapes >= 0)[..., None]  # (B, objects, C)
    concept_masks = torch.einsum("boc,bohw->bchw", which, masks).clamp(max=1.0)  # (B, C, h, w)
    present = which.amax(1) > 0  # (B, C)
    owners = torch.where(present, torch.arange(concepts)[None, :], -1)
    return grounding_loss(maps, concept_masks, owners, latent_hw)


def record_attention(unet, recorder: TrainingAttention):
    """Context manager: the UNet's cross-attention layers compute the seed formula explicitly and hand their
    probabilities to `recorder`; the original processors are restored on exit."""
    return install(unet, recorder, lambda store, layer, _original: CaptureProcessor(store, layer, "explicit"))


def grounding_loss(maps: list[torch.Tensor], masks: torch.Tensor, owners: torch.Tensor,
                   latent_hw: tuple[int, int]) -> torch.Tensor:
    """Token grounding (in the spirit of TokenCompose, Wang et al. 2024): each word that names an object (its
    colour, shape and position) should spread its cross-attention over that object and nowhere else.

    For every such token and layer, the token's map over the layer's pixels, normalised to sum 1, is compared
    with the object's mask (area fractions pooled to the layer's size), normalised the same way: the loss is
    KL(mask || map), 0 when the map is uniform over the object. Averaged over tokens, then layers.

    maps: per layer (B, queries, tokens); masks: (B, objects, h, w) at the latent size; owners: (B, tokens),
    the object each token names or -1."""
    b, tok = (owners >= 0).nonzero(as_tuple=True)
    if len(b) == 0 or not maps:
        return torch.zeros(())
    losses = []
    for probs in maps:
        h, w = layer_hw(latent_hw, probs.shape[1])
        target = F.adaptive_avg_pool2d(masks, (h, w)).flatten(2)[b, owners[b, tok]]  # (K, h * w)
        target = target / target.sum(-1, keepdim=True)
        word_map = probs[b, :, tok]  # (K, h * w)
        word_map = word_map / word_map.sum(-1, keepdim=True)
        kl = torch.xlogy(target, target) - target * torch.log(word_map.clamp_min(1e-12))
        losses.append(kl.sum(-1).mean())
    return torch.stack(losses).mean()


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


@torch.no_grad()
def palette_accuracy(vae, seed: int, n: int = 256, p_two: float = 0.7) -> float:
    """Fraction of pixels whose nearest palette colour survives a VAE round trip (means)."""
    rng = np.random.default_rng([seed, 2])
    _, images = render_batch(rng, n, p_two)
    same = total = 0
    for i in range(0, n, 32):
        x = to_tensor(images[i:i + 32])
        recon = to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample)
        for a, b in zip(images[i:i + 32], recon):
            same += int((palette_labels(a) == palette_labels(b)).sum())
            total += a.shape[0] * a.shape[1]
    return same / total


# ----------------------------------------------------------------------------- checkpoints

def load_weights(folder: Path, *, vae, text_encoder, unet) -> None:
    """Load a pipeline folder's VAE (with its scaling factor), text encoder and UNet into this trainer's models,
    as float32. The folder's models must have this trainer's architecture."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    if not (folder / "model_index.json").is_file():
        raise ValueError("not a pipeline folder (no model_index.json); give an export such as runs/tiny/pipeline")
    for model, cls, sub in ((text_encoder, CLIPTextModel, "text_encoder"), (unet, UNet2DConditionModel, "unet")):
        source = cls.from_pretrained(folder / sub)
        model.load_state_dict({k: v.float() for k, v in source.state_dict().items()})
    load_vae(folder / "vae", vae)


def load_vae(folder: Path, vae) -> None:
    """Load a VAE folder's weights (as float32) and scaling factor into this trainer's VAE."""
    from diffusers import AutoencoderKL

    source = AutoencoderKL.from_pretrained(folder)
    vae.load_state_dict({k: v.float() for k, v in source.state_dict().items()})
    vae.register_to_config(scaling_factor=float(source.config.scaling_factor))


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def export(folder: Path, vae, ema_text_encoder, tokenizer, ema_unet) -> None:
    build.save_pipeline(folder, vae=vae, text_encoder=ema_text_encoder, tokenizer=tokenizer,
                        unet=ema_unet)


# ----------------------------------------------------------------------------- main

def bad_value(args, limits: dict[str, float]) -> str | None:
    """An error message for the first flag in `limits` (name -> upper bound) outside [0, bound] (NaN too)."""
    for name, top in limits.items():
        value = getattr(args, name)
        if not (0 <= value <= top and math.isfinite(value)):
            wanted = "a fraction from 0 to 1" if top == 1.0 else "a weight >= 0"
            return f"--{name.replace('_', '-')} {value}: give {wanted}"
    return None


def run_folder(args, must_match: tuple[str, ...]) -> tuple[Path, Path, Path, dict | None]:
    """(run folder (created), export folder, checkpoint path, the checkpoint with --resume else None). Raises
    ValueError when --resume finds no checkpoint or one made with other `must_match` flags."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    export_dir = Path(args.export) if args.export else out / "pipeline"
    ckpt_path = out / CHECKPOINT
    if not args.resume:
        return out, export_dir, ckpt_path, None
    if not ckpt_path.exists():
        raise ValueError(f"--resume: no checkpoint at {ckpt_path}")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    for key in must_match:
        if ckpt["args"][key] != getattr(args, key):
            raise ValueError(f"--resume: --{key.replace('_', '-')} {getattr(args, key)} differs from the "
                             f"checkpoint's {ckpt['args'][key]}")
    return out, export_dir, ckpt_path, ckpt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pick = argparse.ArgumentParser(add_help=False)
    pick.add_argument("--model", choices=MODELS, default="unet")
    if pick.parse_known_args(argv)[0].model == "mmdit":
        from .train_mmdit import main as train_mmdit

        return train_mmdit(argv)
    args = build_parser().parse_args(argv)
    error = bad_value(args, dict(context_dropout=1.0, prefix_dropout=1.0, caption_dropout=1.0, grounding=math.inf,
                                 concept_grounding=math.inf))
    if error is None and args.init_from is not None and args.resume:
        error = "--init-from starts a new run and --resume continues one: give only one of them"
    if error is None and args.init_from is not None and args.vae is not None:
        error = "--init-from already brings its folder's VAE: drop --vae"
    if error is None and args.model == "film":
        flag, weight = (("--grounding", args.grounding) if args.grounding > 0
                        else ("--concept-grounding", args.concept_grounding))
        if weight > 0:
            error = f"{flag} {weight}: --model film has no cross-attention maps to ground; drop it"
    if error is not None:
        print(error, file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        out, export_dir, ckpt_path, ckpt = run_folder(args, ("model", "seed", "pool_size", "p_two"))
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)  # model initialisation
    tokenizer = build.build_tokenizer()
    vae = build.build_vae()
    text_encoder = build.build_text_encoder(len(tokenizer))
    unet = build.build_film_unet() if args.model == "film" else build.build_unet()
    vae_folder = args.vae or (FILM_VAE if args.model == "film" and args.init_from is None else None)
    print(f"params: unet {build.n_params(unet):,} text encoder {build.n_params(text_encoder):,} "
          f"vae {build.n_params(vae):,}", flush=True)
    if args.init_from is not None:
        try:
            load_weights(Path(args.init_from), vae=vae, text_encoder=text_encoder, unet=unet)
        except (OSError, RuntimeError, ValueError) as e:
            print(f"--init-from {args.init_from}: {e}", file=sys.stderr)
            return 2
        print(f"initialised from {args.init_from}", flush=True)
    if vae_folder is not None and ckpt is None:
        try:
            load_vae(Path(vae_folder), vae)
        except (OSError, RuntimeError, ValueError) as e:
            print(f"--vae {vae_folder}: {e}", file=sys.stderr)
            return 2
        print(f"VAE from {vae_folder} (scaling factor {vae.config.scaling_factor:.4f}); no VAE stage", flush=True)
    last_save = time.time()
    resumed_vae = ckpt is not None and ckpt["vae_done"]
    # an --init-from or --vae run keeps that VAE and the scaling factor its latents were trained with
    new_vae = not resumed_vae and args.init_from is None and vae_folder is None

    # Stage 1: VAE.
    if resumed_vae:
        vae.load_state_dict(ckpt["vae"])
        vae.register_to_config(scaling_factor=ckpt["scaling_factor"])
        print(f"resumed: VAE done (palette accuracy {ckpt['vae_palette_accuracy']:.5f})", flush=True)
    elif new_vae:
        train_vae(vae, args)
        last_save = time.time()
    vae.eval().requires_grad_(False)
    # (a smoke run with a tiny pool checks few images, to stay fast)
    accuracy = ckpt["vae_palette_accuracy"] if resumed_vae else palette_accuracy(vae, args.seed,
                                                                                  n=min(256, args.pool_size))
    print(f"VAE palette accuracy {accuracy:.5f}", flush=True)

    # Stage 2: UNet + text encoder on pre-encoded posterior means.
    t0 = time.time()
    pool = Pool(vae, tokenizer, args.seed, args.pool_size, args.p_two)
    if new_vae:
        # Unit-variance UNet inputs: scale by 1 / std of the latent means.
        vae.register_to_config(scaling_factor=float(1.0 / pool.latents.std()))
    scaling = vae.config.scaling_factor
    print(f"pool: {len(pool)} scenes encoded in {time.time() - t0:.0f} s; "
          f"scaling_factor {scaling:.4f}", flush=True)

    scheduler = build.train_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup, args.steps))
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed + 1000)
    step = 0
    if ckpt is not None and "unet" in ckpt:
        unet.load_state_dict(ckpt["unet"])
        text_encoder.load_state_dict(ckpt["text_encoder"])
        ema_unet.load_state_dict(ckpt["ema_unet"])
        ema_te.load_state_dict(ckpt["ema_text_encoder"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["lr_scheduler"])
        # LambdaLR keeps its lambda from this run: resuming with a larger --steps stretches
        # the cosine from here on.
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        step = ckpt["step"]
        print(f"resumed at step {step}", flush=True)

    def state() -> dict:
        return dict(args=vars(args), vae_done=True, vae=vae.state_dict(), scaling_factor=scaling,
                    vae_palette_accuracy=accuracy, unet=unet.state_dict(),
                    text_encoder=text_encoder.state_dict(), ema_unet=ema_unet.state_dict(),
                    ema_text_encoder=ema_te.state_dict(), optimizer=opt.state_dict(),
                    lr_scheduler=sched.state_dict(), generator=gen.get_state(),
                    torch_rng=torch.get_rng_state(), step=step)

    def checkpoint(reason: str) -> None:
        t = time.time()
        save_checkpoint(ckpt_path, state())
        export(export_dir, vae, ema_te, tokenizer, ema_unet)
        print(f"checkpoint ({reason}) at step {step}: {ckpt_path}, pipeline {export_dir} "
              f"({time.time() - t:.1f} s)", flush=True)

    if not resumed_vae:
        checkpoint("VAE done")
        last_save = time.time()

    unet.train()
    text_encoder.train()
    stop = args.steps if args.stop_after is None else min(args.steps, step + args.stop_after)
    bar = tqdm(total=args.steps, initial=step, desc="unet", mininterval=10, file=sys.stdout)
    smooth, tick = None, time.time()
    grounding = args.grounding > 0 or args.concept_grounding > 0
    recorder = TrainingAttention(TrainingConcepts(tokenizer) if args.concept_grounding > 0 else None)
    grounded = contextlib.ExitStack()
    if grounding:
        grounded.enter_context(record_attention(unet, recorder))
    smooth_g = smooth_c = None
    while step < stop:
        batch = pool.batch(gen, args.batch_size, args.caption_dropout, grounding=grounding)
        latents, ids = batch[0] * scaling, batch[1]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(ids),), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        v_loss, g_loss, c_loss = training_loss(unet, text_encoder, scheduler, latents, ids, t, noise,
                                               empty=pool.empty, context_dropout=args.context_dropout, gen=gen,
                                               prefix_dropout=args.prefix_dropout,
                                               grounding=(recorder, *batch[2:]) if grounding else None)
        loss = v_loss + args.grounding * g_loss + args.concept_grounding * c_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_te, text_encoder, decay)
        smooth = v_loss.item() if smooth is None else 0.98 * smooth + 0.02 * v_loss.item()
        smooth_g = g_loss.item() if smooth_g is None else 0.98 * smooth_g + 0.02 * g_loss.item()
        smooth_c = c_loss.item() if smooth_c is None else 0.98 * smooth_c + 0.02 * c_loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}", refresh=False)
        if step % args.log_every == 0:
            now = time.time()
            g_text = (f" grounding {smooth_g:.4f}" if args.grounding > 0 else "") + (
                f" concepts {smooth_c:.4f}" if args.concept_grounding > 0 else "")
            bar.write(f"step {step}/{args.steps} loss {v_loss.item():.4f} smooth {smooth:.4f}{g_text} "
                      f"lr {sched.get_last_lr()[0]:.2e} {(now - tick) / args.log_every:.2f} s/step")
            sys.stdout.flush()
            tick = now
        if time.time() - last_save >= args.checkpoint_minutes * 60:
            checkpoint("timer")
            last_save = time.time()
    bar.close()
    grounded.close()
    checkpoint("done" if step >= args.steps else "stop")
    return 0


def train_vae(vae, args) -> None:
    """Stage 1: MSE + 1e-6 KL on freshly rendered (non-held-out) scenes."""
    rng = np.random.default_rng([args.seed, 0])
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(50, args.vae_steps), args.vae_steps))
    vae.train()
    bar = tqdm(range(args.vae_steps), desc="vae", mininterval=10, file=sys.stdout)
    smooth = None
    for i in bar:
        _, images = render_batch(rng, args.vae_batch_size, args.p_two)
        loss = vae_loss(vae, to_tensor(images))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smooth:.5f}", refresh=False)
        if (i + 1) % (args.log_every * 4) == 0:
            bar.write(f"vae step {i + 1}/{args.vae_steps} loss {smooth:.5f}")
            sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
