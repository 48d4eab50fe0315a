"""No row is lost to a merge across the prompt/response boundary (issue item 10).

A byte-level BPE trained here on the demo task merges across that boundary, as real BPE
tokenizers do on plain text. Every row is kept, and its ids are checked against `reference.ids`
(conftest), which tokenises the prompt (or the hand-written generation prompt) and the response
separately. A chat template that renders the prompt differently inside the conversation drops
the row and names its file and line."""
import json
import warnings

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from evo_sft import SFTGym
from evo_sft.config import DataConfig
from evo_sft.data import IGNORE_INDEX, tokenize_split
from evo_sft.data.demo import CHAT_TEMPLATE, SPECIAL_TOKENS, demo_dataset
from evo_sft.data.sources import load_splits


@pytest.fixture(scope="module")
def bpe():
    """`bpe(chat_template)`: a byte-level BPE (400 tokens, pad == eos) trained on demo rows as
    plain text and as conversations, with no pre-tokenizer splits, so merges span the boundary."""
    rows = demo_dataset(500, seed=0)
    texts = [p + r for p, r in zip(rows["prompt"], rows["response"])]
    texts += [f"user\n{p}\nassistant\n{r}\n" for p, r in zip(rows["prompt"], rows["response"])]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))

    def make(chat_template: bool) -> PreTrainedTokenizerFast:
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        if chat_template:
            tok.chat_template = CHAT_TEMPLATE
        return tok

    return make


def _prefix_breaks(tok, chat: bool, prompts, responses) -> int:
    """How many rows tokenise the prompt differently inside the whole text (by hand)."""
    count = 0
    for prompt, response in zip(prompts, responses):
        if chat:
            prompt = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
            response = f"{response}<|im_end|>\n"
        alone = tok.encode(prompt, add_special_tokens=False)
        count += tok.encode(prompt + response, add_special_tokens=False)[: len(alone)] != alone
    return count


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_a_merge_across_the_boundary_loses_no_row(bpe, chat, dataset, reference):
    tok = bpe(chat)
    rows = demo_dataset(200, seed=1)
    prompts, responses = list(rows["prompt"]), list(rows["response"])
    assert _prefix_breaks(tok, chat, prompts, responses) >= 10, "the tokenizer must merge across the boundary"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = tokenize_split(dataset(prompts, responses), tok, "train", "prompt", "response", max_length=None)
    assert not [str(w.message) for w in caught if str(w.message).startswith("train:")]  # nothing dropped
    assert split.source_rows == list(range(200))
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        ids, prompt_len = reference.ids(tok, prompt, response)
        assert split.input_ids[row] == ids, row
        assert split.prompt_lengths[row] == prompt_len, row
        assert tok.decode(ids[prompt_len:], skip_special_tokens=True).strip() == response


def test_plain_text_labels_cover_the_response_and_the_final_eos_equal_to_pad(bpe, dataset, reference):
    tok = bpe(False)
    assert tok.pad_token_id == tok.eos_token_id
    prompts, responses = ["reverse: abc", "reverse: ab"], ["cba", "ba"]
    assert _prefix_breaks(tok, False, prompts, responses) == 2
    gym = SFTGym(dataset(prompts, responses), dataset(prompts, responses), tok)
    (batch,) = gym.test_batches(batch_size=2)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        ids, prompt_len = reference.ids(tok, prompt, response)
        labels = batch["labels"][i]
        assert (labels[:prompt_len] == IGNORE_INDEX).all()
        assert labels[prompt_len: len(ids)].tolist() == ids[prompt_len:]
        assert labels[len(ids) - 1] == tok.eos_token_id  # pitfall 1
        assert (labels[len(ids):] == IGNORE_INDEX).all()


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_a_boundary_token_keeps_one_bos_and_supervises_the_end(chat, dataset, make_gym, make_bos_tokenizer, reference):
    """An added token spanning the boundary ('ab' for plain text; newline + 'x' after the
    generation prompt's final newline) takes the fallback path for chat templates."""
    tok = make_bos_tokenizer(chat_template=chat)
    tok.add_tokens(["\nx"] if chat else ["ab"])
    prompts, responses = ["one", "xa" if not chat else "hi", "three"], ["a", "bc" if not chat else "xy", "c"]
    gym = make_gym(dataset(prompts, responses), tokenizer_=tok)
    assert gym.train.source_rows == [0, 1, 2]
    (batch,) = gym.test_batches(batch_size=3)
    end = tok.convert_tokens_to_ids("<|im_end|>") if chat else tok.eos_token_id
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        ids, prompt_len = reference.ids(tok, prompt, response)
        row = batch["input_ids"][i]
        assert row[: len(ids)].tolist() == ids
        assert int((row == tok.bos_token_id).sum()) == 1  # pitfall 3
        assert batch["labels"][i, prompt_len:len(ids)].tolist() == ids[prompt_len:]
        assert end in batch["labels"][i].tolist()


def test_a_chat_template_that_renders_the_prompt_differently_drops_the_row_naming_its_line(tmp_path, bpe):
    """A template whose generation prompt opens a block the conversation does not have (as
    reasoning templates do for some prompts): the rendered prompt is not the start of the
    rendered conversation, so the row cannot be split into prompt and response."""
    tok = bpe(True)
    tok.chat_template = CHAT_TEMPLATE.replace(
        "<|im_start|>assistant\n{% endif %}",
        "<|im_start|>assistant\n{% if '?' in messages[-1]['content'] %}<think>\n{% endif %}{% endif %}")
    lines = [json.dumps({"prompt": f"reverse: {w}", "response": w[::-1]}) for w in ("abc", "dea", "fgh", "bdi", "ceg")]
    lines.insert(2, "")
    lines.insert(4, json.dumps({"prompt": "reverse: abc?", "response": "cba"}))  # line 5
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    splits = load_splits(DataConfig(source=str(path), test_size=2), seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = [len(tokenize_split(part, tok, name, "prompt", "response", max_length=None))
                for name, part in zip(("train", "test"), splits)]
    (message,) = [str(w.message) for w in caught if "renders differently" in str(w.message)]
    assert "dropped 1 rows" in message and message.endswith(f"{path} line 5")
    assert sum(kept) == 5
