"""SFTGym: prompt/response datasets -> masked, padded batches, a seeded stream per member, one fixed test set."""
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from evo_sft.data.sources import LOCATION_COLUMN, DataError, shown

IGNORE_INDEX = -100
UNKNOWN_SHARE_REFUSED = 0.05


@dataclass(frozen=True)
class TokenizedSplit:
    """Token ids of every kept row and how many leading tokens are prompt (never supervised)."""

    input_ids: list[list[int]]
    prompt_lengths: list[int]
    source_rows: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    def to_dict(self) -> dict:
        return {"input_ids": self.input_ids, "prompt_lengths": self.prompt_lengths, "source_rows": self.source_rows}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizedSplit":
        return cls(d["input_ids"], d["prompt_lengths"], d["source_rows"])


def _check_columns(dataset, split: str, columns: tuple[str, ...]) -> None:
    if len(dataset) == 0:
        raise DataError(f"the {split} split is empty")
    for column in columns:
        if column not in dataset.column_names:
            names = [name for name in dataset.column_names if name != LOCATION_COLUMN]
            raise DataError(f"the {split} split has no column '{column}' (columns: {', '.join(names)})")


def _row_ids(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]] | None:
    """(prompt ids, response ids), or None where a chat template renders the prompt (with the
    generation prompt) as something other than the start of the whole conversation.

    Plain text: the prompt with the tokenizer's special tokens (a BOS), the response without,
    then an eos, each tokenised on its own as TRL does, so no merge across the boundary changes
    the prompt. A chat template: both renderings are tokenised without special tokens (the
    template has them); where the prompt's ids are not a prefix of the conversation's (a merge
    at the boundary), the rest of the rendered conversation is tokenised on its own."""
    if not tokenizer.chat_template:
        return (tokenizer(prompt, add_special_tokens=True)["input_ids"],
                tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    user = [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, full_ids[len(prompt_ids):]
    if not full_text.startswith(prompt_text):
        return None
    return prompt_ids, tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]


def _listed(where: list[str]) -> str:
    return ", ".join(where[:10]) + (f" and {len(where) - 10} more" if len(where) > 10 else "")


def _check_unknown(tokenizer, split: str, prompts: list[str], responses: list[str], where: list[str]) -> None:
    """Characters a tokenizer does not know become its unknown token, which may be its pad and
    end-of-sequence token too. Count the tokens of the rows' own text (without special tokens)
    that are any of these: warn, and refuse above UNKNOWN_SHARE_REFUSED."""
    unknown = {tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id} - {None}
    encoded = tokenizer(prompts + responses, add_special_tokens=False)["input_ids"]
    found = [sum(i in unknown for i in ids) for ids in encoded]
    if not any(found):
        return
    count, total, rows = sum(found), sum(len(ids) for ids in encoded), len(prompts)
    first = next(row for row in range(rows) if found[row] or found[rows + row])
    text = prompts[first] if found[first] else responses[first]
    message = (f"{split}: {count} of {total} tokens ({count / total:.1%}) of the rows' text are the tokenizer's "
               f"unknown, pad or end-of-sequence token (characters it does not know), first at {where[first]}: "
               f"{shown(text)}")
    if count / total > UNKNOWN_SHARE_REFUSED:
        raise DataError(f"{message}; more than {UNKNOWN_SHARE_REFUSED:.0%} is refused: "
                        f"use a tokenizer that knows this text")
    warnings.warn(message)


def tokenize_split(dataset, tokenizer, split: str, prompt_column: str, response_column: str,
                   max_length: int | None) -> TokenizedSplit:
    """Tokenise every row once. Truncation keeps the prompt and the start of the response;
    rows left with no response token, or whose prompt a chat template renders differently
    inside the conversation, are dropped and reported in one warning each. Rows are named by
    LOCATION_COLUMN where the dataset has it (see `sources.load_splits`), else as '{split} row N'."""
    _check_columns(dataset, split, (prompt_column, response_column))
    prompts, responses = list(dataset[prompt_column]), list(dataset[response_column])
    where = (list(dataset[LOCATION_COLUMN]) if LOCATION_COLUMN in dataset.column_names
             else [f"{split} row {row}" for row in range(len(dataset))])
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        if not isinstance(prompt, str):
            raise DataError(f"{where[row]}: '{prompt_column}' must be a string, got {type(prompt).__name__}")
        if not isinstance(response, str) or not response.strip():
            raise DataError(f"{where[row]}: '{response_column}' is empty or not a string: {shown(response)}")
    _check_unknown(tokenizer, split, prompts, responses, where)
    input_ids, prompt_lengths, source_rows = [], [], []
    truncated, emptied, not_prefix = 0, [], []
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        ids = _row_ids(tokenizer, prompt, response)
        if ids is None:
            not_prefix.append(where[row])
            continue
        prompt_ids, response_ids = ids
        full_ids = prompt_ids + response_ids
        if max_length is not None and len(full_ids) > max_length:
            truncated += 1
            full_ids = full_ids[:max_length]
            if len(full_ids) <= len(prompt_ids):
                emptied.append(where[row])
                continue
        input_ids.append(full_ids)
        prompt_lengths.append(len(prompt_ids))
        source_rows.append(row)
    if not_prefix:
        warnings.warn(
            f"{split}: dropped {len(not_prefix)} rows whose prompt the chat template renders differently with "
            f"add_generation_prompt=True than inside the conversation: {_listed(not_prefix)}"
        )
    if truncated:
        warnings.warn(
            f"{split}: {truncated} rows longer than max_length={max_length} were truncated; "
            f"{len(emptied)} of them lost their whole response and were dropped"
            + (f": {_listed(emptied)}" if emptied else "")
        )
    if not input_ids:
        raise DataError(f"the {split} split has no usable rows after tokenisation")
    return TokenizedSplit(input_ids, prompt_lengths, source_rows)


def test_texts(dataset, split: TokenizedSplit, prompt_column: str, reference_column: str) -> dict:
    """The prompt and the reference (what a generated response is compared with) of each row that
    `split` kept from `dataset`, as text: {"prompts": [...], "references": [...]}."""
    _check_columns(dataset, "test", (prompt_column, reference_column))
    prompts, references = list(dataset[prompt_column]), list(dataset[reference_column])
    where = (list(dataset[LOCATION_COLUMN]) if LOCATION_COLUMN in dataset.column_names
             else [f"test row {row}" for row in range(len(dataset))])
    for row in split.source_rows:
        if references[row] is None or isinstance(references[row], (list, dict)):
            raise DataError(f"{where[row]}: '{reference_column}' must be a string or a number to compare "
                            f"generations with, got {shown(references[row])}")
    return {"prompts": [prompts[row] for row in split.source_rows],
            "references": [str(references[row]) for row in split.source_rows]}


def prepare(train_dataset, test_dataset, tokenizer, prompt_column: str, response_column: str,
            max_length: int | None, reference_column: str | None = None) -> dict:
    """Both splits tokenised once, and the test rows' text; the result is shared by every member
    (and every Ray actor) and is what `SFTGym(prepared=...)` takes. `reference_column` (default
    the response column) holds what generations are compared with."""
    train = tokenize_split(train_dataset, tokenizer, "train", prompt_column, response_column, max_length)
    test = tokenize_split(test_dataset, tokenizer, "test", prompt_column, response_column, max_length)
    return {"train": train.to_dict(), "test": test.to_dict(),
            "test_text": test_texts(test_dataset, test, prompt_column, reference_column or response_column)}


def stop_token_ids(tokenizer) -> list[int]:
    """The tokens that end a response as rows are tokenised: eos and, with a chat template, the
    token the template puts right after an assistant message's text (its end-of-turn token)."""
    stops = {tokenizer.eos_token_id}
    if tokenizer.chat_template:
        text = tokenizer("y", add_special_tokens=False)["input_ids"]
        ids = _row_ids(tokenizer, "x", "y")
        if ids is not None and ids[1][:len(text)] == text and len(ids[1]) > len(text):
            stops.add(ids[1][len(text)])
    return sorted(stops - {None})


def collate(split: TokenizedSplit, rows, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `rows` of `split`. Labels are masked by position (prompt and padding),
    never by token id, so an eos that equals the pad token is still supervised."""
    rows = list(rows)
    width = max(len(split.input_ids[r]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        ids = torch.tensor(split.input_ids[r], dtype=torch.long)
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
        labels[i, split.prompt_lengths[r] : len(ids)] = ids[split.prompt_lengths[r] :]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class DataStream:
    """A seeded, endless pass over the training rows: epoch e uses permutation rng([seed, e]).
    Its whole state is (seed, epoch, position), so a resumed stream continues exactly."""

    def __init__(self, num_rows: int, seed: int, epoch: int = 0, position: int = 0):
        self.num_rows, self.seed, self.epoch, self.position = num_rows, seed, epoch, position
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)

    def take(self, count: int) -> list[int]:
        rows = []
        while len(rows) < count:
            end = min(self.num_rows, self.position + count - len(rows))
            rows.extend(int(r) for r in self._order[self.position : end])
            self.position = end
            if self.position == self.num_rows:  # a pass is complete: count it now
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
        return rows

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    @classmethod
    def from_state_dict(cls, num_rows: int, state: dict) -> "DataStream":
        return cls(num_rows, state["seed"], state["epoch"], state["position"])


class SFTGym:
    """Training and test data for SFT agents, in the shape of AgileRL's LLM gyms.

    `reset()` returns the first training batch and `step()` the next one; a batch is what
    `SFT.learn` takes. The test set is fixed: `test_batches` always yields the same rows, and
    `test_prompts` the same prompts for generation, whose text and references are `test_text`.
    """

    def __init__(self, train_dataset, test_dataset, tokenizer, data_batch_size_per_gpu: int = 8,
                 response_column: str = "response", prompt_column: str = "prompt", accelerator=None,
                 max_length: int | None = None, seed: int = 42, prepared: dict | None = None,
                 reference_column: str | None = None):
        if accelerator is not None:
            raise NotImplementedError("SFTGym does not support an accelerate Accelerator yet; pass accelerator=None")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id
        self.data_batch_size_per_gpu = data_batch_size_per_gpu
        self.max_length, self.seed = max_length, seed
        if prepared is None:
            prepared = prepare(train_dataset, test_dataset, tokenizer, prompt_column, response_column, max_length,
                               reference_column)
        self.prepared = prepared
        self.train = TokenizedSplit.from_dict(prepared["train"])
        self.test = TokenizedSplit.from_dict(prepared["test"])
        self.test_text = prepared["test_text"]
        self.stop_token_ids = stop_token_ids(tokenizer)
        self.stream = self.new_stream(seed)

    @property
    def num_epochs(self) -> int:
        return self.stream.epoch

    def new_stream(self, seed: int) -> DataStream:
        return DataStream(len(self.train), seed)

    def batch(self, stream: DataStream, num_rows: int) -> dict[str, torch.Tensor]:
        return collate(self.train, stream.take(num_rows), self.pad_token_id)

    def reset(self, reset_dataloaders: bool = False) -> dict[str, torch.Tensor]:
        if reset_dataloaders:
            self.stream = self.new_stream(self.seed)
        return self.step()

    def step(self) -> dict[str, torch.Tensor]:
        return self.batch(self.stream, self.data_batch_size_per_gpu)

    def test_batches(self, batch_size: int):
        for start in range(0, len(self.test), batch_size):
            yield collate(self.test, range(start, min(start + batch_size, len(self.test))), self.pad_token_id)

    def test_prompts(self, count: int) -> list[list[int]]:
        """The prompt token ids of the first `count` test rows (the fixed rows generation is scored on)."""
        return [ids[:length] for ids, length in zip(self.test.input_ids[:count], self.test.prompt_lengths[:count])]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def __len__(self) -> int:
        return len(self.train)
