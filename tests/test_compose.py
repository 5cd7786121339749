"""Capture composes with Diffusers' other processors and pipelines: IP-Adapter, img2img, inpainting, ControlNet and
LoRA, for SD 1.x and SDXL (tiny random pipelines built as Diffusers' tests build them). Images are bit-identical with
and without capture, the layers' own processors are back after the block, and the text tokens' maps are recorded."""

import pytest
import torch
from conftest import tiny_sd_pipeline, tiny_sdxl_pipeline
from diffusers.models.attention_processor import AttnAddedKVProcessor, AttnProcessor, IPAdapterAttnProcessor2_0

import crossattn_sd
from crossattn_sd.processors import cross_attention_layers
from crossattn_sd.steering import ProcessorSpec, use_processor

FAMILIES = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline}
PROMPT = "a red square on the left"


def ip_adapter_state_dict(unet, seed: int = 0) -> dict:
    """Random IP-Adapter weights for `unet` in the checkpoint layout `load_ip_adapter` reads, built as Diffusers'
    `create_ip_adapter_state_dict` builds them (tests/models/unets/test_models_unet_2d_condition.py)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor
    from diffusers.models.embeddings import ImageProjection

    torch.manual_seed(seed)
    dim = unet.config.cross_attention_dim
    channels = unet.config.block_out_channels
    adapter, key_id = {}, 1
    for name in cross_attention_layers(unet):
        block = name.split(".")[0]
        if block == "mid_block":
            hidden = channels[-1]
        elif block == "up_blocks":
            hidden = list(reversed(channels))[int(name.split(".")[1])]
        else:
            hidden = channels[int(name.split(".")[1])]
        sd = IPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=dim, scale=1.0).state_dict()
        adapter[f"{key_id}.to_k_ip.weight"] = sd["to_k_ip.0.weight"]
        adapter[f"{key_id}.to_v_ip.weight"] = sd["to_v_ip.0.weight"]
        key_id += 2  # checkpoints number attn1 and attn2 alternately
    proj = ImageProjection(cross_attention_dim=dim, image_embed_dim=dim, num_image_text_embeds=4).state_dict()
    image_proj = {"proj.weight": proj["image_embeds.weight"], "proj.bias": proj["image_embeds.bias"],
                  "norm.weight": proj["norm.weight"], "norm.bias": proj["norm.bias"]}
    return {"image_proj": image_proj, "ip_adapter": adapter}


def with_ip_adapter(pipe):
    pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet), subfolder="", weight_name="", image_encoder_folder=None)
    return pipe


def ip_inputs(pipe, masks: bool = False) -> dict:
    torch.manual_seed(1)
    embeds = torch.randn(2, 1, pipe.unet.config.cross_attention_dim)  # [negative, positive] image embeddings
    inputs = {"ip_adapter_image_embeds": [embeds]}
    if masks:  # the image prompt acts on the left half only (Diffusers' `ip_adapter_masks`)
        size = 2 * pipe.unet.config.sample_size
        mask = torch.zeros(1, 1, size, size)
        mask[..., : size // 2] = 1
        inputs["cross_attention_kwargs"] = {"ip_adapter_masks": [mask]}
    return inputs


def image_inputs(pipe, seed: int = 2) -> torch.Tensor:
    size = 2 * pipe.unet.config.sample_size  # VAE factor 2
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def controlnet_pipe(family):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    base = FAMILIES[family]()
    torch.manual_seed(3)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(4, 8))
    cls = StableDiffusionControlNetPipeline if family == "sd" else StableDiffusionXLControlNetPipeline
    return cls.from_pipe(base, controlnet=controlnet)


def lora_pipe(family):
    from peft import LoraConfig

    pipe = FAMILIES[family]()
    torch.manual_seed(4)  # init_lora_weights=False: random A and B, so the LoRA changes the images
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    return pipe


def variant(family: str, name: str):
    """(pipeline, extra call arguments) of one pipeline variant."""
    from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                           StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline)

    if name == "ip_adapter":
        pipe = with_ip_adapter(FAMILIES[family]())
        return pipe, ip_inputs(pipe)
    if name == "ip_adapter_masks":
        pipe = with_ip_adapter(FAMILIES[family]())
        return pipe, ip_inputs(pipe, masks=True)
    if name == "img2img":
        cls = StableDiffusionImg2ImgPipeline if family == "sd" else StableDiffusionXLImg2ImgPipeline
        pipe = cls.from_pipe(FAMILIES[family]())
        return pipe, {"image": image_inputs(pipe), "strength": 0.75}
    if name == "inpaint":
        cls = StableDiffusionInpaintPipeline if family == "sd" else StableDiffusionXLInpaintPipeline
        pipe = cls.from_pipe(FAMILIES[family]())
        mask = torch.zeros(1, 1, *image_inputs(pipe).shape[-2:])
        mask[..., :, mask.shape[-1] // 2:] = 1
        return pipe, {"image": image_inputs(pipe), "mask_image": mask, "strength": 0.9}
    if name == "controlnet":
        pipe = controlnet_pipe(family)
        return pipe, {"image": image_inputs(pipe, seed=5)}
    if name == "lora":
        return lora_pipe(family), {}
    if name == "classic_processor":  # Diffusers' non-SDPA AttnProcessor, as its own tests install it
        pipe = FAMILIES[family]()
        pipe.unet.set_default_attn_processor()
        return pipe, {}
    raise KeyError(name)


def generate(pipe, extra: dict) -> torch.Tensor:
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, output_type="pt",
                generator=torch.Generator().manual_seed(0), **extra).images


VARIANTS = ["ip_adapter", "ip_adapter_masks", "img2img", "inpaint", "controlnet", "lora", "classic_processor"]


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_capture_composes(family, name):
    pipe, extra = variant(family, name)
    plain = generate(pipe, extra)
    before = dict(pipe.unet.attn_processors)
    unet_calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *_: unet_calls.append(1))
    with crossattn_sd.capture(pipe, mode="exact") as maps:
        captured = generate(pipe, extra)
    hook.remove()
    assert (captured - plain).abs().max().item() == 0  # bit-identical
    after = pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)  # the layers' own processors (IP-Adapter's) are back
    if name.startswith("ip_adapter"):
        assert all(isinstance(after[f"{n}.processor"], IPAdapterAttnProcessor2_0) for n in cross_attention_layers(pipe.unet))
    assert sorted(maps.layers) == sorted(cross_attention_layers(pipe.unet))
    tokens = pipe.tokenizer.model_max_length  # the text tokens only, not an IP-Adapter's image tokens
    for layer in maps.layers:
        mean = maps.layer_mean(layer)  # (images, h, w, tokens)
        assert mean.shape[-1] == tokens
        torch.testing.assert_close(mean.sum(-1), torch.ones(mean.shape[:-1]))  # probabilities over the text
    assert maps.num_steps == len(unet_calls) > 0


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_ip_adapter_text_maps_are_the_plain_layers_maps(family):
    """At IP-Adapter scale 0 the image prompt adds nothing, so the wrapped layers must record the maps that plain
    capture records on the same pipeline without an adapter."""
    pipe = FAMILIES[family]()
    with crossattn_sd.capture(pipe) as without:
        generate(pipe, {})
    with_ip_adapter(pipe).set_ip_adapter_scale(0.0)
    with crossattn_sd.capture(pipe) as wrapped:
        generate(pipe, ip_inputs(pipe))
    assert wrapped.layers == without.layers
    for layer in without.layers:
        torch.testing.assert_close(wrapped.layer_mean(layer), without.layer_mean(layer), rtol=0, atol=1e-6)


@pytest.mark.parametrize("processor", ["reweight", "edit"])
def test_steering_refuses_an_ip_adapter_layer(processor):
    pipe = with_ip_adapter(tiny_sd_pipeline())
    before = dict(pipe.unet.attn_processors)
    spec = ProcessorSpec(processor, weights=(("red", 2.0),), edit_prompt="a blue square on the left")
    with pytest.raises(ValueError, match=f"the {processor} processor would replace layer .*IPAdapterAttnProcessor2_0"):
        with use_processor(pipe, spec, prompts=[PROMPT], steps=3):
            pass
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())


def test_explicit_mode_refuses_an_ip_adapter_layer_and_takes_a_classic_one():
    pipe = with_ip_adapter(tiny_sd_pipeline())
    with pytest.raises(ValueError, match="explicit mode.*IPAdapterAttnProcessor2_0"):
        with crossattn_sd.capture(pipe, mode="explicit"):
            pass
    plain = tiny_sd_pipeline()
    plain.unet.set_default_attn_processor()
    assert isinstance(next(iter(plain.unet.attn_processors.values())), AttnProcessor)
    with crossattn_sd.capture(plain, mode="explicit") as maps:
        generate(plain, {})
    assert maps.layers


def test_capture_refuses_added_key_value_attention():
    pipe = tiny_sd_pipeline()
    layer = cross_attention_layers(pipe.unet)[0]
    processors = dict(pipe.unet.attn_processors)
    processors[f"{layer}.processor"] = AttnAddedKVProcessor()
    pipe.unet.set_attn_processor(dict(processors))  # set_attn_processor empties the dict it is given
    with pytest.raises(ValueError, match=f"cannot record layer {layer}: its AttnAddedKVProcessor"):
        with crossattn_sd.capture(pipe):
            pass
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())
    others = cross_attention_layers(pipe.unet)[1:]  # the way out the error names: leave the layer out
    with crossattn_sd.capture(pipe, layers=others):
        assert pipe.unet.attn_processors[f"{layer}.processor"] is processors[f"{layer}.processor"]
