"""What export raises for a model or input it cannot ship; below every other module of export/, so the
importance matrix's file (imatrix_file.py, which the GGUF writer imports) raises the same kind of error."""


class ExportError(ValueError):
    """The model cannot be written as a GGUF llama.cpp would load; nothing was written."""
