"""The CLI refuses bad arguments before the model loads, reports dropped words once, and names words a
closed-vocabulary model never saw (issue: what a new user trips over)."""
import logging
import warnings

import pytest

import crossattn_sd.pipeline as pipeline
from crossattn_sd.cli import build_parser, main
from crossattn_sd.config import ModelPreset, load_presets
from crossattn_sd.tokens import VocabularyWarning, unknown_words, vocabulary_note


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(pipeline, "load_pipeline", refuse)


def test_an_empty_prompt_is_refused_before_the_model_loads(no_model_load, tmp_path, capsys):
    for command in ("generate", "compare"):
        assert main([command, "  ", "--out", str(tmp_path)]) == 2
        assert "the prompt is empty" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--weights", "red:2"], "--weights applies to --processor reweight only (got --processor capture)"),
    (["--processor", "edit", "--edit-prompt", "a blue circle", "--weights", "red:2"],
     "--weights applies to --processor reweight only (got --processor edit)"),
    (["--processor", "reweight", "--weights", "red:2", "--edit-prompt", "a blue circle"],
     "--edit-prompt applies to --processor edit only (got --processor reweight)"),
    (["--processor", "reweight", "--weights", "red"], "bad weight 'red'"),
    (["--processor", "reweight"], "the reweight processor needs weights"),
    (["--processor", "edit", "--edit-prompt", "a blue circle", "--inject", "2"], "inject=2.0 is out of range"),
    (["--steps", "0"], "steps=0 is out of range"),
    (["--alpha", "1.5"], "alpha=1.5 is out of range"),
    (["--cmap", "nope"], "unknown --cmap 'nope'"),
    (["--scheduler", "nope"], "unknown --scheduler 'nope'"),
])
def test_bad_arguments_fail_before_the_model_loads(no_model_load, tmp_path, capsys, extra, message):
    for command in ("generate", "compare"):
        assert main([command, "a red circle", "--out", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("crossattn-sd: error:") and err.count("\n") == 1


def test_compare_defaults_to_the_capture_baseline_like_the_web_ui():
    args = build_parser().parse_args(["compare", "a red circle", "--out", "x"])
    assert args.processor_a == "capture"


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_dropped_words_are_reported_once_in_words(sd_pipe_dir, tmp_path, capsys):
    long_prompt = "a red square on the left and a blue circle"  # "circle" is cut by the tiny 16-token limit
    records = Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]  # the libraries' root loggers
    for logger in loggers:
        logger.addHandler(records)
    try:
        assert main(["generate", long_prompt, "--out", str(tmp_path), "--model", str(sd_pipe_dir), "--steps", "1",
                     "--height", "16", "--width", "16", "--quiet"]) == 0
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    err = capsys.readouterr().err
    assert err.count("dropped") == 1 and "dropped: circle" in err
    # Diffusers' "The following part of your input was truncated ..." and transformers' "Token indices sequence
    # length is longer ..." (both print in sub-tokens) are held back
    assert not [m for m in records.messages if "truncated" in m or "sequence length" in m], records.messages


# -- closed vocabularies ------------------------------------------------------------------------------------


def test_the_embedded_presets_vocabulary_is_the_worlds_caption_words():
    from crossattn_sd.tiny.build import CAPTION_WORDS

    for name in ("tiny", "tiny-mmdit"):
        assert load_presets()[name].vocabulary == CAPTION_WORDS, name


def test_unknown_words_are_named_with_the_words_the_model_knows():
    vocab = ("a", "red", "circle", "on", "the", "left")
    assert unknown_words("a purple dog on the Moon, a red circle", vocab) == ["purple", "dog", "moon"]
    assert unknown_words("A red circle on the left", vocab) == []
    assert unknown_words("anything at all", ()) == []  # open vocabulary: no check
    note = vocabulary_note(["a red circle", "a big circle"], vocab)
    assert note == ("this model was trained on a closed vocabulary and never saw 'big'; it knows: a, red, circle, "
                    "on, the, left")
    assert vocabulary_note(["a red circle", None], vocab) is None


def test_a_yaml_boolean_in_a_vocabulary_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="quote words"):
        ModelPreset(name="x", source="x", vocabulary=("a", True))


def test_the_cli_names_unknown_words_before_the_model_loads(no_model_load, tmp_path, capsys):
    with pytest.raises(AssertionError, match="model was loaded"):  # the note comes first, then the load
        main(["generate", "a purple dog on the left", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "note: this model was trained on a closed vocabulary and never saw 'purple', 'dog'" in err


@pytest.fixture(scope="module")
def tiny_pipe():
    return pipeline.load_pipeline()


def test_generate_warns_of_unknown_words_on_the_embedded_model(tiny_pipe):
    with pytest.warns(VocabularyWarning, match="never saw 'big', 'shiny'"):
        pipeline.generate(tiny_pipe, "a big shiny red circle on the left", steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", VocabularyWarning)
        pipeline.generate(tiny_pipe, "a red circle on the left", steps=1)  # every word known: no warning


def test_generate_names_unknown_words_of_an_edit_prompt(tiny_pipe):
    from crossattn_sd import ProcessorSpec

    spec = ProcessorSpec("edit", edit_prompt="a green dog on the left")
    with pytest.warns(VocabularyWarning, match="never saw 'dog'"):
        pipeline.generate(tiny_pipe, "a red circle on the left", steps=1, processor=spec)


def test_the_service_names_unknown_words_for_the_ui():
    from crossattn_sd.service import AttentionService, GenerateRequest

    service = AttentionService(load_presets()["tiny"], pipe=object())  # the note needs no model
    assert "never saw 'dog'" in service.vocabulary_note(GenerateRequest(prompt="a red dog"))
    assert service.vocabulary_note(GenerateRequest(prompt="a red circle")) is None
    edit = GenerateRequest(prompt="a red circle", processor="edit", edit_prompt="a red cat")
    assert "never saw 'cat'" in service.vocabulary_note(edit)
    # the edit prompt of a request whose processor is not edit is not used, so it is not checked
    assert service.vocabulary_note(GenerateRequest(prompt="a red circle", edit_prompt="a red cat")) is None


def test_app_py_help_names_itself(capsys):
    """`python app.py --help` says `python app.py`, not `crossattn-sd serve`."""
    with pytest.raises(SystemExit):
        main(["serve", "--help"], serve_prog="python app.py")
    out = capsys.readouterr().out
    assert out.startswith("usage: python app.py [-h]") and "--outputs" in out
