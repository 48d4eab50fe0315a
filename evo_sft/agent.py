"""The SFT agent: a causal LM with a LoRA adapter named `actor`, trained by token-level
cross-entropy on response tokens, with the public API of AgileRL's `SFT`."""
import copy
import math
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from evo_sft import storage
from evo_sft.data import IGNORE_INDEX
from evo_sft.loss import supervised_token_count

ACTOR = "actor"
REFERENCE = "reference"
LOGIT_CHUNK_ELEMENTS = 2**27

# Attributes that define an agent and travel with it in checkpoints and clones.
INIT_ATTRIBUTES = (
    "pad_token_id", "pad_token", "model_name", "model_config", "index", "batch_size", "lr",
    "max_grad_norm", "update_epochs", "calc_position_embeddings", "micro_batch_size_per_gpu",
    "seed", "gradient_checkpointing", "use_liger_loss", "use_separate_reference_adapter",
)
STATE_ATTRIBUTES = ("fitness", "scores", "steps", "optimizer_steps")


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up to the learning rate, then cosine decay to `min_lr_ratio` of it."""

    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _constant(step: int) -> float:
    return 1.0


def _lora_signature(config) -> dict:
    return {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules) if config.target_modules else None,
    }


class SFT:
    """Supervised fine-tuning agent (AgileRL `SFT` API).

    `batch_size` sequences make one optimizer step; with a smaller `micro_batch_size_per_gpu`
    gradients accumulate and the loss is normalised by the supervised tokens of the whole step.
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
        if batch_size < 1 or lr <= 0:
            raise ValueError(f"batch_size must be >= 1 and lr > 0, got batch_size={batch_size}, lr={lr}")
        self.algo = "SFT"
        self.pad_token_id, self.pad_token = pad_token_id, pad_token
        self.model_name, self.model_config = model_name, model_config
        self.hp_config, self.index = hp_config, index
        self.batch_size, self.lr, self.max_grad_norm = batch_size, lr, max_grad_norm
        self.update_epochs, self.calc_position_embeddings = update_epochs, calc_position_embeddings
        self.micro_batch_size_per_gpu, self.device = micro_batch_size_per_gpu, torch.device(device)
        self.lora_config, self.accelerator, self.wrap = lora_config, accelerator, wrap
        self.seed, self.gradient_checkpointing = seed, gradient_checkpointing
        self.use_liger_loss = use_liger_loss
        self.use_separate_reference_adapter = use_separate_reference_adapter
        self.lr_schedule = lr_schedule
        self.fitness: list[float] = []
        self.scores: list[float] = []
        self.steps: list[int] = [0]
        self.optimizer_steps = 0
        self.mutation_hooks = []
        self._liger_loss = self._load_liger_loss() if use_liger_loss else None
        self._adapter_parameters: tuple = (None, {})  # (model, {adapter: {PEFT key: parameter}}), see _adapter_state

        torch.manual_seed(seed)
        if actor_network is None:
            from transformers import AutoModelForCausalLM

            actor_network = AutoModelForCausalLM.from_pretrained(model_name, **(model_config or {}))
        self.actor = self._prepare_model(actor_network, clone)
        # Padding-free packed micro-batches with varlen attention (evo_sft.packing); on by default on CUDA.
        self.packing = self._enable_packing(self.device.type == "cuda" if packing is None else packing)
        # torch.compile of each decoder layer and of the frozen head's loss chunk; on by default
        # where packing runs on CUDA.
        self.compile_layers = self.packing and self.device.type == "cuda" if compile_layers is None else compile_layers
        self._compile_layers()
        self.reinit_optimizers()

    # ----------------------------------------------------------------- model set-up
    def _prepare_model(self, model, is_clone: bool):
        from peft import PeftModel, get_peft_model

        if hasattr(model, "config"):
            model.config.use_cache = False
        if self.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
            model.enable_input_require_grads()
        if self.lora_config is not None and not isinstance(model, PeftModel):
            model = get_peft_model(model, self.lora_config, adapter_name=ACTOR)
            if self.use_separate_reference_adapter:
                model.add_adapter(REFERENCE, self.lora_config)
                self._copy_adapter(model, ACTOR, REFERENCE)
                model.set_adapter(ACTOR)
        return model.to(self.device)

    def _compile_layers(self) -> None:
        """torch.compile each decoder layer of this agent's model (fewer, fused kernels and less
        Python per layer; the first steps pay the compilation)."""
        if self.compile_layers:
            from evo_sft import packing

            if not packing.compile_decoder_layers(self.actor):
                warnings.warn("compile_layers=True but the model has no decoder layers to compile; running eager")

    def _enable_packing(self, wanted: bool) -> bool:
        if not wanted:
            return False
        from evo_sft import packing

        if not packing.enable_packed_attention(self.actor):
            warnings.warn("packing=True but the model's attention cannot be switched; using padded batches")
            return False
        packing.fast_lora(self.actor)
        return True

    @staticmethod
    def _copy_adapter(model, source: str, target: str) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, param in params.items():
                if f".{source}." in name or name.endswith(f".{source}"):
                    params[name.replace(f".{source}", f".{target}")].copy_(param)

    @staticmethod
    def _load_liger_loss():
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            warnings.warn("use_liger_loss=True but liger-kernel is not installed; using the chunked loss")
            return None
        if not torch.cuda.is_available():
            warnings.warn("use_liger_loss=True but no GPU is present; using the chunked loss")
            return None
        return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")

    @property
    def is_lora(self) -> bool:
        return self.lora_config is not None

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.actor.named_parameters() if p.requires_grad}

    def reinit_optimizers(self) -> None:
        """A fresh AdamW over every trainable parameter (LoRA and modules_to_save) and its schedule."""
        params = list(self.trainable_parameters().values())
        fused = bool(params) and all(p.is_cuda and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, fused=fused or None)
        schedule = self.lr_schedule or _constant
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def update_lr(self, lr: float, lr_schedule: LRSchedule | None = None) -> None:
        """Set the learning rate in the optimizer's param groups and the scheduler's base
        value, keeping the optimizer moments and the schedule's step."""
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.lr = lr
        if lr_schedule is not None:
            self.lr_schedule = lr_schedule
            self.lr_scheduler.lr_lambdas = [lr_schedule] * len(self.optimizer.param_groups)
        factor = self.lr_scheduler.lr_lambdas[0](self.lr_scheduler.last_epoch)
        self.lr_scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = lr
            group["lr"] = lr * factor
        self.lr_scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # ----------------------------------------------------------------- loss
    def _decoder_and_head(self):
        model = self.actor.get_base_model() if self.is_lora else self.actor
        return model.get_decoder(), model.get_output_embeddings()

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of cross-entropy over the supervised positions of one micro-batch. Logits are
        computed only at those positions, in chunks recomputed in backward, never for the
        whole tokens x vocabulary at once."""
        attention_mask = batch["attention_mask"]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0) if self.calc_position_embeddings else None
        decoder, head = self._decoder_and_head()
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=False).last_hidden_state
        targets = batch["labels"][:, 1:]
        supervised = targets != IGNORE_INDEX
        hidden, targets = hidden[:, :-1][supervised], targets[supervised]
        if hidden.shape[0] == 0:
            # No supervised token here: a zero that is still part of the graph, so that
            # backward() works and every parameter gets a (zero) gradient.
            return hidden.float().sum()
        if self._liger_loss is not None and isinstance(head, torch.nn.Linear):
            return self._liger_loss(head.weight, hidden, targets, head.bias)
        chunk = max(1, LOGIT_CHUNK_ELEMENTS // head.out_features)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            total = total + checkpoint(_chunk_loss_sum, head, hidden[start:start + chunk],
                                       targets[start:start + chunk], use_reentrant=False)
        return total

    def _packed_loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`_loss_sum` for a host-side padded micro-batch, run as one padding-free packed row:
        no padding is computed, shapes come from the host (no device sync), and a frozen head's
        loss and input gradient are computed together in chunks."""
        from evo_sft import packing

        batch = {k: v.cpu() for k, v in batch.items()}
        packed = packing.packed_to_device(packing.pack_batch(batch), self.device)
        _, head = self._decoder_and_head()
        hidden = self.packed_loss_hidden(packed)
        if self._liger_loss is not None and isinstance(head, torch.nn.Linear):
            return self._liger_loss(head.weight, hidden, packed["targets"], head.bias)
        if packing.is_frozen_linear(head):
            return packing.frozen_head_losses(hidden, head, packed["targets"], self.compile_layers).sum()
        chunk = max(1, LOGIT_CHUNK_ELEMENTS // head.out_features)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            total = total + checkpoint(_chunk_loss_sum, head, hidden[start:start + chunk],
                                       packed["targets"][start:start + chunk], use_reentrant=False)
        return total

    def packed_loss_hidden(self, packed: dict) -> torch.Tensor:
        """The decoder's last hidden states at the loss rows of a packed row on the device."""
        from evo_sft import packing

        decoder, _ = self._decoder_and_head()
        hidden = decoder(**packing.packed_model_kwargs(packed)).last_hidden_state[0]
        return hidden.index_select(0, packed["loss_index"])

    def _lora_step_weights(self):
        """The LoRA weights cast once for a packed micro-batch's forward and backward."""
        from evo_sft import packing

        if not self.packing:
            return nullcontext()
        return packing.lora_step_weights(self.actor, self._decoder_and_head()[1].weight.dtype)

    def _micro_loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.packing:
            return self._packed_loss_sum(batch)
        return self._loss_sum(self.to_device(batch))

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
                    step_rows = range(start, min(rows, start + self.batch_size))
                    step_loss, step_tokens = self._optimizer_step(experiences, step_rows, micro, training)
                    loss_sum, token_sum = loss_sum + step_loss, token_sum + step_tokens
        loss_sum = float(loss_sum)  # the one device sync of learn()
        mean_loss = loss_sum / token_sum if token_sum else float("nan")
        perplexity = math.exp(mean_loss) if mean_loss < 700 else float("inf")
        return {"mean_loss": mean_loss, "mean_perplexity": perplexity, "tokens": token_sum}

    def _optimizer_step(self, experiences, step_rows: range, micro: int, training: bool) -> tuple[torch.Tensor | float, int]:
        labels = experiences["labels"][step_rows.start:step_rows.stop]
        step_tokens = supervised_token_count(labels)
        if step_tokens == 0:
            warnings.warn(f"agent {self.index}: an optimizer step had no supervised tokens and was skipped")
            return 0.0, 0
        if training:
            self.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=self.device)
        for start in range(step_rows.start, step_rows.stop, micro):
            micro_batch = trim_padding({k: v[start:min(step_rows.stop, start + micro)] for k, v in experiences.items()})
            with self._lora_step_weights():
                loss_sum = self._micro_loss_sum(micro_batch)
                if training:
                    (loss_sum / step_tokens).backward()
            step_loss += loss_sum.detach()
        if training:
            self.apply_gradients()
        return step_loss, step_tokens

    def apply_gradients(self) -> None:
        """Clip the accumulated gradients, take the optimizer and scheduler step."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer_steps += 1

    @torch.no_grad()
    def test(self, env, loop: int = 1, batch_size: int | None = None) -> float:
        """Fitness on the env's whole, fixed test set: -(sum of response-token cross-entropy)
        / (number of response tokens). A non-finite loss gives -inf."""
        self.set_training_mode(False)
        batch_size = batch_size or self.micro_batch_size_per_gpu or self.batch_size
        losses = []
        for _ in range(loop):
            loss_sum, token_sum = 0.0, 0
            for batch in env.test_batches(batch_size):
                with self._lora_step_weights():
                    loss_sum += float(self._micro_loss_sum(batch))
                token_sum += supervised_token_count(batch["labels"])
            losses.append(loss_sum / token_sum)
        mean_loss = sum(losses) / len(losses)
        fitness = -mean_loss if math.isfinite(mean_loss) else -math.inf
        self.fitness.append(fitness)
        return fitness

    def get_action(self, *args, **kwargs):
        raise NotImplementedError("SFT trains on fixed responses and generates nothing; get_action is not available")

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
        self._copy_adapter(self.actor, ACTOR, REFERENCE)
        self.actor.set_adapter(ACTOR)

    # ----------------------------------------------------------------- attributes and evolution
    def evolvable_attributes(self) -> dict:
        names = self.hp_config.names() if self.hp_config is not None else ("lr", "batch_size")
        return {name: getattr(self, name) for name in names}

    @property
    def hyperparameters(self) -> dict:
        return self.evolvable_attributes()

    def inspect_attributes(self, agent: "SFT | None" = None, input_args_only: bool = False) -> dict:
        agent = agent or self
        names = INIT_ATTRIBUTES if input_args_only else INIT_ATTRIBUTES + STATE_ATTRIBUTES
        attributes = {name: copy.deepcopy(getattr(agent, name)) for name in names}
        attributes["lr_schedule"] = asdict(agent.lr_schedule) if agent.lr_schedule else None
        return attributes

    def copy_attributes(self, agent: "SFT", clone_agent: "SFT") -> "SFT":
        for name, value in self.inspect_attributes(agent).items():
            if name == "lr_schedule":
                value = agent.lr_schedule
            setattr(clone_agent, name, value)
        return clone_agent

    def register_mutation_hook(self, hook) -> None:
        self.mutation_hooks.append(hook)

    def mutation_hook(self) -> None:
        for hook in self.mutation_hooks:
            hook()

    def set_hyperparameters(self, **hyperparameters) -> None:
        """Apply (mutated) hyperparameters so that they take effect in the next optimizer step."""
        for name, value in hyperparameters.items():
            if name == "lr":
                self.update_lr(float(value))
            elif name == "batch_size":
                self.batch_size = int(value)
            elif name in INIT_ATTRIBUTES:
                setattr(self, name, value)
            else:
                raise ValueError(f"unknown hyperparameter '{name}' for SFT")
        self.mutation_hook()

    def export_state(self, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
        """Everything a clone needs, as independent tensors plus JSON: trainable weights,
        optimizer and scheduler state, attributes."""
        tensors = {f"param/{name}": p.detach().to(device, copy=True) for name, p in self.trainable_parameters().items()}
        optimizer_tensors, optimizer_structure = storage.flatten_state(self.optimizer.state_dict())
        scheduler_tensors, scheduler_structure = storage.flatten_state(_scheduler_state(self.lr_scheduler))
        tensors.update({f"optimizer/{k}": v.to(device, copy=True) for k, v in optimizer_tensors.items()})
        tensors.update({f"scheduler/{k}": v.to(device, copy=True) for k, v in scheduler_tensors.items()})
        meta = {"attributes": self.inspect_attributes(), "optimizer": optimizer_structure,
                "scheduler": scheduler_structure}
        return tensors, meta

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Become a copy of the exported member. Every tensor is copied, never aliased."""
        params = self.trainable_parameters()
        missing = set(params) - {k[len("param/"):] for k in tensors if k.startswith("param/")}
        if missing:
            raise ValueError(f"member state lacks trainable parameters: {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(tensors[f"param/{name}"])
        self.optimizer.load_state_dict(_unflatten(tensors, "optimizer/", meta["optimizer"], self.device))
        self.lr_scheduler.load_state_dict(_unflatten(tensors, "scheduler/", meta["scheduler"], self.device))
        self._set_attributes(meta["attributes"])

    def _set_attributes(self, attributes: dict) -> None:
        for name in INIT_ATTRIBUTES + STATE_ATTRIBUTES:
            if name in attributes and name not in ("model_name", "model_config"):
                setattr(self, name, copy.deepcopy(attributes[name]))
        schedule = attributes.get("lr_schedule")
        self.lr_schedule = LRSchedule(**schedule) if schedule else None
        self.lr_scheduler.lr_lambdas = [self.lr_schedule or _constant] * len(self.optimizer.param_groups)
        self.update_lr(self.lr)

    def clone(self, index: int | None = None, wrap: bool = True) -> "SFT":
        """An independent agent with the same weights, adapters, optimizer, scheduler and attributes."""
        clone = copy.copy(self)
        clone.actor = copy.deepcopy(self.actor)
        clone._compile_layers()  # a copied compiled layer would still call the original's forward
        clone.mutation_hooks = list(self.mutation_hooks)
        clone.reinit_optimizers()
        tensors, meta = self.export_state(device=str(self.device))
        clone.import_state(tensors, meta)
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

    def checkpoint_snapshot(self, lora_only: bool = True, save_optimizer: bool = True) -> storage.Snapshot:
        """What `save_checkpoint` writes, copied now, so that it can be written while training goes on."""
        snapshot = storage.Snapshot()
        if self.is_lora:
            for adapter in [ACTOR] + ([REFERENCE] if self.use_separate_reference_adapter else []):
                self._snapshot_adapter(snapshot, adapter)
        if not lora_only or not self.is_lora:
            model = self.actor.get_base_model() if self.is_lora else self.actor
            snapshot.tensors("model.safetensors", model.state_dict())
            snapshot.writer("config.json", copy.deepcopy(model.config).to_json_file)
        if save_optimizer:
            snapshot.state("optimizer", self.optimizer.state_dict())
            snapshot.state("scheduler", _scheduler_state(self.lr_scheduler))
        snapshot.json("attributes.json", {
            "algo": self.algo, "attributes": self.inspect_attributes(),
            "lora_config": _lora_kwargs(self.lora_config.to_dict()) if self.is_lora else None,
        })
        return snapshot

    def _snapshot_adapter(self, snapshot: storage.Snapshot, adapter: str) -> None:
        """`adapter` as PEFT's `save_pretrained` writes it (`<adapter>/adapter_model.safetensors`
        and `adapter_config.json`), loadable with `PeftModel.from_pretrained`."""
        snapshot.tensors(f"{adapter}/adapter_model.safetensors", self._adapter_state(adapter), metadata={"format": "pt"})
        config = copy.deepcopy(self.actor.peft_config[adapter])
        config.inference_mode = True
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = self.actor.base_model.model.__dict__.get("name_or_path") or None
        auto_mapping = None
        if config.task_type is None:
            base_class = self.actor._get_base_model_class(is_prompt_tuning=False)
            auto_mapping = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
        snapshot.writer(f"{adapter}/adapter_config.json",
                        lambda path: config.save_pretrained(path.parent, auto_mapping_dict=auto_mapping))

    def _adapter_state(self, adapter: str) -> dict[str, torch.Tensor]:
        """PEFT's `get_peft_model_state_dict(self.actor, adapter_name=adapter)`, asked once per model
        and adapter: each key is then bound to the parameter whose storage PEFT returned, and later
        calls read those parameters (PEFT walks every module and the whole state dict each time, 56
        of the 145 ms of a 3B member's checkpoint copy on an H200). A key that names no parameter
        keeps PEFT asked on every call."""
        from peft import get_peft_model_state_dict

        model, bound = self._adapter_parameters
        if model is not self.actor:  # a new agent, or a clone (copy.copy shares this tuple)
            bound = {}
            self._adapter_parameters = (self.actor, bound)
        if bound.get(adapter) is not None:
            return {key: p.detach() for key, p in bound[adapter].items()}
        state = get_peft_model_state_dict(self.actor, adapter_name=adapter)
        if adapter not in bound:
            by_storage = {(p.data_ptr(), p.shape, p.stride(), p.dtype): p for p in self.actor.parameters()}
            found = {key: by_storage.get((t.data_ptr(), t.shape, t.stride(), t.dtype)) for key, t in state.items()}
            bound[adapter] = found if all(p is not None for p in found.values()) else None
        return state

    def load_checkpoint(self, path: str | Path, load_optimizer: bool = False, overwrite_reference_adapter: bool = False,
                        overwrite_critic_adapter: bool = True, merge_lora_configs: bool = False) -> None:
        """Load a checkpoint written by `save_checkpoint`. `overwrite_critic_adapter` is accepted
        for API parity; SFT has no critic."""
        path = Path(path)
        storage.verify_directory(path)
        saved = storage.load_json(path / "attributes.json")
        if (path / "model.safetensors").exists():
            model = self.actor.get_base_model() if self.is_lora else self.actor
            weights = path / "model.safetensors"
            try:
                model.load_state_dict(storage.load_tensors(weights, self.device))
            except RuntimeError as error:  # missing, unexpected or misshapen tensors
                raise storage.CheckpointError(f"{weights} does not fit this agent's model: {error}") from error
        if self.is_lora:
            self._load_adapter(path, merge_lora_configs, overwrite_reference_adapter)
        if load_optimizer and (path / "optimizer.safetensors").exists():
            self.optimizer.load_state_dict(storage.load_state(path, "optimizer", self.device))
            self.lr_scheduler.load_state_dict(storage.load_state(path, "scheduler", self.device))
        self._set_attributes(saved["attributes"])

    def _load_adapter(self, path: Path, merge_lora_configs: bool, overwrite_reference_adapter: bool) -> None:
        from peft import LoraConfig, set_peft_model_state_dict

        adapter_dir = path / ACTOR
        saved_config = LoraConfig.from_pretrained(adapter_dir)
        current = self.actor.peft_config[ACTOR]
        weights = storage.load_tensors(adapter_dir / "adapter_model.safetensors", self.device)
        if _lora_signature(saved_config) != _lora_signature(current):
            if not merge_lora_configs:
                raise ValueError(
                    f"LoRA config of {adapter_dir} {_lora_signature(saved_config)} does not match this agent's "
                    f"{_lora_signature(current)}; pass merge_lora_configs=True to reconcile them"
                )
            self._rebuild_adapter(_merged_lora_config(current, saved_config))
            weights = _pad_lora_weights(weights, self.actor)
        set_peft_model_state_dict(self.actor, weights, adapter_name=ACTOR)
        if self.use_separate_reference_adapter:
            if overwrite_reference_adapter:
                self._copy_adapter(self.actor, ACTOR, REFERENCE)
            elif (path / REFERENCE).exists():
                reference = storage.load_tensors(path / REFERENCE / "adapter_model.safetensors", self.device)
                set_peft_model_state_dict(self.actor, reference, adapter_name=REFERENCE)
            self.actor.set_adapter(ACTOR)

    def _rebuild_adapter(self, config) -> None:
        self.actor.delete_adapter(ACTOR)
        self.actor.add_adapter(ACTOR, config)
        self.actor.set_adapter(ACTOR)
        self._adapter_parameters = (None, {})  # new parameter objects
        self.lora_config = config
        self.reinit_optimizers()

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", accelerator=None) -> "SFT":
        """Rebuild an agent from a checkpoint: the base model comes from the saved full weights
        or, for a LoRA-only checkpoint, from the saved `model_name`."""
        from peft import LoraConfig

        path = Path(path)
        storage.verify_directory(path)
        saved = storage.load_json(path / "attributes.json")
        attributes = saved["attributes"]
        init = {name: attributes[name] for name in INIT_ATTRIBUTES}
        schedule = attributes.get("lr_schedule")
        init["lr_schedule"] = LRSchedule(**schedule) if schedule else None
        lora_config = LoraConfig(**_lora_kwargs(saved["lora_config"])) if saved["lora_config"] else None
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


def _chunk_loss_sum(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    width = int(batch["attention_mask"].sum(-1).max())
    return {k: v[:, :width] for k, v in batch.items()}


def _scheduler_state(scheduler) -> dict:
    """The scheduler's state without its schedule callables, which are rebuilt from attributes."""
    state = scheduler.state_dict()
    state["lr_lambdas"] = [None] * len(state["lr_lambdas"])
    return state


def _unflatten(tensors: dict[str, torch.Tensor], prefix: str, structure, device) -> dict:
    own = {k[len(prefix):]: v.to(device, copy=True) for k, v in tensors.items() if k.startswith(prefix)}
    return storage.unflatten_state(own, structure, device=device)


def _lora_kwargs(config: dict) -> dict:
    from peft import LoraConfig

    fields = LoraConfig.__dataclass_fields__
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items() if k in fields and fields[k].init}


def _merged_lora_config(current, saved):
    """The larger rank and the union of target modules. lora_alpha is chosen so that the
    scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) equals the saved adapter's: the saved
    weights, padded into the top-left slice, then give exactly the saved adapter's output."""
    def rank_divisor(r: int, rslora: bool) -> float:
        return math.sqrt(r) if rslora else r

    merged = copy.deepcopy(current)
    merged.r = max(current.r, saved.r)
    saved_scaling = saved.lora_alpha / rank_divisor(saved.r, saved.use_rslora)
    alpha = saved_scaling * rank_divisor(merged.r, merged.use_rslora)
    merged.lora_alpha = int(alpha) if float(alpha).is_integer() else alpha
    merged.target_modules = set(current.target_modules or ()) | set(saved.target_modules or ())
    return merged


def _pad_lora_weights(weights: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Place each saved LoRA matrix in the top-left slice of the freshly built (larger) one.
    The fresh lora_B is zero, so the extra rank adds nothing until it trains."""
    from peft import get_peft_model_state_dict

    padded = {}
    for name, current in get_peft_model_state_dict(model, adapter_name=ACTOR).items():
        block = current.detach().clone()
        if name in weights:
            saved = weights[name]
            block[tuple(slice(0, n) for n in saved.shape)] = saved.to(block.dtype)
        padded[name] = block
    return padded


def save_llm_checkpoint(agent: SFT, path: str | Path) -> None:
    """Save the agent's adapter (PEFT format under `path/actor/`) and attributes, without optimizer."""
    agent.save_checkpoint(path, lora_only=True, save_optimizer=False)
