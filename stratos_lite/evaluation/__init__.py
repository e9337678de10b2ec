"""Scoring by generation: the torch model and exported GGUFs as engines (engines.py), their predictions
(predictions.py), the report's metrics (metrics.py), the evaluation itself (evaluate.py), its markdown and
pictures (report.py, charts.py), and the prompts servers build from a GGUF (serving.py).

Imports model/, data/, storage/, and train/'s metrics log (for TensorBoard); never export/.
"""
