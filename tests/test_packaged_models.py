"""The packaged comparison models: `tiny-untaught` (the UNet model before its grounding fine-tune) and `tiny-film`
(FiLM, no attention), loaded offline from package data, sharing `tiny`'s VAE, tokenizer and scheduler."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil

import numpy as np
import pytest
import torch

from crossattn_sd.config import EMBEDDED_MODEL_DIR, PACKAGE_DIR, ModelPreset, get_preset
from crossattn_sd.pipeline import generate, load_pipeline
from crossattn_sd.tiny.build import folder_size, same_files, ship_weights

PROMPT = "a red circle on the left and a blue square on the right"
SHARED = ("scheduler", "tokenizer", "vae")


def folder(name):
    return PACKAGE_DIR / get_preset(name).source.removeprefix("package:")


def test_tiny_untaught_loads_offline_with_tinys_shared_components():
    source = folder("tiny-untaught")
    assert sorted(p.name for p in source.iterdir() if p.is_dir()) == ["text_encoder", "unet"]
    assert folder_size(source) <= 30 * 2**20
    torch.set_num_threads(1)
    untaught, tiny = load_pipeline("tiny-untaught", device="cpu"), load_pipeline("tiny", device="cpu")
    assert untaught.unet.dtype == untaught.vae.dtype == torch.float32
    assert untaught.vae.config.scaling_factor == tiny.vae.config.scaling_factor
    assert all(torch.equal(v, tiny.vae.state_dict()[k]) for k, v in untaught.vae.state_dict().items())
    assert untaught.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    assert type(untaught.scheduler) is type(tiny.scheduler) and untaught.scheduler.config == tiny.scheduler.config
    assert not torch.equal(untaught.unet.conv_in.weight, tiny.unet.conv_in.weight)  # its own UNet
    result = generate(untaught, PROMPT, seed=0, steps=4)
    assert result.heatmap("circle").shape == (64, 64) and result.store.resolutions()[0] == (16, 16)


def test_ship_weights_leaves_out_the_components_it_shares(tmp_path):
    src = tmp_path / "export"
    shutil.copytree(EMBEDDED_MODEL_DIR, src)
    (src / "unet" / "config.json").write_text((src / "unet" / "config.json").read_text() + "\n")  # differs now
    dst = ship_weights(src, tmp_path / "shipped", share=EMBEDDED_MODEL_DIR)
    assert sorted(p.name for p in dst.iterdir() if p.is_dir()) == ["unet"]  # the identical ones are left out
    assert same_files(dst / "unet", src / "unet") and not same_files(dst / "unet", EMBEDDED_MODEL_DIR / "unet")
    assert (dst / "model_index.json").is_file()


def test_components_from_names_a_packaged_folder():
    with pytest.raises(ValueError, match="components_from must be"):
        ModelPreset(name="x", source="package:tiny/weights-untaught", components_from="/elsewhere")


def test_tiny_film_loads_offline_without_attention_and_eval_says_its_iou_is_not_defined(capsys):
    from crossattn_sd.tiny import evaluate

    source = folder("tiny-film")
    assert sorted(p.name for p in source.iterdir() if p.is_dir()) == ["text_encoder", "unet"]
    assert folder_size(source) <= 30 * 2**20
    torch.set_num_threads(1)
    film = load_pipeline("tiny-film", device="cpu")
    assert film.unet.attn_processors == {} and film.unet.config.addition_embed_type == "text"
    assert film.vae.config.scaling_factor == load_pipeline("tiny", device="cpu").vae.config.scaling_factor
    result = generate(film, PROMPT, seed=0, steps=4)  # capture records nothing on it, and says so on a word
    assert result.store.layers == [] and np.asarray(result.images[0]).shape == (64, 64, 3)
    with pytest.raises(ValueError, match="no attention maps"):
        result.heatmap("circle")
    with pytest.raises(ValueError, match="has no cross-attention layers"):
        from crossattn_sd.steering import ProcessorSpec

        generate(film, PROMPT, seed=0, steps=2, processor=ProcessorSpec("reweight", weights=(("circle", 2.0),)))
    assert evaluate.main(["--model", "tiny-film", "--n", "2", "--steps", "4", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "map IoU: not defined: this model has no attention maps (FiLM" in printed
    assert "mean IoU" not in printed and "parameters: unet 2,329,156" in printed
