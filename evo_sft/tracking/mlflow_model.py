"""The MLflow model of a registered evo-sft export: a pyfunc "model from code". MLflow keeps this
file beside the export's files (its artifacts) and runs it to load them, so loading needs MLflow,
torch and transformers (and peft for an adapter), not evo-sft, and reads no pickle.

Artifacts: `model`, an export folder (a PEFT adapter, or a whole model, with its tokenizer);
`base_model`, the base an adapter was trained on where that is not a hub id (else the adapter
config's `base_model_name_or_path` is loaded). Model config: `max_new_tokens` and
`stop_token_ids`, as the run generated with. `predict(prompts)` answers each prompt with its greedy
response, the prompt rendered as the run rendered its test prompts (the chat template's user turn).
"""
import json
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel


class EvoSFTModel(PythonModel):
    def load_context(self, context):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(context.artifacts["model"])
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        adapter_config = folder / "adapter_config.json"
        if adapter_config.is_file():
            from peft import PeftModel

            base = context.artifacts.get("base_model") or json.loads(adapter_config.read_text())["base_model_name_or_path"]
            self.model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(folder)
        self.model.eval()
        self.max_new_tokens = context.model_config["max_new_tokens"]
        self.stop_token_ids = context.model_config["stop_token_ids"]

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return [self.respond(prompt) for prompt in model_input]

    def respond(self, prompt: str) -> str:
        import torch

        tokenizer = self.tokenizer
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            output = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                         do_sample=False, max_new_tokens=self.max_new_tokens,
                                         eos_token_id=self.stop_token_ids, pad_token_id=tokenizer.pad_token_id)
        response = output[0, len(ids):].tolist()
        stops = [i for i, token in enumerate(response) if token in self.stop_token_ids]
        return tokenizer.decode(response[:stops[0]] if stops else response, skip_special_tokens=False)


mlflow.models.set_model(EvoSFTModel())
