"""The SFT agent: a causal LM with a LoRA adapter named `actor`, trained by token-level
cross-entropy on response tokens, with the public API of AgileRL's `SFT`.

The step itself is `evo_sft.sft.step`; checkpoints and clone states are `evo_sft.sft.state`;
what a hyperparameter is and how a new value reaches the optimizer is `evo_sft.hyperparameters`.
"""
import copy
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from evo_sft.hyperparameters import HYPERPARAMETERS, unknown
from evo_sft.kernels.loss import supervised_token_count
from evo_sft.sft import generation, lora, state, step
from evo_sft.sft.lora import ACTOR, REFERENCE, config_kwargs, copy_adapter
from evo_sft.sft.schedule import CONSTANT, LRSchedule

# The parts of the learning-rate schedule that are not hyperparameters (scheduler, warmup_steps are).
SCHEDULE_ATTRIBUTES = ("schedule_steps", "min_lr_ratio")
# Attributes that define an agent and travel with it in checkpoints and clones.
INIT_ATTRIBUTES = (
    "pad_token_id", "pad_token", "model_name", "model_config", "index", "update_epochs", "calc_position_embeddings",
    "micro_batch_size_per_gpu", "seed", "gradient_checkpointing", "use_liger_loss",
    "use_separate_reference_adapter", *SCHEDULE_ATTRIBUTES, *HYPERPARAMETERS,
)
STATE_ATTRIBUTES = ("fitness", "scores", "steps", "optimizer_steps")


class SFT:
    """Supervised fine-tuning agent (AgileRL `SFT` API).

    `batch_size` sequences make one optimizer step; with a smaller `micro_batch_size_per_gpu`
    gradients accumulate and the loss is normalised by the supervised tokens of the whole step.
    Every hyperparameter of `evo_sft.hyperparameters` is an attribute (`agent.lr`,
    `agent.weight_decay`, `agent.lora_r`, ...); `set_hyperparameters` changes them on a live agent.
    The LoRA ones come from `lora_config` (None without LoRA), `scheduler` and `warmup_steps` from
    `lr_schedule` (constant without one).

    `clone` (AgileRL's flag) suppresses adapter initialisation when cloning an existing agent: a
    PEFT model given as `actor_network` is used as it is, its `actor` adapter and weights kept.
    Without it, a PEFT model given is merged into its base weights and gets a fresh `actor`
    adapter (from `lora_config`, else from the model's first adapter), as in AgileRL.
    """

    def __init__(self, pad_token_id: int, pad_token: str, model_name: str | None = None, actor_network=None,
                 model_config: dict | None = None, hp_config=None, index: int = 0, batch_size: int = 16,
                 lr: float = 5e-5, max_grad_norm: float = 0.1, update_epochs: int = 1,
                 calc_position_embeddings: bool = True, micro_batch_size_per_gpu: int | None = None,
                 device: str = "cpu", lora_config=None, accelerator=None, wrap: bool = True, clone: bool = False,
                 seed: int = 42, gradient_checkpointing: bool = True, use_liger_loss: bool = False,
                 use_separate_reference_adapter: bool = False, lr_schedule: LRSchedule | None = None,
                 packing: bool | None = None, compile_layers: bool | None = None):
        if accelerator is not None:
            raise NotImplementedError("SFT does not support an accelerate Accelerator yet; pass accelerator=None")
        if (model_name is None) == (actor_network is None):
            raise ValueError("pass exactly one of model_name (loaded with from_pretrained) or actor_network")
        if micro_batch_size_per_gpu is not None and micro_batch_size_per_gpu < 1:
            raise ValueError(f"micro_batch_size_per_gpu must be >= 1, got {micro_batch_size_per_gpu}")
        lora_config = _given_lora_config(actor_network, lora_config, clone)
        self.algo = "SFT"
        self.pad_token_id, self.pad_token = pad_token_id, pad_token
        self.model_name, self.model_config = model_name, model_config
        self.hp_config, self.index = hp_config, index
        for name, hyperparameter in HYPERPARAMETERS.items():
            setattr(self, name, hyperparameter.default)
        given = {"lr": lr, "batch_size": batch_size, "max_grad_norm": max_grad_norm}
        _check_hyperparameters(given)
        self.__dict__.update(given)
        self.update_epochs, self.calc_position_embeddings = update_epochs, calc_position_embeddings
        self.micro_batch_size_per_gpu, self.device = micro_batch_size_per_gpu, torch.device(device)
        self.lora_config, self.accelerator, self.wrap = lora_config, accelerator, wrap
        self.seed, self.gradient_checkpointing = seed, gradient_checkpointing
        self.use_liger_loss = use_liger_loss
        self.use_separate_reference_adapter = use_separate_reference_adapter
        lr_schedule = lr_schedule or CONSTANT
        self.schedule_steps, self.min_lr_ratio = lr_schedule.total_steps, lr_schedule.min_lr_ratio
        self.scheduler, self.warmup_steps = lr_schedule.kind, lr_schedule.warmup_steps
        self.lora_r, self.lora_alpha, self.lora_dropout = (
            (lora_config.r, float(lora_config.lora_alpha), float(lora_config.lora_dropout)) if lora_config else
            (None, None, None))
        self.fitness: list[float] = []
        self.scores: list[float] = []
        self.steps: list[int] = [0]
        self.optimizer_steps = 0
        self.mutation_hooks = []
        self.liger_loss = None
        if use_liger_loss:
            from evo_sft.kernels.liger import liger_loss

            self.liger_loss = liger_loss()
        self.adapter_parameters: tuple = (None, {})  # see evo_sft.sft.state.adapter_state
        self.replicas = None  # an evo_sft.sft.data_parallel.Replicas where several processes train this agent

        torch.manual_seed(seed)
        if actor_network is None:
            from transformers import AutoModelForCausalLM

            actor_network = AutoModelForCausalLM.from_pretrained(model_name, **(model_config or {}))
        self.actor = self._prepare_model(actor_network, add_adapters=not clone or model_name is not None)
        # Padding-free packed micro-batches with varlen attention (evo_sft.kernels); on by default on CUDA.
        self.packing = self._enable_packing(self.device.type == "cuda" if packing is None else packing)
        # torch.compile of each decoder layer and of the frozen head's loss chunk; on by default
        # where packing runs on CUDA.
        self.compile_layers = self.packing and self.device.type == "cuda" if compile_layers is None else compile_layers
        self._compile_layers()
        self.reinit_optimizers()

    # ----------------------------------------------------------------- model set-up
    def _prepare_model(self, model, add_adapters: bool):
        from peft import PeftModel, get_peft_model

        if hasattr(model, "config"):
            model.config.use_cache = False
        if self.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
            model.enable_input_require_grads()
        if isinstance(model, PeftModel) and add_adapters:  # its adapters become part of the base weights
            model = model.merge_and_unload()
        if self.lora_config is not None and add_adapters:
            model = get_peft_model(model, self.lora_config, adapter_name=ACTOR)
            if self.use_separate_reference_adapter:
                model.add_adapter(REFERENCE, self.lora_config)
                copy_adapter(model, ACTOR, REFERENCE)
                model.set_adapter(ACTOR)
        return model.to(self.device)

    def _compile_layers(self) -> None:
        """torch.compile each decoder layer of this agent's model (fewer, fused kernels and less
        Python per layer; the first steps pay the compilation)."""
        if self.compile_layers:
            from evo_sft.kernels.compile import compile_decoder_layers

            if not compile_decoder_layers(self.actor):
                warnings.warn("compile_layers=True but the model has no decoder layers to compile; running eager")

    def _enable_packing(self, wanted: bool) -> bool:
        if not wanted:
            return False
        from evo_sft.kernels.attention import enable_packed_attention
        from evo_sft.kernels.lora import fast_lora

        if not enable_packed_attention(self.actor):
            warnings.warn("packing=True but the model's attention cannot be switched; using padded batches")
            return False
        fast_lora(self.actor)
        return True

    @property
    def is_lora(self) -> bool:
        return self.lora_config is not None

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.actor.named_parameters() if p.requires_grad}

    def reinit_optimizers(self) -> None:
        """A fresh AdamW over every trainable parameter (LoRA and modules_to_save) and its schedule."""
        params = list(self.trainable_parameters().values())
        fused = bool(params) and all(p.is_cuda and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
        settings = {name: getattr(self, name) for name, h in HYPERPARAMETERS.items() if h.applies_to == "optimizer"}
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, fused=fused or None, **settings)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_schedule)

    @property
    def lr_schedule(self) -> LRSchedule:
        """The learning-rate schedule this agent trains with (its factor on `lr` at each step)."""
        return LRSchedule(self.schedule_steps, self.warmup_steps, self.min_lr_ratio, self.scheduler)

    def update_lr(self, lr: float, lr_schedule: LRSchedule | None = None) -> None:
        """Set the learning rate (and, if given, the schedule) in the optimizer's param groups
        and the scheduler, keeping the optimizer moments and the schedule's step."""
        _check_hyperparameters({"lr": lr})
        self.lr = lr
        if lr_schedule is not None:
            self.schedule_steps, self.min_lr_ratio = lr_schedule.total_steps, lr_schedule.min_lr_ratio
            self.scheduler, self.warmup_steps = lr_schedule.kind, lr_schedule.warmup_steps
        self._install_schedule()

    def _install_schedule(self) -> None:
        """Write `lr` and the schedule into the scheduler (its base rate and factor) and the
        param groups (the rate at the scheduler's current step)."""
        schedule, groups = self.lr_schedule, self.optimizer.param_groups
        self.lr_scheduler.lr_lambdas = [schedule] * len(groups)
        self.lr_scheduler.base_lrs = [self.lr] * len(groups)
        factor = schedule(self.lr_scheduler.last_epoch)
        for group in groups:
            group["initial_lr"] = self.lr
            group["lr"] = self.lr * factor
        self.lr_scheduler._last_lr = [group["lr"] for group in groups]

    # ----------------------------------------------------------------- training
    def to_device(self, *experiences):
        moved = tuple(
            {k: v.to(self.device) for k, v in e.items()} if isinstance(e, dict) else e.to(self.device)
            for e in experiences
        )
        return moved[0] if len(moved) == 1 else moved

    def set_training_mode(self, training: bool) -> None:
        self.actor.train(training)

    def learn(self, experiences: dict[str, torch.Tensor], training: bool = True) -> dict[str, float]:
        """`update_epochs` passes over the batch in optimizer steps of `batch_size` sequences.
        Returns the token-weighted mean loss over all steps and its perplexity."""
        rows = experiences["input_ids"].shape[0]
        micro = self.micro_batch_size_per_gpu or self.batch_size
        self.set_training_mode(training)
        loss_sum, token_sum = 0.0, 0
        with torch.set_grad_enabled(training):
            for _ in range(self.update_epochs):
                for start in range(0, rows, self.batch_size):
                    batch = {k: v[start:start + self.batch_size] for k, v in experiences.items()}
                    step_loss, step_tokens = step.optimizer_step(self, batch, micro, training)
                    loss_sum, token_sum = loss_sum + step_loss, token_sum + step_tokens
        loss_sum = float(loss_sum)  # the one device sync of learn()
        mean_loss = loss_sum / token_sum if token_sum else float("nan")
        perplexity = math.exp(mean_loss) if mean_loss < 700 else float("inf")
        return {"mean_loss": mean_loss, "mean_perplexity": perplexity, "tokens": token_sum}

    def apply_gradients(self) -> None:
        """Clip the accumulated gradients, take the optimizer and scheduler step."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.replicas:
            self.replicas.sum_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer_steps += 1

    def test(self, env, loop: int = 1, batch_size: int | None = None) -> float:
        """Fitness on the env's whole, fixed test set: -(sum of response-token cross-entropy)
        / (number of response tokens), appended to `fitness`. A non-finite loss gives -inf."""
        batch_size = batch_size or self.micro_batch_size_per_gpu or self.batch_size
        mean_loss = sum(self.test_loss(env, batch_size) for _ in range(loop)) / loop
        fitness = -mean_loss if math.isfinite(mean_loss) else -math.inf
        self.fitness.append(fitness)
        return fitness

    @torch.no_grad()
    def test_loss(self, env, batch_size: int) -> float:
        """(sum of response-token cross-entropy) / (number of response tokens) over the env's
        whole, fixed test set, in `batch_size`-row batches."""
        self.set_training_mode(False)
        loss_sum, token_sum = 0.0, 0
        for batch in env.test_batches(batch_size):
            with step.lora_weights(self):
                loss_sum += float(step.micro_loss_sum(self, batch))
            token_sum += supervised_token_count(batch["labels"])
        return loss_sum / token_sum

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_token_ids=None, batch_size: int = 16,
                 temperature: float = 0.0, top_p: float = 1.0) -> list[list[int]]:
        """Continue each prompt (token ids) through the actor adapter: `batch_size` prompts at a
        time, left-padded, with the KV cache; greedy where `temperature` is 0, else sampled at
        `temperature` within nucleus `top_p` from torch's global generator. Returns each prompt's
        new tokens up to, not including, its first stop token (default: the model's generation
        config's eos tokens), at most `max_new_tokens` of them."""
        if stop_token_ids is None:
            stop_token_ids = generation.eos_token_ids(self.actor)
        return generation.generate(self, prompts, max_new_tokens, stop_token_ids, batch_size, temperature, top_p)

    def get_action(self, obs: list[dict], training: bool = False, max_new_tokens: int = 64,
                   stop_token_ids=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """AgileRL's LLM `get_action`: `obs` is a list of prompts, each {"input_ids": [1, L]
        (and "attention_mask": [1, L], ones where the prompt is)}; sampled at temperature 1 when
        `training`, else greedy. Returns (completion_ids, action_masks): per prompt the prompt
        and its completion, [1, L + n], and a [1, L + n - 1] mask, True where position i
        predicts a generated token (i + 1)."""
        prompts = []
        for prompt in obs:
            ids = prompt["input_ids"].reshape(-1)
            mask = prompt.get("attention_mask")
            prompts.append(ids[mask.reshape(-1).bool()].tolist() if mask is not None else ids.tolist())
        completions = self.generate(prompts, max_new_tokens, stop_token_ids, temperature=1.0 if training else 0.0)
        completion_ids, action_masks = [], []
        for prompt, new in zip(prompts, completions):
            completion_ids.append(torch.tensor([prompt + new], dtype=torch.long))
            action_masks.append(torch.tensor([[False] * (len(prompt) - 1) + [True] * len(new)]))
        return completion_ids, action_masks

    def get_policy(self):
        return self.actor

    def recompile(self) -> None:
        """Compile the decoder layers again where `compile_layers` is on (AgileRL API)."""
        self._compile_layers()

    # ----------------------------------------------------------------- adapters
    @contextmanager
    def select_adapter(self, name: str):
        self.actor.set_adapter(name)
        try:
            yield self.actor
        finally:
            self.actor.set_adapter(ACTOR)

    def use_adapter(self, name: str) -> None:
        self.actor.set_adapter(name)

    def set_reference_policy(self, reference_update_interval: int | None = None) -> None:
        """Copy the actor adapter's weights into the reference adapter."""
        if not self.use_separate_reference_adapter:
            raise ValueError("this agent has no reference adapter (use_separate_reference_adapter=False)")
        copy_adapter(self.actor, ACTOR, REFERENCE)
        self.actor.set_adapter(ACTOR)

    # ----------------------------------------------------------------- hyperparameters and attributes
    @property
    def hyperparameters(self) -> dict:
        """Every hyperparameter of `evo_sft.hyperparameters` this agent has (the LoRA ones with
        LoRA only), as it trains with it."""
        return {name: getattr(self, name) for name, h in HYPERPARAMETERS.items()
                if self.is_lora or h.applies_to != "lora"}

    def evolvable_attributes(self) -> dict:
        """The hyperparameters that `hp_config` mutates (all of them without one)."""
        names = self.hp_config.names() if self.hp_config is not None else HYPERPARAMETERS
        return {name: getattr(self, name) for name in names}

    def set_hyperparameters(self, **hyperparameters) -> None:
        """Apply (mutated) hyperparameters so that they take effect at the next optimizer step:
        each is set as an attribute and written where the step reads it (optimizer param groups,
        scheduler; a LoRA setting changes the adapter keeping its function, see
        `evo_sft.sft.lora`). An unknown name or an impossible value is an error."""
        _check_hyperparameters(hyperparameters)
        values = {name: HYPERPARAMETERS[name].type(value) for name, value in hyperparameters.items()}
        kinds = {HYPERPARAMETERS[name].applies_to for name in values}
        lora_settings = {name: values.pop(name) for name in list(values) if HYPERPARAMETERS[name].applies_to == "lora"}
        if lora_settings and not self.is_lora:
            raise ValueError(f"{next(iter(lora_settings))} applies to LoRA agents; this one fine-tunes every weight")
        if "schedule" in kinds:  # an impossible schedule (cosine without total steps) fails before any change
            LRSchedule(self.schedule_steps, values.get("warmup_steps", self.warmup_steps), self.min_lr_ratio,
                       values.get("scheduler", self.scheduler))
        for name, value in values.items():
            setattr(self, name, value)
            if HYPERPARAMETERS[name].applies_to == "optimizer":
                for group in self.optimizer.param_groups:
                    group[name] = value
        if kinds & {"learning_rate", "schedule"}:
            self._install_schedule()
        if lora_settings:
            self._change_lora(**lora_settings)
        self.mutation_hook()

    def _change_lora(self, lora_r: int | None = None, lora_alpha: float | None = None,
                     lora_dropout: float | None = None) -> None:
        """New LoRA settings, keeping the function the adapter computes now: see `evo_sft.sft.lora`.
        Optimizer moments follow the weights: a grown rank pads them with zeros (B's scaled to its new
        units), a shrunk rank resets them (and their step) for the layer's A and B."""
        r = self.lora_r if lora_r is None else lora_r
        alpha = self.lora_alpha if lora_alpha is None else lora_alpha
        dropout = self.lora_dropout if lora_dropout is None else lora_dropout
        if (r, alpha) != (self.lora_r, self.lora_alpha):
            if r != self.lora_r and self.use_separate_reference_adapter:
                raise ValueError("lora_r cannot change on an agent with a separate reference adapter")
            new_scaling = lora.scaling(r, alpha, self.lora_config.use_rslora)
            for module in lora.actor_layers(self.actor):
                a, b = module.lora_A[ACTOR].weight, module.lora_B[ACTOR].weight
                old_scaling = module.scaling[ACTOR]
                new_a, new_b = lora.changed_rank(a.detach(), b.detach(), old_scaling, r, new_scaling)
                self._moments_follow(a, b, r, old_scaling / new_scaling)
                a.data, b.data = new_a, new_b
        self._lora_settings(r, alpha, dropout)

    def _moments_follow(self, a: torch.nn.Parameter, b: torch.nn.Parameter, r: int, b_factor: float) -> None:
        """AdamW's state of one layer's A and B for their new rank `r`, B now `b_factor` times
        larger: its gradients are `b_factor` times smaller, so its moments are too."""
        if r < a.shape[0]:
            self.optimizer.state.pop(a, None)
            self.optimizer.state.pop(b, None)
            return
        for param, dim, factor in ((a, 0, 1.0), (b, 1, b_factor)):
            moments = self.optimizer.state.get(param)
            if moments:
                moments["exp_avg"] = lora.zero_padded(moments["exp_avg"] / factor, r, dim)
                moments["exp_avg_sq"] = lora.zero_padded(moments["exp_avg_sq"] / factor ** 2, r, dim)

    def _lora_settings(self, r: int, alpha: float, dropout: float) -> None:
        """Record the LoRA settings of the adapter weights this agent holds now (no change to them)."""
        if (r, alpha, dropout) == (self.lora_r, self.lora_alpha, self.lora_dropout):
            return
        lora.set_settings(self.actor, r, alpha, dropout)
        self.lora_config.r, self.lora_config.lora_alpha, self.lora_config.lora_dropout = r, alpha, dropout
        self.lora_r, self.lora_alpha, self.lora_dropout = r, alpha, dropout

    def take_lora_rank(self, r: int, alpha: float, dropout: float) -> None:
        """Make room for adapter weights of rank `r` that are about to be loaded: A and B of the
        new shape (uninitialised), their optimizer state dropped, and the settings recorded."""
        for module in lora.actor_layers(self.actor):
            for param, shape in ((module.lora_A[ACTOR].weight, (r, module.in_features)),
                                 (module.lora_B[ACTOR].weight, (module.out_features, r))):
                if param.shape != shape:
                    self.optimizer.state.pop(param, None)
                    param.data = param.new_empty(shape)
        self._lora_settings(r, alpha, dropout)

    def inspect_attributes(self, agent: "SFT | None" = None, input_args_only: bool = False) -> dict:
        agent = agent or self
        names = INIT_ATTRIBUTES if input_args_only else INIT_ATTRIBUTES + STATE_ATTRIBUTES
        return {name: copy.deepcopy(getattr(agent, name)) for name in names}

    def set_attributes(self, attributes: dict) -> None:
        """Take the attributes `inspect_attributes` gave (of this agent or another) and write the
        hyperparameters among them into the optimizer and scheduler. The LoRA settings among them
        describe the adapter weights this agent holds already (imported or loaded with them), so
        they are recorded, not applied as a change."""
        for name in INIT_ATTRIBUTES + STATE_ATTRIBUTES:
            if name in attributes and name not in ("model_name", "model_config") + tuple(HYPERPARAMETERS):
                setattr(self, name, copy.deepcopy(attributes[name]))
        values = {name: attributes.get(name, value) for name, value in self.hyperparameters.items()}
        if self.is_lora:
            self._lora_settings(values.pop("lora_r"), values.pop("lora_alpha"), values.pop("lora_dropout"))
        hooks, self.mutation_hooks = self.mutation_hooks, []
        self.set_hyperparameters(**values)
        self.mutation_hooks = hooks

    def copy_attributes(self, agent: "SFT", clone_agent: "SFT") -> "SFT":
        """Copy `agent`'s attributes onto `clone_agent`, all but the LoRA settings: those describe
        the adapter weights, which this does not copy (`import_state` copies both)."""
        for name, value in self.inspect_attributes(agent).items():
            if not (name in HYPERPARAMETERS and HYPERPARAMETERS[name].applies_to == "lora"):
                setattr(clone_agent, name, value)
        return clone_agent

    def register_mutation_hook(self, hook) -> None:
        self.mutation_hooks.append(hook)

    def mutation_hook(self) -> None:
        for hook in self.mutation_hooks:
            hook()

    # ----------------------------------------------------------------- clones and member state
    def export_state(self, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
        """Everything a clone needs, as independent tensors plus JSON."""
        return state.export_state(self, device)

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Become a copy of the exported member. Every tensor is copied, never aliased."""
        state.import_state(self, tensors, meta)

    def clone(self, index: int | None = None, wrap: bool = True) -> "SFT":
        """An independent agent with the same weights, adapters, optimizer, scheduler and attributes."""
        clone = copy.copy(self)
        clone.actor = copy.deepcopy(self.actor)
        clone._compile_layers()  # a copied compiled layer would still call the original's forward
        clone.mutation_hooks = list(self.mutation_hooks)
        clone.reinit_optimizers()
        clone.import_state(*self.export_state(device=str(self.device)))
        clone.index = self.index if index is None else index
        return clone

    @classmethod
    def population(cls, size: int, **kwargs) -> list["SFT"]:
        """`size` agents, indexed 0..size-1, built with the same arguments. A given
        `actor_network` (and `lora_config`) is deep-copied per agent so that no two agents
        share weights."""
        agents = []
        for i in range(size):
            own = {k: copy.deepcopy(v) if k in ("actor_network", "lora_config") else v for k, v in kwargs.items()}
            agents.append(cls(index=i, **own))
        return agents

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self, path: str | Path, lora_only: bool = True, save_optimizer: bool = True) -> None:
        """Write `path/actor/` (PEFT adapter), `attributes.json`, optimizer and scheduler state
        and, when `lora_only=False` or without LoRA, the full weights. Atomic, hashed, no pickle."""
        self.checkpoint_snapshot(lora_only, save_optimizer).write_atomic(path)

    def checkpoint_snapshot(self, lora_only: bool = True, save_optimizer: bool = True):
        """What `save_checkpoint` writes, copied now, so that it can be written while training goes on."""
        return state.checkpoint_snapshot(self, lora_only, save_optimizer)

    def load_checkpoint(self, path: str | Path, load_optimizer: bool = False, overwrite_reference_adapter: bool = False,
                        overwrite_critic_adapter: bool = True, merge_lora_configs: bool = False) -> None:
        """Load a checkpoint written by `save_checkpoint`. `overwrite_critic_adapter` is accepted
        for API parity; SFT has no critic."""
        state.load_checkpoint(self, Path(path), load_optimizer, overwrite_reference_adapter, merge_lora_configs)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", accelerator=None) -> "SFT":
        """Rebuild an agent from a checkpoint: the base model comes from the saved full weights
        or, for a LoRA-only checkpoint, from the saved `model_name`."""
        from peft import LoraConfig

        path = Path(path)
        attributes, saved_lora = state.saved_init(path)
        init = {name: attributes[name] for name in INIT_ATTRIBUTES
                if name not in HYPERPARAMETERS and name not in SCHEDULE_ATTRIBUTES}
        init.update({name: attributes[name] for name in ("lr", "batch_size", "max_grad_norm")})
        init["lr_schedule"] = LRSchedule(attributes["schedule_steps"], attributes["warmup_steps"],
                                         attributes["min_lr_ratio"], attributes["scheduler"])
        lora_config = LoraConfig(**config_kwargs(saved_lora)) if saved_lora else None
        if (path / "config.json").exists():
            from transformers import AutoConfig, AutoModelForCausalLM

            network = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))  # weights: load_checkpoint
            init.update(model_name=None, actor_network=network)
        elif init["model_name"] is None:
            raise ValueError(
                f"{path} holds only the LoRA adapter of an agent built from actor_network; build the agent "
                "with the same base model and call agent.load_checkpoint(path) instead"
            )
        agent = cls(**init, device=device, accelerator=accelerator, lora_config=lora_config)
        agent.load_checkpoint(path, load_optimizer=True)
        return agent


def _given_lora_config(actor_network, lora_config, clone: bool):
    """The LoRA settings of a new agent: `lora_config`, else those of a PEFT model given as the
    network (its `actor` adapter's when cloning, which keeps that adapter; else its first's)."""
    from peft import PeftModel

    if not isinstance(actor_network, PeftModel):
        if clone and actor_network is not None and lora_config is not None:
            raise ValueError("clone=True keeps the adapters of actor_network, which has none; pass the PEFT model "
                             "of the agent being cloned, or clone=False to add adapters")
        return lora_config
    if clone and ACTOR not in actor_network.peft_config:
        raise ValueError(f"clone=True keeps actor_network's '{ACTOR}' adapter, which it does not have "
                         f"(adapters: {list(actor_network.peft_config)})")
    if lora_config is not None:
        return lora_config
    return actor_network.peft_config[ACTOR] if clone else next(iter(actor_network.peft_config.values()))


def _check_hyperparameters(values: dict) -> None:
    for name, value in values.items():
        if name not in HYPERPARAMETERS:
            raise ValueError(unknown(name))
        problem = HYPERPARAMETERS[name].problem(value)
        if problem:
            raise ValueError(f"{name} {problem}")


def save_llm_checkpoint(agent: SFT, path: str | Path) -> None:
    """Save the agent's adapter (PEFT format under `path/actor/`) and attributes, without optimizer."""
    agent.save_checkpoint(path, lora_only=True, save_optimizer=False)
