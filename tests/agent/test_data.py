"""SFTGym and DataStream: masking, padding, truncation, bad input, deterministic streams."""
import re
import warnings

import pytest
import torch

from evo_sft import SFTGym
from evo_sft.data import IGNORE_INDEX, DataStream
from evo_sft.data.demo import build_tokenizer

PROMPTS = ["reverse: abc", "q", "reverse: hello world", "hi"]
RESPONSES = ["cba", "a longer answer 123", "x", "ok"]


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_labels_cover_exactly_the_response_and_its_end_token(chat, dataset, make_gym, reference):
    tok = build_tokenizer(chat_template=chat)
    assert tok.pad_token_id == tok.eos_token_id  # pitfall 1: the case that breaks id-based masking
    data = dataset(PROMPTS, RESPONSES)
    gym = make_gym(data, tokenizer_=tok)
    (batch,) = gym.test_batches(batch_size=len(PROMPTS))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        ids, prompt_len = reference.ids(tok, prompt, response)
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == ids  # prompt ids are a prefix of the full ids
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        labels = batch["labels"][i]
        assert (labels[:prompt_len] == IGNORE_INDEX).all(), "prompt tokens must never be labelled"
        assert labels[prompt_len:n].tolist() == ids[prompt_len:], "every response token is labelled"
        assert (labels[n:] == IGNORE_INDEX).all(), "padding must never be labelled"
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        if chat:
            # the <|im_end|> that closes the assistant turn is supervised
            last_im_end = max(t for t in range(n) if ids[t] == im_end)
            assert last_im_end >= prompt_len and labels[last_im_end] == im_end
        else:
            # the final eos (== pad) of the response is supervised
            assert ids[-1] == tok.eos_token_id and labels[n - 1] == tok.eos_token_id
    # at least one row is padded with the eos id, so a mask by token id would have shown up
    assert (batch["attention_mask"] == 0).any()


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_training_batches_are_right_padded_and_masked_by_position(chat, dataset, make_gym):
    tok = build_tokenizer(chat_template=chat)
    gym = make_gym(dataset(PROMPTS, RESPONSES), tokenizer_=tok, data_batch_size_per_gpu=4)
    batch = gym.reset()
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any(), "right padding: ones then zeros"
        assert (ids[n:] == tok.pad_token_id).all()
        assert (labels[n:] == IGNORE_INDEX).all()
        assert labels[n - 1] != IGNORE_INDEX, "the last real token (eos / end of turn) is labelled"
        supervised = labels != IGNORE_INDEX
        assert torch.equal(labels[supervised], ids[supervised])
        # supervised positions form one contiguous block ending at the last real token
        first = int(supervised.nonzero()[0])
        assert supervised[first:n].all() and first > 0


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_no_double_bos(chat, dataset, make_gym, make_bos_tokenizer, reference):
    tok = make_bos_tokenizer(chat_template=chat)
    bos = tok.bos_token_id
    assert tok("abc")["input_ids"][0] == bos  # the post-processor really adds one
    gym = make_gym(dataset(PROMPTS, RESPONSES), tokenizer_=tok)
    (batch,) = gym.test_batches(batch_size=len(PROMPTS))
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        ids, prompt_len = reference.ids(tok, prompt, response)
        row = batch["input_ids"][i]
        assert row[0] == bos
        assert int((row == bos).sum()) == 1, f"row {i} has {int((row == bos).sum())} BOS tokens"
        assert row[: len(ids)].tolist() == ids
        assert (batch["labels"][i, :prompt_len] == IGNORE_INDEX).all()


def test_truncation_keeps_prompt_and_response_start_and_drops_emptied_rows_in_one_warning(
        plain_tokenizer, dataset, reference):
    tok = plain_tokenizer
    max_length = 12
    prompts = ["abc", "abcd", "a" * 15, "xy"]  # row 2: the prompt alone is longer than max_length
    responses = ["de", "efghijklmnopqrstu", "b", "z" * 11]  # rows 1 and 3: response cut
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym = SFTGym(dataset(prompts, responses), dataset(["abc"], ["de"]), tok, max_length=max_length)
    messages = [str(w.message) for w in caught if "max_length" in str(w.message)]
    assert len(messages) == 1, messages
    assert re.search(r"\b3 rows\b", messages[0]), messages[0]  # three rows truncated ...
    assert re.search(r"\b1 of them\b", messages[0]) and "train row 2" in messages[0]  # ... one dropped: row 2
    assert gym.train.source_rows == [0, 1, 3]

    (batch,) = gym.test_batches(batch_size=1)  # the test split is untouched
    assert batch["input_ids"].shape[1] == 6

    kept = {0: (prompts[0], responses[0]), 1: (prompts[1], responses[1]), 2: (prompts[3], responses[3])}
    for position, (prompt, response) in kept.items():
        ids, prompt_len = reference.ids(tok, prompt, response)
        expected = ids[:max_length]
        assert gym.train.input_ids[position] == expected  # prompt + start of the response
        assert gym.train.prompt_lengths[position] == prompt_len < len(expected)


def test_rows_that_all_lose_their_response_are_an_error(plain_tokenizer, dataset):
    with pytest.warns(UserWarning, match="max_length"):
        with pytest.raises(ValueError, match="no usable rows"):
            SFTGym(dataset(["abcdef"], ["g"]), dataset(["a"], ["b"]), plain_tokenizer, max_length=4)


# ----------------------------------------------------------------------- bad input
def test_missing_column_is_named(tokenizer, dataset):
    data = dataset(["a"], ["b"], response_column="answer")
    with pytest.raises(ValueError, match="'response'"):
        SFTGym(data, data, tokenizer)
    good = dataset(["a"], ["b"])
    with pytest.raises(ValueError, match="'question'"):
        SFTGym(good, good, tokenizer, prompt_column="question")
    # the configured column names are honoured
    gym = SFTGym(data, data, tokenizer, response_column="answer")
    assert len(gym) == 1


@pytest.mark.parametrize("bad", ["", "   "], ids=["empty", "blank"])
def test_empty_response_names_the_row(bad, tokenizer, dataset):
    data = dataset(["a", "b", "c"], ["x", "y", bad])
    with pytest.raises(ValueError, match=r"row 2\b"):
        SFTGym(data, dataset(["a"], ["b"]), tokenizer)
    with pytest.raises(ValueError, match=r"test row 2\b"):
        SFTGym(dataset(["a"], ["b"]), data, tokenizer)


def test_non_string_response_names_the_row(tokenizer):
    from datasets import Dataset

    data = Dataset.from_dict({"prompt": ["a", "b"], "response": ["x", None]})
    with pytest.raises(ValueError, match=r"row 1\b"):
        SFTGym(data, data, tokenizer)
    numbers = Dataset.from_dict({"prompt": ["a"], "response": [7]})
    with pytest.raises(ValueError, match=r"row 0\b"):
        SFTGym(numbers, numbers, tokenizer)


def test_empty_split_is_an_error(tokenizer, dataset):
    empty, good = dataset([], []), dataset(["a"], ["b"])
    with pytest.raises(ValueError, match="train split is empty"):
        SFTGym(empty, good, tokenizer)
    with pytest.raises(ValueError, match="test split is empty"):
        SFTGym(good, empty, tokenizer)


# ----------------------------------------------------------------------- streams
def _take_many(stream, sizes):
    return [stream.take(n) for n in sizes]


def test_stream_is_deterministic_per_seed_and_differs_between_seeds():
    sizes = [3, 5, 7, 11]
    assert _take_many(DataStream(20, seed=1), sizes) == _take_many(DataStream(20, seed=1), sizes)
    assert _take_many(DataStream(20, seed=1), sizes) != _take_many(DataStream(20, seed=2), sizes)


def test_stream_covers_every_row_once_per_epoch():
    stream = DataStream(10, seed=3)
    rows = stream.take(7) + stream.take(7) + stream.take(16)  # three epochs, crossing boundaries
    epochs = [rows[0:10], rows[10:20], rows[20:30]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(10))
    assert epochs[0] != epochs[1] != epochs[2], "each epoch is reshuffled"
    assert stream.epoch == 3


def test_stream_resumes_exactly_from_its_state():
    stream = DataStream(13, seed=5)
    stream.take(9)
    stream.take(9)  # mid second epoch
    state = stream.state_dict()
    expected = _take_many(stream, [4, 20, 3])
    resumed = DataStream.from_state_dict(13, state)
    assert _take_many(resumed, [4, 20, 3]) == expected


def test_gym_reset_step_epochs_and_fixed_test_set(dataset, make_gym):
    prompts = [f"p{i}" for i in range(10)]
    responses = [f"r{i}" for i in range(10)]
    gym = make_gym(dataset(prompts, responses), data_batch_size_per_gpu=5, seed=7)
    test_before = [b["input_ids"] for b in gym.test_batches(3)]
    first = gym.reset()
    second = gym.step()
    assert first["input_ids"].shape[0] == second["input_ids"].shape[0] == 5
    assert gym.num_epochs == 1, "two batches of 5 over 10 rows complete one pass"
    seen = sorted(gym.tokenizer.decode(ids[m.bool()]) for b in (first, second)
                  for ids, m in zip(b["input_ids"], b["attention_mask"]))
    assert len(set(seen)) == 10  # every row once
    gym.step()
    assert gym.num_epochs == 1
    # reset(reset_dataloaders=True) restarts the seeded stream: same first batch
    assert torch.equal(gym.reset(reset_dataloaders=True)["input_ids"], first["input_ids"])
    # reset() without it continues the stream
    assert torch.equal(gym.reset()["input_ids"], second["input_ids"])
    # a different seed gives a different order
    other = make_gym(dataset(prompts, responses), data_batch_size_per_gpu=5, seed=8)
    assert not torch.equal(other.reset()["input_ids"], first["input_ids"])
    # the test set never depends on the stream
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(test_before, gym.test_batches(3)))
