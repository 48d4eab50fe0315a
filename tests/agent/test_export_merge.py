"""Merging a member's adapter into its base model (issue 31): `evo_sft.export.merge_adapter` on a
base whose output head is tied to its input embedding, as Qwen2.5-0.5B's is. PEFT merges an adapter
of the head into the weight the embedding shares, so a plain merge changes what the embedding
computes too; the merged model must compute what base + adapter compute, before and after
save_pretrained / from_pretrained."""
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from evo_sft.export import merge_adapter

INPUT_IDS = torch.tensor([[3, 17, 42, 5, 99, 7]])


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["embed_tokens", "v_proj"], ["q_proj", "v_proj"]])
def test_a_merged_adapter_computes_what_base_and_adapter_compute_with_tied_embeddings(tmp_path, targets):
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    base = LlamaForCausalLM(config)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    base.save_pretrained(tmp_path / "base")
    adapter = get_peft_model(load(tmp_path / "base"), LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    expected = logits(PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "adapter"))
    assert (expected - logits(load(tmp_path / "base"))).abs().max() > 1e-2, "the adapter changes nothing"

    merged = merge_adapter(load(tmp_path / "base"), tmp_path / "adapter")
    assert not any(isinstance(module, BaseTunerLayer) for module in merged.modules())
    assert torch.allclose(logits(merged), expected, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = load(tmp_path / "merged")
    assert torch.allclose(logits(reloaded), expected, atol=1e-5, rtol=0)
    touches_embeddings = bool({"lm_head", "embed_tokens"} & set(targets))
    # tied again where the merge left head and embedding equal: the saved model stays as small as its base
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == (not touches_embeddings)
    assert reloaded.config.tie_word_embeddings == (not touches_embeddings)
