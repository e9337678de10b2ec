"""The model and what wraps it: Qwen3 in plain PyTorch (qwen3.py, attention.py), its tokenizer and the one ChatML
prompt builder (tokenizer.py), HF model folders in and out (folders.py, shards.py), the adapters: LoRA and what
every adapter shares (lora.py), DoRA on it (dora.py), their PEFT files (peft_files.py), a 4-bit NF4 base under
them (nf4.py), the loss over the vocabulary a chunk at a time (vocab_loss.py), activations held on the host
(offload.py), batched decoding (generate.py), which attention kernel SDPA picks (attention_report.py), and
torch.compile of the decoder layers (compiling.py).

Imports storage/ only: it knows nothing of training, data, plans or exports.
"""
