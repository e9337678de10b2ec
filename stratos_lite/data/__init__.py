"""The data: the scoring task's format both ways (task.py: prompt, completion, parser, bands, tiers), JSONL lines
to records (records.py), records to weighted training examples with a report (dataset.py), a forward's batch
and where its loss is taken (batch.py), packing (packing.py) and the band sampler (sampler.py).

Imports model/ (the tokenizer, the packed row's Segments) and storage/; the settings only for annotations.
"""
