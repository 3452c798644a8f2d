"""What ``install`` must check or switch off before touching a model (HF flags and KV cache, FSDP order)."""
