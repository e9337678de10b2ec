"""Under torchrun: the model each rank trains under DDP and under FSDP, as the builder and the Trainer make it,
described (test_builder.describe) into OUT/{strategy}-{rank}.json.

    torchrun --nproc_per_node 2 tests/builder_child.py BASE_FOLDER OUT
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from test_builder import describe

import stratos_lite as sl
from stratos_lite.train.fsdp import is_sharded
from stratos_lite.train.strategy import exit_distributed


def main() -> None:
    base, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    for strategy in ("ddp", "fsdp"):
        config = sl.TrainConfig(model=base, rank=4, alpha=8, dtype="float32", strategy=strategy, out_dir=str(out))
        model = sl.prepare_model(config)
        held = sl.Trainer(model, [], config).strategy.model
        (out / f"{strategy}-{dist.get_rank()}.json").write_text(json.dumps({**describe(held),
                                                                             "sharded": is_sharded(held)}))
    exit_distributed()


if __name__ == "__main__":
    main()
