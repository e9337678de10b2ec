"""Shipping: a model straight to GGUF (gguf_file.py) with q8_0 and llama.cpp's K-quants (kquants.py, their
scale searches in kquant_search.py), each tensor's type per preset (quant_types.py), the importance matrix the
K-quants can weigh by (its file in imatrix_file.py, its collection from the task's records in imatrix.py), a
LoRA adapter as llama.cpp's adapter GGUF (lora_gguf.py), the Ollama Modelfile (modelfile.py), and which quant
to ship from scores (quant_choice.py). What they raise for what cannot ship is errors.py's ExportError.

Imports model/, data/ (imatrix.py renders the task's records as training does) and storage/.
"""
