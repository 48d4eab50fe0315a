"""The compute kernels of the SFT step: packed batches (`packing`), varlen attention
(`attention`), the fused LoRA forward (`lora`), the chunked cross-entropy (`loss`),
`torch.compile` of decoder layers (`compile`) and optional Liger kernels (`liger`)."""
