"""Pure logic: evolution (selection, mutation, lineage, plans, hyperparameters) and the experiment
config. Nothing here, nor in the root conftest, imports torch: `evo_sft.evolution` and
`evo_sft.config` import without it, and test_without_torch.py runs these tests where torch is absent."""
