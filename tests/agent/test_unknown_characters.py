"""Characters a tokenizer does not know (issue item 11): the demo tokenizer is byte-level, so
any UTF-8 text has ids; a tokenizer that maps characters to its unknown / pad / eos token gets a
warning naming the share and a row, and is refused above 5%."""
import re
import warnings

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from evo_sft.data import tokenize_split
from evo_sft.data.demo import SPECIAL_TOKENS, build_tokenizer, demo_dataset, write_demo_model
from evo_sft.data.sources import DataError, load_tokenizer

TEXT = "reverse: caf\u00e9 na\u00efve \u65e5\u672c \U0001f642 A-Z!?\t\n"  # accents, CJK, an emoji, ASCII
KNOWN = "abcdefghijklmnopqrstuvwxyz :"


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_the_demo_tokenizer_round_trips_any_utf8_text_and_keeps_pad_equal_to_eos(chat):
    tok = build_tokenizer(chat_template=chat)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) == len(TEXT.encode("utf-8"))  # one token per byte
    assert tok.decode(ids) == TEXT
    assert tok.eos_token_id not in ids and tok.pad_token_id == tok.eos_token_id
    assert bool(tok.chat_template) == chat
    ascii_text = "reverse: abcdefghij 0123\n"  # the demo task: a token per character
    assert [tok.decode([i]) for i in tok.encode(ascii_text, add_special_tokens=False)] == list(ascii_text)


def test_the_saved_demo_tokenizer_loads_back_the_same(tmp_path):
    tok = build_tokenizer()
    loaded = load_tokenizer(str(write_demo_model(tmp_path / "demo")))
    assert loaded.encode(TEXT) == tok.encode(TEXT)
    assert loaded.pad_token_id == loaded.eos_token_id == tok.eos_token_id
    assert loaded.chat_template == tok.chat_template


def test_non_ascii_rows_train_without_warnings(dataset):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = tokenize_split(dataset([TEXT, "abc"], ["\u00e9t\u00e9", "cba"]), build_tokenizer(), "train",
                               "prompt", "response", max_length=None)
    assert len(split) == 2 and not [w for w in caught if "unknown" in str(w.message)]


def _character_tokenizer() -> PreTrainedTokenizerFast:
    """The demo's old tokenizer: one token per known character; anything else becomes the unknown
    token, which is also eos and pad."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(KNOWN))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _unknown_share(prompts, responses) -> tuple[int, int]:
    text = "".join(prompts + responses)
    return sum(c not in KNOWN for c in text), len(text)


def test_a_few_unknown_characters_warn_with_the_share_and_the_first_row(dataset):
    rows = demo_dataset(40, seed=0)
    prompts, responses = list(rows["prompt"]), list(rows["response"])
    prompts[7] = "reverse: caf\u00e9"
    responses[9] = "\u00e9fac"
    unknown, total = _unknown_share(prompts, responses)
    assert unknown == 2 and unknown / total < 0.05
    with pytest.warns(UserWarning, match="unknown") as caught:
        split = tokenize_split(dataset(prompts, responses), _character_tokenizer(), "train", "prompt", "response",
                               max_length=None)
    (message,) = [str(w.message) for w in caught if "unknown" in str(w.message)]
    assert message.startswith(f"train: {unknown} of {total} tokens ({unknown / total:.1%})")
    assert message.endswith("first at train row 7: 'reverse: caf\u00e9'")
    assert len(split) == 40


def test_many_unknown_characters_are_refused(dataset):
    prompts, responses = ["reverse: ABC", "reverse: abc"], ["CBA", "cba"]
    unknown, total = _unknown_share(prompts, responses)
    assert unknown / total > 0.05
    with pytest.raises(DataError, match=re.escape(f"train: {unknown} of {total} tokens ({unknown / total:.1%})")
                       + r".*first at train row 0: 'reverse: ABC'; more than 5% is refused"):
        tokenize_split(dataset(prompts, responses), _character_tokenizer(), "train", "prompt", "response", None)
