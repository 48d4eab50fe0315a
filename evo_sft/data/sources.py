"""Where rows and tokenizers come from: the built-in demo task, a local file or the hub."""
from pathlib import Path

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_splits(data, seed: int):
    """(train, test) `datasets.Dataset`s for a `DataConfig`, from the demo task, a local file or the hub."""
    from datasets import load_dataset

    if data.source == "demo":
        from evo_sft.data.demo import demo_dataset

        dataset = demo_dataset(data.num_rows, seed=seed)
    elif Path(data.source).suffix in DATA_FILE_BUILDERS:
        builder = DATA_FILE_BUILDERS[Path(data.source).suffix]
        dataset = load_dataset(builder, data_files={data.train_split: data.source})
    else:
        dataset = load_dataset(data.source)
    if data.source != "demo":
        if data.test_split is not None:
            return dataset[data.train_split], dataset[data.test_split]
        dataset = dataset[data.train_split]
    split = dataset.train_test_split(test_size=data.test_size, seed=seed)
    return split["train"], split["test"]
