"""Files: `storage` (safetensors + JSON, atomic hashed directories, no pickle) and `checkpoint`
(the evolution checkpoints a run resumes from)."""
