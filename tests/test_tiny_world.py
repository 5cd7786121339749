"""The shapes world, its pixel judge, the held-out split and the closed-vocabulary tokenizer."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from crossattn_sd.tiny import world
from crossattn_sd.tiny.judge import judge
from crossattn_sd.tiny.world import (AXES, COLOURS, HALF_MAX, HALF_MIN, POSITIONS, SHAPES, Scene,
                                     all_two_object_kinds, caption, object_mask, place, render,
                                     sample_scene)


def test_render_is_flat_palette_and_objects_stay_in_their_half():
    rng = np.random.default_rng(0)
    palette = {world.BACKGROUND, *COLOURS.values()}
    for _ in range(200):
        scene = sample_scene(rng)
        img = render(scene)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert {tuple(c) for c in img.reshape(-1, 3)} <= palette
        for obj in scene.objects:
            ys, xs = np.nonzero(object_mask(obj, 64))
            assert {"left": xs.max() < 32, "right": xs.min() >= 32,
                    "top": ys.max() < 32, "bottom": ys.min() >= 32}[obj.position]


def test_captions():
    scene = Scene((place("red", "circle", "left"), place("blue", "square", "right")))
    assert caption(scene) == "a red circle on the left and a blue square on the right"
    assert caption(scene, (1, 0)) == "a blue square on the right and a red circle on the left"


def test_judge_accepts_every_ground_truth_scene():
    rng = np.random.default_rng(1)
    kinds = all_two_object_kinds()
    assert len(kinds) == 288
    for pair in kinds:
        for _ in range(2):
            scene = Scene(tuple(place(*o, rng=rng) for o in pair))
            assert judge(render(scene), scene).ok, pair
    for half in (HALF_MIN, HALF_MAX, None):
        for c in COLOURS:
            for s in SHAPES:
                for p in POSITIONS:
                    scene = Scene((place(c, s, p, rng=rng, half=half),))
                    assert judge(render(scene), scene).ok, (c, s, p, half)


def test_evaluation_masks_are_exact_on_ground_truth():
    """The evaluation segments each object from the image by colour within its half: on a rendered scene that
    is the object's true mask, pixel for pixel, and a map equal to that mask scores IoU 1 (the other object 0)."""
    from crossattn_sd.tiny import evaluate

    rng = np.random.default_rng(3)
    for pair in all_two_object_kinds()[::7]:
        scene = Scene(tuple(place(*o, rng=rng) for o in pair))
        img = render(scene)
        for i, obj in enumerate(scene.objects):
            mask = evaluate.object_mask(img, obj.colour, obj.position)
            assert np.array_equal(mask, object_mask(obj, 64)), pair
            heat = mask.astype(np.float32) * 0.9 + 0.05
            assert evaluate.iou(evaluate.region(heat), mask) == 1.0
            assert evaluate.iou(evaluate.region(heat), object_mask(scene.objects[1 - i], 64)) == 0.0


def test_judge_rejects_negatives():
    rng = np.random.default_rng(2)
    for _ in range(100):
        a, b = rng.choice(list(COLOURS), 2, replace=False)
        s1, s2 = rng.choice(SHAPES, 2)
        p1, p2 = AXES[rng.integers(2)]
        truth = Scene((place(a, s1, p1, rng), place(b, s2, p2, rng)))
        img = render(truth)
        assert judge(img, truth).ok
        # colours swapped between the objects
        assert not judge(img, [(b, s1, p1), (a, s2, p2)]).ok
        # wrong shape for one object
        other = [s for s in SHAPES if s != s1][rng.integers(2)]
        assert not judge(img, [(a, other, p1), (b, s2, p2)]).ok
        # both objects in the wrong halves
        assert not judge(img, [(a, s1, p2), (b, s2, p1)]).ok
        # one object asked for, two drawn: the extra one is caught
        assert not judge(img, [(a, s1, p1)]).ok
    blank = render(Scene(()))
    assert not judge(blank, [("red", "circle", "left")]).ok


def test_heldout_is_fixed_balanced_and_never_sampled():
    held = world.HELDOUT
    assert len(held) == 36 and len(held) / 288 >= 0.10
    assert held == frozenset(tuple(map(tuple, p)) for p in world.make_heldout())
    assert sum(p[0][2] == "left" for p in held) == sum(p[0][2] == "top" for p in held) == 18
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(8000):
        scene = sample_scene(rng)
        assert scene.kind not in held
        # the same scene captioned in the other order is the same kind
        assert Scene(tuple(reversed(scene.objects))).kind == scene.kind
        seen.add(scene.kind)
    assert len(seen) >= 288 - 36  # every training two-object type does come up


@pytest.fixture(scope="module")
def tokenizer():
    from crossattn_sd.tiny.build import build_tokenizer
    return build_tokenizer()


def test_tokenizer_one_token_per_word(tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    from crossattn_sd.tiny.build import CAPTION_WORDS, check_tokenizer
    check_tokenizer(tokenizer)
    text = "a yellow triangle on the bottom and a green circle on the top"
    ids = tokenizer(text).input_ids
    assert len(ids) == len(text.split()) + 2
    assert tokenizer.convert_ids_to_tokens(ids)[1:-1] == [w + "</w>" for w in text.split()]
    assert set(CAPTION_WORDS) >= {"left", "right", "top", "bottom", "and"}
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    check_tokenizer(reloaded)
    assert reloaded(text).input_ids == ids


def test_tokenizer_survives_unknown_words(tokenizer):
    ids = tokenizer("a purple hexagon on the left ☃ 7", padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 20
    assert tokenizer.unk_token_id in ids
