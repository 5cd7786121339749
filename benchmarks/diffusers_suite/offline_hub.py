"""Offline stand-ins for the Hub repositories Diffusers' fast pipeline tests load, built locally and saved.

Diffusers' fast tests build random-weight models from configs but load a few tokenizers (and one config) from
the Hub. Under HF_HUB_OFFLINE=1 `redirect(folder)` points `from_pretrained` of those ids at local copies:

- `hf-internal-testing/tiny-random-clip` (SD, SDXL, SD3, Flux): a CLIP BPE tokenizer over single characters plus
  a few whole words (ids below the tests' vocab_size of 1000, model_max_length 77).
- `hf-internal-testing/tiny-random-t5` (SD3's third and Flux's second text encoder): the tiny T5 config (d_model
  32, as the tests' `joint_attention_dim`) and a sentencepiece-style Unigram T5 tokenizer over the same words and
  single letters.
- `hf-internal-testing/tiny-random-Qwen2VLForConditionalGeneration` (FLUX.2 [klein]): a byte-level BPE Qwen2
  tokenizer with `<|im_start|>`/`<|im_end|>` and a Qwen3-style chat template (`enable_thinking`).

Not stood in: FLUX.2 [dev]'s `hf-internal-testing/Mistral-Small-3.1-24B-Instruct-2503-only-processor`, a
`PixtralProcessor`, which transformers builds only with torchvision (not installed here): Diffusers'
`tests/pipelines/flux2/test_pipeline_flux2.py` cannot run in this environment.

Token ids differ from the Hub's, so expected pixel slices differ from Diffusers' references: compare the SETS of
passing tests of two runs, not the runs with Diffusers' published results.
"""

from __future__ import annotations

from pathlib import Path

TINY_CLIP = "hf-internal-testing/tiny-random-clip"
TINY_T5 = "hf-internal-testing/tiny-random-t5"
TINY_QWEN = "hf-internal-testing/tiny-random-Qwen2VLForConditionalGeneration"
CLIP_WORDS = ["a", "painting", "of", "squirrel", "eating", "burger", "the", "and", "photo", "cat"]  # as last session
WORDS = CLIP_WORDS + ["dog", "is", "dancing"]

# The tiny T5 of hf-internal-testing/tiny-random-t5 (its published config.json's sizes).
T5_CONFIG = dict(vocab_size=1103, d_model=32, d_kv=8, d_ff=37, num_layers=5, num_decoder_layers=5, num_heads=4,
                 relative_attention_num_buckets=8, dropout_rate=0.1, pad_token_id=0, eos_token_id=1,
                 decoder_start_token_id=0)

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

def tiny_clip_tokenizer(max_length: int = 77):
    """A CLIP BPE tokenizer over single characters plus a few whole words (ids < 200), saved-and-loadable."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in CLIP_WORDS:  # left-to-right merges: "c a" -> "ca", "ca t</w>" -> "cat</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            if (a, b) not in merges:
                merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
            pieces = [a + b] + pieces[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, unk_token="<|endoftext|>",
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_t5_tokenizer(max_length: int = 512):
    """A T5 (sentencepiece Unigram) tokenizer: whole-word pieces with the "\u2581" prefix, letters as fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?'-"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in letters] + [("\u2581" + c, -5.0) for c in letters]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def _byte_level(specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary: `specials` first, the 256 byte symbols, and merges spelling out WORDS."""
    from tokenizers import pre_tokenizers

    vocab = {s: i for i, s in enumerate(specials)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    merges = []
    for word in WORDS:  # "\u0120" is the byte-level space: words after a space are "\u0120word"
        for spelled in (word, "\u0120" + word):
            pieces = list(spelled)
            while len(pieces) > 1:
                a, b = pieces[0], pieces[1]
                if (a, b) not in merges:
                    merges.append((a, b))
                vocab.setdefault(a + b, len(vocab))
                pieces = [a + b] + pieces[2:]
    return vocab, merges


def tiny_qwen_tokenizer():
    """A Qwen2 byte-level BPE tokenizer with Qwen's chat tokens and a chat template that knows `enable_thinking`."""
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    vocab, merges = _byte_level(specials)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
    tokenizer.chat_template = QWEN_TEMPLATE
    return tokenizer


def build(folder: Path) -> dict[str, str]:
    """Save every stand-in under `folder`; returns {Hub id: local folder}."""
    from transformers import T5Config

    folder = Path(folder)
    made = {}
    for repo, save in ((TINY_CLIP, lambda p: tiny_clip_tokenizer().save_pretrained(p)),
                       (TINY_T5, lambda p: (tiny_t5_tokenizer().save_pretrained(p),
                                            T5Config(**T5_CONFIG).save_pretrained(p))),
                       (TINY_QWEN, lambda p: tiny_qwen_tokenizer().save_pretrained(p))):
        path = folder / repo.replace("/", "--")
        save(path)
        made[repo] = str(path)
    return made


def redirect(folder: Path) -> None:
    """Build the stand-ins under `folder` and point `from_pretrained(<Hub id>)` of tokenizers and
    configs at them (test-run only; the crossattn-sd package never patches anything)."""
    from transformers import AutoConfig, AutoTokenizer, PretrainedConfig
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    local = build(folder)
    for owner in (PreTrainedTokenizerBase, AutoTokenizer, PretrainedConfig, AutoConfig):
        _redirect(owner, local)


def _redirect(owner, local: dict[str, str]) -> None:
    original = owner.__dict__["from_pretrained"].__func__  # a classmethod

    def from_pretrained(cls, name, *args, **kwargs):
        if isinstance(name, str) and name in local:
            name = local[name]
            kwargs.pop("subfolder", None)
        return original(cls, name, *args, **kwargs)

    owner.from_pretrained = classmethod(from_pretrained)
