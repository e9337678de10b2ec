"""Small shared I/O: files read with the file named on error (files.py), outputs written whole or not at all
(atomic.py), one run per out_dir (lock.py), SVG documents as text (svg.py).

The ground floor: it imports nothing of the package, and every other folder may import it.
"""
