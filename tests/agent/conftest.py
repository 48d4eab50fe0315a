"""Fixtures for the tests of one SFT agent and its data (SFTGym): the demo's byte-level tokenizer
(pad == eos), a tiny Llama-style model, small datasets and the independent reference computations of
tests/helpers/reference.py.

Everything is tiny and offline so that the suite runs in seconds on a CPU.
"""
import copy
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers.processors import TemplateProcessing

from evo_sft import SFT, SFTGym
from evo_sft.data.demo import CHAT_TEMPLATE, build_model, build_tokenizer, demo_dataset
from tests.helpers.reference import reference_ids, step_grads, token_mean_loss
from tests.helpers.torch_setup import one_torch_thread  # noqa: F401 (autouse: seed 0, one thread)

HIDDEN_SIZE = 32
NUM_LAYERS = 2
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture
def tokenizer():
    """The demo tokenizer (a token per byte) with the demo chat template; pad == eos."""
    return build_tokenizer(chat_template=True)


@pytest.fixture
def plain_tokenizer():
    """The demo tokenizer (a token per byte) without a chat template; pad == eos."""
    return build_tokenizer(chat_template=False)


@pytest.fixture
def make_bos_tokenizer():
    """A tokenizer variant whose post-processor adds a BOS token `<s>` (as Llama's does);
    with a chat template, the template also starts with `{{ bos_token }}`."""

    def make(chat_template: bool):
        tok = build_tokenizer(chat_template=False)
        tok.add_special_tokens({"bos_token": "<s>"})
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.bos_token_id)]
        )
        if chat_template:
            tok.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
        return tok

    return make


def make_dataset(prompts, responses, prompt_column="prompt", response_column="response") -> Dataset:
    return Dataset.from_dict({prompt_column: list(prompts), response_column: list(responses)})


@pytest.fixture
def dataset():
    """`dataset(prompts, responses)` -> a datasets.Dataset with prompt/response columns."""
    return make_dataset


# Rows of very different lengths (response tokens 1 .. 20), used wherever normalisation matters.
UNEVEN_PROMPTS = ["reverse: ab", "q", "reverse: abcdefgh", "hi"]
UNEVEN_RESPONSES = ["ba", "abcdefghijabcdefghij", "h", "abcdef"]


@pytest.fixture
def uneven_rows():
    """(prompts, responses) of four rows with 1 to 20 response characters."""
    return list(UNEVEN_PROMPTS), list(UNEVEN_RESPONSES)


@pytest.fixture
def uneven_dataset(uneven_rows):
    return make_dataset(*uneven_rows)


@pytest.fixture
def uneven_batch(make_gym, uneven_dataset):
    """The four rows of very different lengths, in dataset order, as one padded batch."""
    (batch,) = make_gym(uneven_dataset).test_batches(batch_size=4)
    return batch


@pytest.fixture
def lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_TARGETS), lora_dropout=0.0)


@pytest.fixture
def make_model(tokenizer):
    """`make_model(seed=0)`: a tiny Llama-style model (hidden 32, 2 layers); the same seed gives the same weights."""

    def make(seed: int = 0, vocab_size: int | None = None):
        return build_model(vocab_size or len(tokenizer), seed=seed, hidden_size=HIDDEN_SIZE, num_layers=NUM_LAYERS)

    return make


@pytest.fixture
def make_agent(tokenizer, make_model, lora_config):
    """`make_agent(**overrides)`: a LoRA SFT agent on a fresh tiny model (model seed 0 unless
    `model_seed` is given). Defaults keep it fast: no gradient checkpointing, no clipping."""

    def make(model_seed: int = 0, **overrides):
        kwargs = dict(
            pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token,
            lora_config=copy.deepcopy(lora_config), batch_size=4, lr=1e-3, max_grad_norm=1e6,
            gradient_checkpointing=False, seed=42,
        )
        kwargs.update(overrides)
        if "model_name" not in kwargs and "actor_network" not in kwargs:
            kwargs["actor_network"] = make_model(model_seed)
        return SFT(**kwargs)

    return make


@pytest.fixture
def make_gym(tokenizer):
    """`make_gym(train, test=None, **kwargs)`: an SFTGym on the chat tokenizer (test defaults to train)."""

    def make(train, test=None, tokenizer_=None, **kwargs):
        kwargs.setdefault("data_batch_size_per_gpu", 4)
        return SFTGym(train, test if test is not None else train, tokenizer_ or tokenizer, **kwargs)

    return make


@pytest.fixture
def demo_gym(make_gym):
    return make_gym(demo_dataset(16, seed=0), demo_dataset(8, seed=1))


# ----------------------------------------------------------------------- independent references
@pytest.fixture
def reference():
    """The independent reference computations: `ids`, `token_mean_loss`, `step_grads`."""
    return SimpleNamespace(ids=reference_ids, token_mean_loss=token_mean_loss, step_grads=step_grads)


@pytest.fixture
def logits_of():
    """`logits_of(model_or_agent, input_ids)`: eval-mode logits without gradient."""

    def logits(model, input_ids):
        model = model.actor if isinstance(model, SFT) else model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model(input_ids=input_ids).logits
        model.train(was_training)
        return out

    return logits


@pytest.fixture
def probe_ids(tokenizer):
    """A fixed input to compare models on."""
    return torch.tensor([tokenizer.encode("<|im_start|>user\nreverse: abcd<|im_end|>\n<|im_start|>assistant\ndcba")])


def trainable_snapshot(agent) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in agent.trainable_parameters().items()}


def optimizer_snapshot(agent) -> dict:
    return copy.deepcopy(agent.optimizer.state_dict()["state"])


@pytest.fixture
def snapshot():
    """Namespace: `snapshot.params(agent)`, `snapshot.optimizer(agent)`, `snapshot.grads(agent_or_model)`
    -> independent copies."""

    class Snapshot:
        params = staticmethod(trainable_snapshot)
        optimizer = staticmethod(optimizer_snapshot)

        @staticmethod
        def grads(model) -> dict[str, torch.Tensor]:
            """Gradients of the trainable parameters of an agent or a model, by parameter name."""
            named = model.trainable_parameters().items() if isinstance(model, SFT) else (
                (n, p) for n, p in model.named_parameters() if p.requires_grad)
            return {name: p.grad.detach().clone() for name, p in named}

    return Snapshot


def assert_tensors_equal(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], dict):
            assert_tensors_equal(a[name], b[name], atol)
        elif isinstance(a[name], torch.Tensor):
            assert torch.allclose(a[name], b[name], atol=atol, rtol=0), name
        else:
            assert a[name] == b[name], name


@pytest.fixture
def assert_same():
    """`assert_same(a, b, atol=0)`: nested dicts of tensors are equal (exactly by default)."""
    return assert_tensors_equal
