"""The joint-attention model's trainer (`train-tiny --model mmdit`): it trains on exactly the prompt embeddings the
pipeline makes, resumes exactly and exports a StableDiffusion3Pipeline that loads and generates."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from crossattn_sd.tiny import build, build_mmdit, train, train_mmdit

SMOKE = ["--model", "mmdit", "--arch", "2x64", "--steps", "4", "--batch-size", "4", "--pool-size", "8",
         "--threads", "1", "--log-every", "2", "--warmup", "2"]


def untrained_pipeline():
    torch.manual_seed(0)
    tokenizer = build.build_tokenizer()
    return build_mmdit.make_pipeline(build_mmdit.load_vae(), build_mmdit.build_text_encoder(len(tokenizer), 2),
                                     build_mmdit.build_text_encoder(len(tokenizer), 1),
                                     build_mmdit.build_transformer("2x64"), tokenizer)


def test_training_embeddings_are_the_pipelines_and_cuts_replace_by_the_empty_prompts():
    pipe = untrained_pipeline()
    texts = ["a red circle on the left and a blue square on the right", "a green triangle on the top"]
    embeds, pooled = train_mmdit.encode(pipe, texts)
    want, _, want_pooled, _ = pipe.encode_prompt(texts, None, None, do_classifier_free_guidance=False,
                                                 max_sequence_length=build_mmdit.MAX_SEQUENCE_LENGTH)
    assert torch.equal(embeds, want) and torch.equal(pooled, want_pooled)
    assert embeds.shape[1] == pipe.tokenizer.model_max_length  # no zero T5 tokens after the CLIP ones

    empty, empty_pooled = train_mmdit.encode(pipe, [""])
    ids = train.tokenize(pipe.tokenizer, texts)
    cut = torch.tensor([4, ids.shape[1]])  # the first caption cut after "a red circle", the second whole
    got, got_pooled = train_mmdit.encode(pipe, texts, ids, cut)
    torch.testing.assert_close(got[0, :4], want[0, :4])
    torch.testing.assert_close(got[0, 4:], empty[0, 4:])
    torch.testing.assert_close(got_pooled[0], empty_pooled[0])  # a cut caption's pooled embedding is dropped too
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got_pooled[1], want_pooled[1])


def test_flow_loss_falls_on_a_fixed_batch():
    pipe = untrained_pipeline()
    gen = torch.Generator().manual_seed(0)
    pool = train.Pool(pipe.vae, pipe.tokenizer, seed=0, size=8, p_two=0.7)
    idx, order, dropped = pool.draw(gen, 8, 0.0)
    texts = pool.captions(idx, order, dropped)
    assert torch.equal(train.tokenize(pipe.tokenizer, texts), pool.ids[idx, order])
    latents = pool.latents[idx] * pipe.vae.config.scaling_factor
    sigmas = train_mmdit.sample_sigmas(gen, 8, build_mmdit.SHIFT)
    noise = torch.randn(latents.shape, generator=gen)
    models = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    opt = torch.optim.AdamW([p for m in models for p in m.parameters()], lr=1e-3)

    def loss():
        return train_mmdit.flow_loss(pipe.transformer, *train_mmdit.encode(pipe, texts), latents, sigmas, noise)

    with torch.no_grad():
        before = loss().item()
    for _ in range(20):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.7 * before, (before, after)


def test_sigmas_are_shifted_logit_normal():
    sigmas = train_mmdit.sample_sigmas(torch.Generator().manual_seed(0), 20000, shift=3.0)
    assert 0 < sigmas.min() and sigmas.max() < 1
    # the median of u is 1/2 (logit-normal around 0), shifted: 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert abs(sigmas.median().item() - 0.75) < 0.01


def test_smoke_run_exports_a_loadable_sd3_pipeline(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    assert train.main(["--out", str(tmp_path / "run"), *SMOKE]) == 0  # train-tiny's own entry point
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "run" / "pipeline", text_encoder_3=None,
                                                    tokenizer_3=None)
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    assert pipe.vae.config.shift_factor == 0.0
    assert pipe.scheduler.config.shift == build_mmdit.SHIFT
    build.check_tokenizer(pipe.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a red circle on the left", "a blue square on the top and a green triangle on the bottom"],
                  num_inference_steps=2, guidance_scale=2.0, height=64, width=64,
                  max_sequence_length=build_mmdit.MAX_SEQUENCE_LENGTH,
                  generator=torch.Generator().manual_seed(0)).images
    assert [im.size for im in images] == [(64, 64), (64, 64)]


def test_resume_continues_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_mmdit.main(["--out", str(straight), *SMOKE]) == 0
    assert train_mmdit.main(["--out", str(split), *SMOKE, "--stop-after", "2"]) == 0
    assert torch.load(split / train.CHECKPOINT, weights_only=False)["step"] == 2
    assert train_mmdit.main(["--out", str(split), *SMOKE, "--resume"]) == 0
    a = torch.load(straight / train.CHECKPOINT, weights_only=False)
    b = torch.load(split / train.CHECKPOINT, weights_only=False)
    assert a["step"] == b["step"] == 4
    for key in ("transformer", "text_encoder", "text_encoder_2", "ema_transformer"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)


@pytest.mark.parametrize("argv", [["--model", "mmdit", "--help"], ["--help", "--model", "mmdit"]])
def test_help_lists_the_mmdit_flags(argv, capsys):
    with pytest.raises(SystemExit):
        train.main(argv)
    out = capsys.readouterr().out
    assert "--arch" in out and "--logit-mean" in out and "--grounding" not in out


def test_unet_help_is_unchanged_but_names_the_model_flag(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    assert "--grounding" in out and "--model" in out and "--arch" not in out


def test_bad_dropout_is_refused(tmp_path, capsys):
    assert train_mmdit.main(["--out", str(tmp_path / "r"), *SMOKE, "--prefix-dropout", "1.5"]) == 2
    assert "--prefix-dropout 1.5" in capsys.readouterr().err
