"""Padding-free packed micro-batches (evo_sft.kernels): on the CPU, in float32, the packed loss
and LoRA gradients equal the padded reference, and the pieces (packing, varlen attention,
fused LoRA forward, chunked frozen-head cross-entropy) each match their plain counterpart."""
import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from transformers import Qwen2Config, Qwen2ForCausalLM

from evo_sft.kernels import attention, packing
from evo_sft.kernels.lora import fast_lora
from evo_sft.kernels.loss import linear_cross_entropy
from evo_sft.sft import step
from evo_sft.sft.agent import SFT
from evo_sft.data import IGNORE_INDEX
from tests.helpers.torch_setup import reset_dynamo

VOCAB = 97


def _model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).float()


def _lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def _batch(lengths, prompt_lengths, width=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    input_ids = torch.full((len(lengths), width), 0)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    labels = torch.full((len(lengths), width), IGNORE_INDEX)
    for i, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        ids = torch.randint(1, VOCAB, (n,), generator=g)
        input_ids[i, :n], attention_mask[i, :n] = ids, 1
        labels[i, p:n] = ids[p:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _agent(packing_on: bool, gradient_checkpointing: bool = False, compile_layers: bool = False) -> SFT:
    agent = SFT(pad_token_id=0, pad_token="<pad>", actor_network=_model(), lora_config=_lora(), batch_size=4,
                lr=1e-3, gradient_checkpointing=gradient_checkpointing, packing=packing_on, max_grad_norm=1e9,
                compile_layers=compile_layers)
    torch.manual_seed(3)
    with torch.no_grad():  # non-zero lora_B so the adapters shape the loss and get gradients through A too
        for name, p in agent.actor.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return agent


def _grads(agent: SFT) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in agent.trainable_parameters().items()}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_pack_batch_layout():
    batch = _batch([5, 3, 7], [2, 1, 7], width=9)
    packed = packing.pack_batch(batch)
    assert packed["input_ids"].shape == (1, 15)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6]]
    assert packed["cu_seqlens"].tolist() == [0, 5, 8, 15] and packed["cu_seqlens"].dtype == torch.int32
    assert packed["max_seqlen"] == 7
    # supervised next tokens: row 0 positions 1..3 -> tokens 2..4, row 1 positions 0..1 -> tokens 1..2,
    # row 2 has a prompt of its whole length -> nothing
    assert packed["loss_index"].tolist() == [1, 2, 3, 5, 6]
    ids = batch["input_ids"]
    assert packed["targets"].tolist() == [ids[0, 2], ids[0, 3], ids[0, 4], ids[1, 1], ids[1, 2]]
    assert packed["num_targets"] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_pack_batch_rejects_left_padding():
    batch = _batch([3, 4], [1, 1])
    batch["attention_mask"] = batch["attention_mask"].flip(-1)
    with pytest.raises(ValueError, match="right-padded"):
        packing.pack_batch(batch)


def test_varlen_reference_matches_per_document_attention_with_gqa():
    torch.manual_seed(0)
    lengths = [4, 1, 6]
    q, k, v = torch.randn(11, 4, 8), torch.randn(11, 2, 8), torch.randn(11, 2, 8)
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    out = attention.varlen_attention(q, k, v, cu, 6, None)
    start = 0
    for n in lengths:
        qs, ks, vs = q[start:start + n], k[start:start + n], v[start:start + n]
        ks, vs = ks.repeat_interleave(2, 1), vs.repeat_interleave(2, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / 8 ** 0.5
        scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
        ref = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
        assert torch.allclose(out[start:start + n], ref, atol=1e-5)
        start += n


@pytest.mark.parametrize("compiled", [False, True])
def test_linear_cross_entropy_matches_autograd_row_by_row(compiled):
    reset_dynamo()
    torch.manual_seed(0)
    hidden = torch.randn(13, 16, requires_grad=True)
    weight, bias = torch.randn(VOCAB, 16), torch.randn(VOCAB)
    targets = torch.randint(0, VOCAB, (13,))
    row_weights = torch.rand(13)  # each row's own factor reaches its own hidden row
    losses = linear_cross_entropy(hidden, weight, bias, targets, chunk_rows=4, compiled=compiled)
    (losses * row_weights).sum().backward()
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(F.linear(ref_hidden, weight, bias), targets, reduction="none")
    (ref * row_weights).sum().backward()
    assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) == compiled
    assert losses.shape == (13,)
    assert torch.allclose(losses, ref, rtol=1e-5)
    assert torch.allclose(hidden.grad, ref_hidden.grad, atol=1e-5)


def test_fast_lora_forward_matches_peft():
    from peft import get_peft_model

    model = get_peft_model(_model(), _lora())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    fast = copy.deepcopy(model)
    assert fast_lora(fast) == 8
    ids = torch.randint(1, VOCAB, (2, 7))
    out, ref = fast(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.allclose(out, ref, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    grads = dict(model.named_parameters())
    for name, p in fast.named_parameters():
        if p.requires_grad:
            assert _rel(p.grad, grads[name].grad) < 1e-5, name
    with fast.disable_adapter():  # the patched layer falls back to PEFT's forward
        base_out = fast(input_ids=ids).logits
    with model.disable_adapter():
        assert torch.allclose(base_out, model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_packed_step_matches_padded_step(gradient_checkpointing):
    batch = _batch([9, 4, 12, 6], [3, 2, 5, 6], width=14)
    padded, packed = _agent(False, gradient_checkpointing), _agent(True, gradient_checkpointing)
    assert not padded.packing and packed.packing
    rows = range(0, 4)
    tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss_padded, loss_packed = step.micro_loss_sum(padded, batch), step.micro_loss_sum(packed, batch)
    assert torch.allclose(loss_packed, loss_padded, rtol=1e-5)
    (loss_padded / tokens).backward()
    (loss_packed / tokens).backward()
    ref = _grads(padded)
    got = _grads(packed)
    assert set(got) == set(ref)
    for name in ref:
        assert _rel(got[name], ref[name]) < 1e-4, name
    padded.optimizer.zero_grad()
    packed.optimizer.zero_grad()
    a = padded.learn(batch)
    b = packed.learn(batch)
    assert a["tokens"] == b["tokens"] == tokens and rows
    assert abs(a["mean_loss"] - b["mean_loss"]) < 1e-5
    for name, p in padded.trainable_parameters().items():
        assert _rel(packed.trainable_parameters()[name].detach(), p.detach()) < 1e-5, name


def test_packed_agent_test_and_clone_match():
    batch = _batch([9, 4, 12, 6], [3, 2, 5, 6], width=14)

    class Env:
        def test_batches(self, batch_size):
            yield batch

    padded, packed = _agent(False), _agent(True)
    assert abs(padded.test(Env()) - packed.test(Env())) < 1e-5
    clone = packed.clone()
    assert clone.packing
    assert abs(clone.test(Env()) - packed.test(Env())) < 1e-6


def test_compiled_layers_train_as_the_eager_ones():
    """compile_layers: each decoder layer runs through torch.compile (checked by dynamo's count of
    compiled graphs) and, under gradient checkpointing and packed batches of varying length, the
    losses and weights of three steps equal the eager agent's. A clone of the compiled agent
    trains its own weights, not the original's."""
    reset_dynamo()
    batches = [_batch([9, 4, 12, 6], [3, 2, 5, 6], width=14, seed=s) for s in (1, 2)]
    batches.append(_batch([5, 7, 3, 11], [2, 2, 1, 4], width=12, seed=3))
    eager, compiled = _agent(True, gradient_checkpointing=True), _agent(True, True, compile_layers=True)
    for batch in batches:
        a, b = eager.learn(batch), compiled.learn(batch)
        assert abs(a["mean_loss"] - b["mean_loss"]) < 1e-5
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert not torch._dynamo.utils.counters["graph_break"]
    for name, p in eager.trainable_parameters().items():
        assert _rel(compiled.trainable_parameters()[name].detach(), p.detach()) < 1e-5, name

    before = {n: p.detach().clone() for n, p in compiled.trainable_parameters().items()}
    clone = compiled.clone()
    clone.learn(batches[0])
    for name, p in compiled.trainable_parameters().items():
        assert torch.equal(p.detach(), before[name]), name
        assert not torch.equal(clone.trainable_parameters()[name].detach(), before[name]), name
