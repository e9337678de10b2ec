"""The model and what wraps it: Qwen3 in plain PyTorch (qwen3.py), its tokenizer and the one ChatML prompt
builder (tokenizer.py), HF model folders in and out (folders.py), DoRA (dora.py) and its PEFT files
(peft_files.py), batched decoding (generate.py), which attention kernel SDPA picks (attention_report.py), and
torch.compile of the decoder layers (compiling.py).

Imports storage/ only: it knows nothing of training, data, plans or exports.
"""
