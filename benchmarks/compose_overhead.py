"""What wrapping a layer's own processor costs: capture on Diffusers' default processor (replaced by
`CaptureProcessor`, which reuses the SDPA's queries and keys) against capture on processors it wraps
(`CaptureWrapper`: the original computes the output, the text probabilities need one more `to_q` and `to_k`).

Three setups on the same pipeline (default: the embedded model), each timed plain and captured:

  default     Diffusers' `AttnProcessor2_0` everywhere                        capture replaces it
  classic     `unet.set_default_attn_processor()` (Diffusers' `AttnProcessor`)  capture wraps it
  ip-adapter  a random IP-Adapter loaded (`IPAdapterAttnProcessor2_0`)          capture wraps it

Rounds are interleaved (each round runs every variant once, the order rotated), after one warm-up round; the
table gives the median process CPU seconds per call and the median per-round ratio captured / plain. Each
captured image is checked bit-identical to its plain one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def ip_adapter_state_dict(unet, seed: int = 0) -> dict:
    """Random IP-Adapter weights in the layout `load_ip_adapter` reads (as Diffusers' own tests build them)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor
    from diffusers.models.embeddings import ImageProjection

    from crossattn_sd.processors import cross_attention_layers

    torch.manual_seed(seed)
    dim, adapter = unet.config.cross_attention_dim, {}
    for i, name in enumerate(cross_attention_layers(unet)):
        hidden = unet.get_submodule(name).to_k.out_features  # the layer's inner dim
        sd = IPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=dim).state_dict()
        adapter[f"{2 * i + 1}.to_k_ip.weight"] = sd["to_k_ip.0.weight"]
        adapter[f"{2 * i + 1}.to_v_ip.weight"] = sd["to_v_ip.0.weight"]
    proj = ImageProjection(cross_attention_dim=dim, image_embed_dim=dim, num_image_text_embeds=4).state_dict()
    return {"image_proj": {"proj.weight": proj["image_embeds.weight"], "proj.bias": proj["image_embeds.bias"],
                           "norm.weight": proj["norm.weight"], "norm.bias": proj["norm.bias"]},
            "ip_adapter": adapter}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="a crossattn_sd.load_pipeline model")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per call")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import crossattn_sd

    pipes = {name: crossattn_sd.load_pipeline(args.model) for name in ("default", "classic", "ip-adapter")}
    pipes["classic"].unet.set_default_attn_processor()
    ip = pipes["ip-adapter"]
    ip.load_ip_adapter(ip_adapter_state_dict(ip.unet), subfolder="", weight_name="", image_encoder_folder=None)
    torch.manual_seed(1)
    embeds = [torch.randn(2, 1, ip.unet.config.cross_attention_dim)]

    def run(name: str, captured: bool):
        pipe = pipes[name]
        kwargs = {"ip_adapter_image_embeds": embeds} if name == "ip-adapter" else {}
        start = time.process_time()
        if captured:
            with crossattn_sd.capture(pipe) as maps:
                image = pipe("a red circle on the left", num_inference_steps=args.steps, output_type="pt",
                             generator=torch.Generator().manual_seed(0), **kwargs).images
            assert maps.layers
        else:
            image = pipe("a red circle on the left", num_inference_steps=args.steps, output_type="pt",
                         generator=torch.Generator().manual_seed(0), **kwargs).images
        return time.process_time() - start, image

    variants = [(name, captured) for name in pipes for captured in (False, True)]
    times: dict = {v: [] for v in variants}
    images: dict = {}
    for r in range(args.rounds + 1):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            seconds, image = run(*v)
            if r:
                times[v].append(seconds)
            images.setdefault(v, image)
    print(f"{args.model}, {args.steps} steps, {args.rounds} rounds, {args.threads} thread(s); CPU s per call")
    print(f"{'setup':12} {'plain':>8} {'captured':>9} {'ratio':>7}  bit-identical")
    for name in pipes:
        plain, cap = times[(name, False)], times[(name, True)]
        ratio = statistics.median(c / p for p, c in zip(plain, cap))
        same = torch.equal(images[(name, False)], images[(name, True)])
        print(f"{name:12} {statistics.median(plain):8.3f} {statistics.median(cap):9.3f} {ratio:7.3f}  {same}")


if __name__ == "__main__":
    main()
