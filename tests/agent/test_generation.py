"""Generation by the SFT agent (issue 23): batched, left-padded greedy decoding with the KV cache
equals transformers' own `generate` on each prompt alone (pitfall 8), through the actor adapter;
stop tokens, sampling, AgileRL's `get_action`, and no trace left on training."""
import pytest
import torch
from peft import LoraConfig

from evo_sft.data.demo import SPECIAL_TOKENS, build_tokenizer, demo_dataset
from tests.helpers.reference import hf_greedy

PROMPTS = ["reverse: abc", "q", "reverse: abcdefghij, then something longer", "hi"]


@pytest.fixture
def prompt_ids(tokenizer):
    """Chat-rendered prompts of 16 to 55 tokens: batched, they need padding."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
            for p in PROMPTS]


def nontrivial(agent, scale: float = 0.5):
    """Random adapter weights (lora_B starts at zero): the adapter changes what the model says."""
    with torch.no_grad():
        for p in agent.trainable_parameters().values():
            p.normal_(0, scale)
    return agent


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_batched_left_padded_greedy_equals_transformers_generate_on_each_prompt_alone(
        checkpointing, make_agent, prompt_ids):
    agent = nontrivial(make_agent(gradient_checkpointing=checkpointing))
    batched = agent.generate(prompt_ids, max_new_tokens=12, stop_token_ids=[], batch_size=4)
    assert [len(row) for row in batched] == [12] * 4
    assert batched == [hf_greedy(agent.actor, prompt, 12) for prompt in prompt_ids]
    assert batched == agent.generate(prompt_ids, max_new_tokens=12, stop_token_ids=[], batch_size=3)
    assert len({tuple(row) for row in batched}) > 1, "every prompt got the same continuation"


def test_generation_goes_through_the_actor_adapter(make_agent, make_model, prompt_ids):
    """With a reference adapter beside it, the actor's (trained) adapter speaks; the base alone
    says something else."""
    agent = make_agent(use_separate_reference_adapter=True)
    nontrivial(agent)
    out = agent.generate(prompt_ids, max_new_tokens=10, stop_token_ids=[])
    base = make_model(0)
    assert out == [hf_greedy(agent.actor, prompt, 10) for prompt in prompt_ids]
    assert out != [hf_greedy(base, prompt, 10) for prompt in prompt_ids]


def test_each_row_ends_before_its_first_stop_token(make_agent, prompt_ids):
    agent = nontrivial(make_agent())
    free = agent.generate(prompt_ids, max_new_tokens=12, stop_token_ids=[])
    stop = free[1][4]  # the fifth token of the second row
    stopped = agent.generate(prompt_ids, max_new_tokens=12, stop_token_ids=[stop])
    for row, full in zip(stopped, free):
        expected = full[:full.index(stop)] if stop in full else full
        assert row == expected
    assert stopped[1] == free[1][:free[1].index(stop)] and len(stopped[1]) <= 4


def test_default_stop_tokens_are_the_models_eos(make_agent, tokenizer):
    agent = make_agent()
    assert agent.actor.generation_config.eos_token_id == [SPECIAL_TOKENS.index("<|im_end|>"), tokenizer.eos_token_id]
    from evo_sft.sft.generation import eos_token_ids

    assert eos_token_ids(agent.actor) == [SPECIAL_TOKENS.index("<|im_end|>"), tokenizer.eos_token_id]


def test_the_gym_stops_where_its_rows_end(make_gym):
    """A chat template's end-of-turn token and eos; eos alone without a template. In every test
    row, the token right after the response's text is one of them."""
    data = demo_dataset(4, seed=0)
    chat, plain = make_gym(data), make_gym(data, tokenizer_=build_tokenizer(chat_template=False))
    im_end, eos = SPECIAL_TOKENS.index("<|im_end|>"), SPECIAL_TOKENS.index("<|endoftext|>")
    assert chat.stop_token_ids == [eos, im_end]
    assert plain.stop_token_ids == [eos]
    for gym in (chat, plain):
        prompts = gym.test_prompts(len(gym.test))
        for row, (ids, length) in enumerate(zip(gym.test.input_ids, gym.test.prompt_lengths)):
            assert prompts[row] == ids[:length]
            text = gym.tokenizer.encode(gym.test_text["references"][row], add_special_tokens=False)
            assert ids[length:length + len(text)] == text
            assert ids[length + len(text)] in gym.stop_token_ids


def test_sampling_is_seeded_and_a_vanishing_nucleus_is_greedy(make_agent, prompt_ids):
    agent = nontrivial(make_agent(), scale=0.1)
    greedy = agent.generate(prompt_ids, 10, [], temperature=0.0)
    torch.manual_seed(3)
    first = agent.generate(prompt_ids, 10, [], temperature=1.0)
    torch.manual_seed(3)
    assert agent.generate(prompt_ids, 10, [], temperature=1.0) == first
    assert first != greedy
    assert agent.generate(prompt_ids, 10, [], temperature=1.0, top_p=1e-9) == greedy


def test_get_action_returns_prompt_and_completion_with_the_generated_positions_marked(make_agent, prompt_ids):
    agent = nontrivial(make_agent())
    expected = agent.generate(prompt_ids[:2], max_new_tokens=6, stop_token_ids=[])
    width = len(prompt_ids[0]) + 3
    padded = torch.zeros(1, width, dtype=torch.long)  # a left-padded prompt with its attention mask
    padded[0, 3:] = torch.tensor(prompt_ids[0])
    mask = (torch.arange(width) >= 3).long()[None]
    obs = [{"input_ids": padded, "attention_mask": mask}, {"input_ids": torch.tensor([prompt_ids[1]])}]
    completions, action_masks = agent.get_action(obs, max_new_tokens=6, stop_token_ids=[])
    for prompt, new, ids, action in zip(prompt_ids, expected, completions, action_masks):
        assert ids.tolist() == [prompt + new]
        assert action.shape == (1, len(prompt) + len(new) - 1)
        assert action[0].tolist() == [False] * (len(prompt) - 1) + [True] * len(new)


def test_generation_leaves_training_as_it_was(make_agent, demo_gym, prompt_ids, snapshot, assert_same):
    """Generating between steps changes nothing of training: no cache switched on, the same
    weights after the same steps, training mode back for learn()."""
    plain, generating = make_agent(), make_agent()
    for agent in (plain, generating):
        batches = [demo_gym.reset(reset_dataloaders=True), demo_gym.step()]
        agent.learn(batches[0])
        if agent is generating:
            agent.generate(prompt_ids, 5, [])
        agent.learn(batches[1])
    assert generating.actor.config.use_cache is False
    assert_same(snapshot.params(generating), snapshot.params(plain))


def test_bad_generation_arguments_are_refused(make_agent, prompt_ids):
    agent = make_agent()
    for kwargs, fragment in (({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1.0}, "temperature"),
                             ({"top_p": 0.0}, "top_p")):
        with pytest.raises(ValueError, match=fragment):
            agent.generate(prompt_ids, **{"max_new_tokens": 4, **kwargs})
    with pytest.raises(ValueError, match="at least one token"):
        agent.generate([[]], 4)


def test_full_fine_tuning_generates_too(make_agent, prompt_ids):
    agent = make_agent(lora_config=None)
    assert agent.generate(prompt_ids, 8, []) == [hf_greedy(agent.actor, prompt, 8) for prompt in prompt_ids]


def test_lora_on_the_output_head_is_applied(make_model, tokenizer, prompt_ids):
    """The demo's adapters include lm_head: generation computes logits through it."""
    from evo_sft import SFT

    agent = SFT(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=make_model(0), gradient_checkpointing=False,
                lora_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for name, p in agent.trainable_parameters().items():
            if "lm_head" in name:
                p.normal_(0, 0.5)
    assert agent.generate(prompt_ids, 8, []) == [hf_greedy(agent.actor, prompt, 8) for prompt in prompt_ids]


def test_packed_and_compiled_agents_generate_eagerly_as_plain_ones(make_agent, prompt_ids):
    """Packing (varlen attention for training) and compiled decoder layers: generation runs the
    layers eagerly, compiling no graph, and says what a plain agent with the same state says."""
    import torch._dynamo

    packed = nontrivial(make_agent(packing=True, compile_layers=True))
    plain = make_agent()
    plain.import_state(*packed.export_state())
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert packed.generate(prompt_ids, 8, []) == plain.generate(prompt_ids, 8, [])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
