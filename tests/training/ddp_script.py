"""Run by ``accelerate launch`` in test_distributed.py: a tiny recipe on 2 CPU processes.

Accelerate enables FSDP only on accelerator devices: with ``--use_fsdp`` on CPU it silently
runs DDP (MULTI_CPU). So when the launcher asked for FSDP, this script builds the plugin from the
launcher's settings and selects FSDP itself, and reports whether parameters ended up sharded.
"""

import json
import os
import sys

from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from prosparse.training.loop import train
from prosparse.training.recipe import load_recipe

out, overrides = sys.argv[1], sys.argv[2:]
recipe = load_recipe(None, overrides)
fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
accelerator = Accelerator(gradient_accumulation_steps=recipe.grad_accum, cpu=True)
assert accelerator.num_processes == 2, accelerator.state
if fsdp:
    state = AcceleratorState()
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* settings
    state.distributed_type = DistributedType.FSDP
result = train(recipe, out, progress=False, accelerator=accelerator)
params = [p for m in accelerator._models for p in m.parameters()]
with open(f"{out}/rank-{accelerator.process_index}.json", "w") as f:
    json.dump({"lambdas": result.lambdas, "world": accelerator.num_processes,
               "backend": str(getattr(accelerator.state, "backend", "")),
               "param_types": sorted({type(p).__name__ for p in params}),
               "local_numel": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                  for p in params)}, f)
