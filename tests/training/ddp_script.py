"""Run by ``accelerate launch`` in test_distributed.py: a tiny recipe on 2 CPU processes."""

import json
import sys

from accelerate import Accelerator

from prosparse.config import load_recipe
from prosparse.training.loop import train

out, overrides = sys.argv[1], sys.argv[2:]
recipe = load_recipe(None, overrides)
accelerator = Accelerator(gradient_accumulation_steps=recipe.grad_accum, cpu=True)
assert accelerator.num_processes == 2, accelerator.state
result = train(recipe, out, progress=False, accelerator=accelerator)
with open(f"{out}/rank-{accelerator.process_index}.json", "w") as f:
    json.dump({"lambdas": result.lambdas, "world": accelerator.num_processes,
               "backend": str(getattr(accelerator.state, "backend", ""))}, f)
