"""Will it fit, and how long will it take: a training micro-batch simulated on fake tensors through the
builder's model (simulator.py), each rank's memory and the plan (planner.py, report.py), the largest batch or
row that fits (search.py), PyTorch's caching allocator modelled (allocator.py), a timed probe (probe.py).

Imports train/ (the builder, and a run for the probe), model/, data/ and the settings.
"""
