"""The embedded demo: synthetic profiles and articles (data.py), its settings (config.py, demo.toml), the
profile-blind base shipped in shipped_base/ (base.py) and the whole pipeline (run.py).

The top floor but for the commands: it may import every other folder.
"""
