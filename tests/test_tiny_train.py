"""The tiny model's training loop: it learns, resumes exactly and exports a loadable pipeline."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from crossattn_sd.tiny import build, train

SMOKE = ["--steps", "4", "--vae-steps", "2", "--batch-size", "4", "--vae-batch-size", "2",
         "--pool-size", "16", "--threads", "1", "--log-every", "2"]


def untrained(p_two: float = 0.7):
    """Seeded untrained text encoder and UNet, and a pool of 8 scenes."""
    torch.manual_seed(0)
    tokenizer = build.build_tokenizer()
    vae = build.build_vae().eval().requires_grad_(False)
    text_encoder = build.build_text_encoder(len(tokenizer))
    unet = build.build_unet()
    return text_encoder, unet, train.Pool(vae, tokenizer, seed=0, size=8, p_two=p_two)


def test_diffusion_loss_falls_on_a_fixed_batch():
    text_encoder, unet, pool = untrained()
    gen = torch.Generator().manual_seed(0)
    latents, ids = pool.batch(gen, 8, dropout=0.0)
    latents = latents / pool.latents.std()
    scheduler = build.train_scheduler()
    t = torch.randint(0, 1000, (8,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)

    def loss():
        return train.diffusion_loss(unet, text_encoder, scheduler, latents, ids, t, noise)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    with torch.no_grad():
        before = loss().item()
    for _ in range(20):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.7 * before, (before, after)


def test_smoke_run_exports_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    assert train.main(["--out", str(tmp_path / "run"), *SMOKE]) == 0
    folder = tmp_path / "run" / "pipeline"
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    build.check_tokenizer(pipe.tokenizer)
    images = pipe(["a red circle on the left", "a blue square on the top and a green triangle on the bottom"],
                  num_inference_steps=2, guidance_scale=2.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()
    assert build.folder_size(folder) < 30e6


def test_resume_continues_exactly(tmp_path):
    assert train.main(["--out", str(tmp_path / "a"), *SMOKE]) == 0
    assert train.main(["--out", str(tmp_path / "b"), *SMOKE, "--stop-after", "2"]) == 0
    half = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert half["step"] == 2
    assert train.main(["--out", str(tmp_path / "b"), *SMOKE, "--resume"]) == 0
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for key in ("unet", "text_encoder", "ema_unet", "vae"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)


def test_context_dropout_replaces_only_the_states_from_end_of_text_on():
    torch.manual_seed(0)
    tokenizer = build.build_tokenizer()
    text_encoder = build.build_text_encoder(len(tokenizer)).eval()
    ids = train.tokenize(tokenizer, ["a red circle on the left", "a blue square on the top"])
    empty = train.tokenize(tokenizer, [""])[0]
    with torch.no_grad():
        plain = train.encode_text(text_encoder, ids)
        none = train.encode_text(text_encoder, ids, empty, 0.0)
        kept = train.encode_text(text_encoder, ids, empty, 1.0, torch.Generator().manual_seed(0))
        empty_states = text_encoder(empty[None])[0][0]
    torch.testing.assert_close(none, plain)
    for i in range(len(ids)):
        eos = int((ids[i] == text_encoder.config.eos_token_id).nonzero()[0])
        torch.testing.assert_close(kept[i, :eos], plain[i, :eos])  # the words' own states stay
        torch.testing.assert_close(kept[i, eos:], empty_states[eos:])  # end-of-text and padding: the empty prompt's
        assert not torch.allclose(plain[i, eos:], empty_states[eos:])


def test_prefix_dropout_cuts_captions_after_a_random_word():
    torch.manual_seed(0)
    tokenizer = build.build_tokenizer()
    text_encoder = build.build_text_encoder(len(tokenizer)).eval()
    captions = ["a red circle on the left and a blue square on the right"] * 200
    ids = train.tokenize(tokenizer, captions)
    empty = train.tokenize(tokenizer, [""])[0]
    eos = int((ids[0] == text_encoder.config.eos_token_id).nonzero()[0])
    with torch.no_grad():
        plain = train.encode_text(text_encoder, ids)
        cut = train.encode_text(text_encoder, ids, empty, 0.0, torch.Generator().manual_seed(0), prefix_dropout=1.0)
        empty_states = text_encoder(empty[None])[0][0]
    kept = (cut == plain).all(-1)  # (captions, positions)
    dropped = (cut == empty_states).all(-1)
    # every state is the caption's own or the empty prompt's (BOS is both: the encoder is causal)
    assert (kept ^ dropped)[:, 1:].all()
    lengths = kept.int().argmin(dim=1)  # each row: kept prefix, then dropped
    assert torch.equal(kept, torch.arange(ids.shape[1])[None] < lengths[:, None])
    # BOS and the first word always stay; every cut from after the first word to the end-of-text occurs
    assert set(lengths.tolist()) == set(range(2, eos + 1))
    half = train.encode_text(text_encoder, ids, empty, 0.0, torch.Generator().manual_seed(0), prefix_dropout=0.5)
    whole = (half == plain).all(-1).all(-1).float().mean()
    assert 0.35 < whole < 0.65, whole


def test_schedules_end_at_pure_noise():
    # zero terminal SNR: nothing of the image is left at t = T for the model to read the layout from
    assert float(build.train_scheduler().alphas_cumprod[-1]) == 0.0
    sampler = build.sample_scheduler()
    sampler.set_timesteps(20)
    assert int(sampler.timesteps[0]) == 999  # sampling starts at t = T ("trailing" spacing)


def test_init_from_starts_a_new_run_from_a_pipeline_folders_weights(tmp_path, capsys):
    assert train.main(["--out", str(tmp_path / "a"), *SMOKE]) == 0
    folder = tmp_path / "a" / "pipeline"
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    # no steps: what is saved is exactly what was loaded (the export holds the EMA weights)
    assert train.main(["--out", str(tmp_path / "b"), *SMOKE, "--init-from", str(folder), "--stop-after", "0"]) == 0
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert b["step"] == 0 and b["scaling_factor"] == a["scaling_factor"]
    for key, source in (("vae", "vae"), ("unet", "ema_unet"), ("ema_unet", "ema_unet"),
                        ("text_encoder", "ema_text_encoder")):
        for name, tensor in a[source].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    # then it trains
    assert train.main(["--out", str(tmp_path / "c"), *SMOKE, "--init-from", str(folder)]) == 0
    c = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)
    assert c["step"] == 4 and not all(torch.equal(t, c["unet"][n]) for n, t in a["ema_unet"].items())
    capsys.readouterr()
    assert train.main(["--out", str(tmp_path / "d"), *SMOKE, "--init-from", str(tmp_path), "--stop-after", "0"]) == 2
    assert "no model_index.json" in capsys.readouterr().err
    assert train.main(["--out", str(tmp_path / "a"), *SMOKE, "--init-from", str(folder), "--resume"]) == 2


def test_word_owners_point_each_object_word_at_its_object():
    from crossattn_sd.tiny.world import Scene, place

    tokenizer = build.build_tokenizer()
    scene = Scene((place("red", "circle", "left"), place("blue", "square", "right")))
    for order in ((0, 1), (1, 0)):
        ids = train.tokenize(tokenizer, [train.caption(scene, order)])[0]
        owners = train.word_owners(scene, order, len(ids))
        tokens = [t.removesuffix("</w>") for t in tokenizer.convert_ids_to_tokens(ids.tolist())]
        named = {j: {tokens[p] for p, o in enumerate(owners) if o == j} for j in (0, 1)}
        assert named == {0: {"red", "circle", "left"}, 1: {"blue", "square", "right"}}
        assert all(tokens[p] in ("a", "on", "the", "and", "<|startoftext|>", "<|endoftext|>")
                   for p, o in enumerate(owners) if o == -1)


def test_pool_grounding_batch_draws_the_same_batch():
    _, _, pool = untrained()
    assert pool.masks.shape == (8, train.MAX_OBJECTS, 16, 16) and pool.masks.max() <= 1
    # every object covers some of the latent, absent second objects nothing
    assert (pool.masks.sum((2, 3)) > 0).sum() == (pool.owners[:, 0].amax(1) + 1).sum()
    latents, ids = pool.batch(torch.Generator().manual_seed(1), 16, dropout=0.5)
    g_latents, g_ids, masks, owners, shapes = pool.batch(torch.Generator().manual_seed(1), 16, dropout=0.5,
                                                         grounding=True)
    assert torch.equal(latents, g_latents) and torch.equal(ids, g_ids)
    dropped = (ids == pool.empty).all(1)
    assert dropped.any() and (owners[dropped] == -1).all() and (owners[~dropped] >= 0).any(1).all()
    # each present object's shape, -1 where the scene has no second object
    assert torch.equal(shapes >= 0, masks.sum((2, 3)) > 0) and shapes.max() < len(train.SHAPES)


def test_grounding_loss_is_zero_for_a_map_spread_over_its_object():
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :2, :2] = 1  # object 0: top-left quarter
    masks[0, 1, 2:, 2:] = 0.5  # object 1: half of each bottom-right cell
    owners = torch.tensor([[-1, 0, 1]])
    probs = torch.zeros(1, 16, 3)
    probs[0, :, 0] = 1.0
    probs[0, :, 1] = masks[0, 0].flatten()
    probs[0, :, 2] = masks[0, 1].flatten() * 0.3  # the scale of a map does not matter
    assert train.grounding_loss([probs], masks, owners, (4, 4)).abs() < 1e-6
    # the same maps at half size: masks are pooled to the layer's size
    half = torch.nn.functional.avg_pool2d(probs.permute(0, 2, 1).reshape(1, 3, 4, 4), 2).flatten(2).permute(0, 2, 1)
    assert train.grounding_loss([probs, half], masks, owners, (4, 4)).abs() < 1e-6
    # a map on the wrong object, or spread everywhere, costs; unowned tokens (here 0) never do
    wrong = probs.clone()
    wrong[0, :, 1] = masks[0, 1].flatten()
    flat = probs.clone()
    flat[0, :, 1] = 1.0
    wrong_loss = train.grounding_loss([wrong], masks, owners, (4, 4))
    flat_loss = train.grounding_loss([flat], masks, owners, (4, 4))
    assert wrong_loss > flat_loss > 0
    assert abs(flat_loss.item() - np.log(16 / 4) / 2) < 1e-5  # KL(mask || flat) for one of the two tokens
    assert train.grounding_loss([probs], masks, torch.full_like(owners, -1), (4, 4)) == 0


def test_grounding_trains_the_maps_the_app_shows():
    """A few steps on the grounding loss alone move the tokens' maps onto their objects, through the capture
    processor in explicit mode (`record_attention`); prefix-cut tokens are not grounded."""
    text_encoder, unet, pool = untrained(p_two=1.0)
    latents, ids, masks, owners, _ = pool.batch(torch.Generator().manual_seed(0), 8, dropout=0.0, grounding=True)
    latents = latents / pool.latents.std()
    scheduler = build.train_scheduler()
    t = torch.full((8,), 500)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    recorder = train.TrainingAttention()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    before = unet.attn_processors
    with train.record_attention(unet, recorder):
        losses = []
        for _ in range(15):
            v_loss, g_loss, c_loss = train.training_loss(unet, text_encoder, scheduler, latents, ids, t, noise,
                                                         grounding=(recorder, masks, owners))
            assert len(recorder.maps) == len(unet.attn_processors) // 2  # every cross-attention layer, once
            opt.zero_grad()
            g_loss.backward()
            opt.step()
            losses.append(g_loss.item())
        # with every caption cut after its first word, nothing is grounded
        _, none, _ = train.training_loss(unet, text_encoder, scheduler, latents, ids, t, noise, empty=pool.empty,
                                      gen=torch.Generator().manual_seed(0), prefix_dropout=1.0,
                                      grounding=(recorder, masks, torch.where(owners == 0, owners, -1)))
    assert losses[-1] < 0.6 * losses[0], losses
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}
    assert 0 <= none.item() < losses[0]


def test_smoke_run_with_grounding_changes_what_is_learned(tmp_path, capsys):
    assert train.main(["--out", str(tmp_path / "run"), *SMOKE, "--grounding", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "grounding" in out
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 4 and ckpt["args"]["grounding"] == 0.1
    assert train.main(["--out", str(tmp_path / "plain"), *SMOKE]) == 0  # the same run without the loss
    plain = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(t, plain["vae"][n]) for n, t in ckpt["vae"].items())  # same VAE stage, same batches

    def moved(key):
        return max((t - plain[key][n]).abs().max().item() for n, t in ckpt[key].items())

    # Measured after 4 steps: 9.9e-5 (UNet) and 9.5e-5 (text encoder) apart. With the loss's weight forced to 0 the
    # runs still differ, by rounding alone (the grounding run computes attention explicitly): 1.5e-6 and 1.0e-7.
    assert moved("unet") > 2e-5 and moved("text_encoder") > 2e-5


def test_bad_dropout_or_grounding_values_are_refused(tmp_path, capsys):
    for flag, value, message in (("--prefix-dropout", "1.5", "--prefix-dropout 1.5: give a fraction from 0 to 1"),
                                 ("--caption-dropout", "-0.1", "--caption-dropout -0.1: give a fraction"),
                                 ("--grounding", "-1", "--grounding -1.0: give a weight >= 0"),
                                 ("--grounding", "nan", "--grounding nan: give a weight")):
        assert train.main(["--out", str(tmp_path / "run"), *SMOKE, flag, value]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_film_smoke_run_learns_the_shipped_vaes_latents_with_no_attention(tmp_path):
    """--model film: the same trainer with the FiLM UNet (no attention; the pooled text scales and shifts the ResNet
    features) on the shipped VAE, no VAE stage; the export is a plain StableDiffusionPipeline that reads the text."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    assert train.main(["--model", "film", "--out", str(tmp_path / "run"), *SMOKE]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert pipe.unet.attn_processors == {}
    assert pipe.unet.config.addition_embed_type == "text"
    assert pipe.unet.config.resnet_time_scale_shift == "scale_shift"
    shipped = AutoencoderKL.from_pretrained(train.FILM_VAE)
    assert pipe.vae.config.scaling_factor == shipped.config.scaling_factor
    assert all(torch.equal(v, shipped.state_dict()[k].float()) for k, v in pipe.vae.state_dict().items())
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    out = {}
    for prompt in ("a red circle on the left", "a blue square on the right"):
        image = pipe(prompt, num_inference_steps=2, guidance_scale=2.0, latents=latents, output_type="np").images
        out[prompt] = image
    assert not np.array_equal(*out.values())  # the text reaches the UNet


def test_film_refuses_grounding(tmp_path, capsys):
    for flag in ("--grounding", "--concept-grounding"):
        assert train.main(["--model", "film", "--out", str(tmp_path / "run"), *SMOKE, flag, "0.1"]) == 2
        assert f"{flag} 0.1: --model film has no cross-attention maps to ground" in capsys.readouterr().err


def test_concept_grounding_targets_the_union_of_a_shapes_objects():
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :2, :2] = 1  # two objects of the same shape (concept 2): its target is both
    masks[0, 1, 2:, 2:] = 1
    shapes = torch.tensor([[2, 2]])
    probs = torch.full((1, 16, 3), 0.1)
    probs[0, :, 2] = (masks[0, 0] + masks[0, 1]).flatten()
    assert train.concept_grounding([probs], masks, shapes, (4, 4)).abs() < 1e-6
    one = probs.clone()
    one[0, :, 2] = masks[0, 0].flatten()  # only one of them: KL(union || one object) is infinite-ish, clamped
    assert train.concept_grounding([one], masks, shapes, (4, 4)) > 1
    # shapes absent from the scene (concepts 0 and 1 here) and absent objects (-1) are never grounded
    assert train.concept_grounding([probs], masks, torch.tensor([[2, -1]]), (4, 4)) > 0
    assert train.concept_grounding([probs], masks, torch.tensor([[-1, -1]]), (4, 4)) == 0


def test_concept_grounding_trains_the_concept_maps_the_app_shows():
    """The shape names encoded alone ("a triangle") attend on the side through the capture processor's concept
    path (`record_concepts`, with gradients); a few steps on that loss alone move their maps onto the objects of
    their shape and reach the text encoder through the concepts' encoding; the images' own attention is the
    same either way (the concepts are on the side)."""
    text_encoder, unet, pool = untrained(p_two=1.0)
    latents, ids, masks, owners, shapes = pool.batch(torch.Generator().manual_seed(0), 8, dropout=0.0,
                                                     grounding=True)
    latents = latents / pool.latents.std()
    scheduler = build.train_scheduler()
    t = torch.full((8,), 500)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    concepts = train.TrainingConcepts(build.build_tokenizer())
    assert concepts.names == list(train.SHAPES) and concepts.positions == [(2,), (2,), (2,)]  # "a", then the word
    recorder, plain = train.TrainingAttention(concepts), train.TrainingAttention()
    with train.record_attention(unet, plain):
        train.training_loss(unet, text_encoder, scheduler, latents, ids, t, noise, grounding=(plain, masks, owners))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    with train.record_attention(unet, recorder):
        losses = []
        for step in range(15):
            v_loss, g_loss, c_loss = train.training_loss(unet, text_encoder, scheduler, latents, ids, t, noise,
                                                         grounding=(recorder, masks, owners, shapes))
            n_layers = len(unet.attn_processors) // 2
            assert len(recorder.maps) == len(concepts.maps) == n_layers
            assert concepts.maps[0].shape == (8, recorder.maps[0].shape[1], 3)
            if step == 0:
                assert all(torch.equal(a, b) for a, b in zip(recorder.maps, plain.maps))
            opt.zero_grad()
            c_loss.backward()
            if step == 0:
                embedding = text_encoder.get_input_embeddings().weight.grad
                shape_ids = concepts.ids[:, 2]
                assert embedding[shape_ids].abs().sum(1).min() > 0  # each shape name's own embedding learns
            opt.step()
            losses.append(c_loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_smoke_run_with_concept_grounding_logs_it_and_changes_what_is_learned(tmp_path, capsys):
    assert train.main(["--out", str(tmp_path / "run"), *SMOKE, "--grounding", "0.1",
                       "--concept-grounding", "0.5"]) == 0
    assert " concepts " in capsys.readouterr().out
    assert train.main(["--out", str(tmp_path / "words"), *SMOKE, "--grounding", "0.1"]) == 0
    ckpt, words = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=False) for r in ("run", "words"))
    assert ckpt["args"]["concept_grounding"] == 0.5
    assert max((v - words["text_encoder"][n]).abs().max().item() for n, v in ckpt["text_encoder"].items()) > 2e-5
