"""One tiny LoRA member trained for three optimizer steps, in one process or as one rank of a
gloo process group: what the data-parallel test compares. Run as
`python -m tests.helpers.data_parallel_member RANK WORLD INIT_METHOD OUT` for a rank; the
losses, summed gradients and final adapter of each step go to OUT (safetensors and JSON)."""
import sys
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from evo_sft import SFT, SFTGym
from evo_sft.data.demo import build_model, build_tokenizer, demo_dataset
from evo_sft.io import storage
from evo_sft.sft.data_parallel import shard_base

STEPS, BATCH, MICRO = 3, 6, 2  # three micro-batches per optimizer step: two on rank 0, one on rank 1


def train(replicas=None) -> tuple[list[float], dict[str, torch.Tensor], SFT]:
    """(each step's mean loss, each step's gradients as `step{i}/{name}` and the final weights as
    `final/{name}`, the agent) of the member, alone or with `replicas` (a `Replicas`), its base
    then sharded."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(chat_template=True)
    agent = SFT(tokenizer.pad_token_id, tokenizer.pad_token,
                actor_network=build_model(len(tokenizer), seed=0, hidden_size=32, num_layers=2),
                lora_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]),
                batch_size=BATCH, micro_batch_size_per_gpu=MICRO, lr=1e-2, max_grad_norm=1e6,
                gradient_checkpointing=False, seed=42)
    if replicas:
        agent.replicas = replicas
        shard_base(agent, replicas)
    gym = SFTGym(demo_dataset(STEPS * BATCH, seed=0), demo_dataset(4, seed=1), tokenizer, data_batch_size_per_gpu=BATCH)
    losses, tensors = [], {}
    stream = gym.new_stream(0)
    for step in range(STEPS):
        losses.append(agent.learn(gym.batch(stream, BATCH))["mean_loss"])
        tensors.update({f"step{step}/{name}": p.grad.detach().clone() for name, p in agent.trainable_parameters().items()})
    tensors.update({f"final/{name}": p.detach().clone() for name, p in agent.trainable_parameters().items()})
    return losses, tensors, agent


if __name__ == "__main__":
    from evo_sft.sft.data_parallel import join

    rank, world, init_method, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    torch.set_num_threads(1)
    step_losses, step_tensors, trained = train(join(rank, world, init_method, use_gpu=False))
    save_file({k: v.contiguous() for k, v in step_tensors.items()}, str(out / f"rank{rank}.safetensors"))
    decoder = trained.actor.get_base_model().model
    sharded = {"embedding": decoder.embed_tokens.weight, "layer_0.mlp": decoder.layers[0].mlp.up_proj.weight}
    storage.save_json(out / f"rank{rank}.json", {
        "losses": step_losses, "rows": {name: [w.to_local().shape[0], w.shape[0]] for name, w in sharded.items()}})
