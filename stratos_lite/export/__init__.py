"""Shipping: a model straight to GGUF (gguf_file.py) with q8_0 and llama.cpp's K-quants (kquants.py), each
tensor's type per preset (quant_types.py), a LoRA adapter as llama.cpp's adapter GGUF (lora_gguf.py), the Ollama
Modelfile (modelfile.py), and which quant to ship from scores (quant_choice.py).

Imports model/ and storage/.
"""
