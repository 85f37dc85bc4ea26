"""One of the processes of test_multihost.py: joins the others, then generates with the library on shared meshes.

    python -m tests.multihost_worker COORDINATOR NUM_PROCESSES PROCESS_ID OUT_JSON
(XLA_FLAGS sets this process's device count; JAX_PLATFORMS=cpu.)
"""

import json
import sys

from bluelm_jax import distributed

coordinator, num_processes, process_id, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
assert distributed.initialize(coordinator, num_processes, process_id)  # before any other JAX call

import jax  # noqa: E402

from bluelm_jax import sharding  # noqa: E402
from tests.sharding_data import CONFIG, greedy_ids, model_of, prompt_logits, prompts, random_params  # noqa: E402

result = {"process_count": jax.process_count(), "devices": jax.device_count(),
          "local_devices": jax.local_device_count(), "runs": {}}
host_params = random_params(CONFIG, seed=0)
for mesh_spec in ("data=2,tensor=4", "data=1,tensor=8"):
    mesh = sharding.make_mesh(mesh_spec)
    model = model_of(sharding.shard_params(host_params, CONFIG, mesh), mesh)
    gate = model.params["model"]["layers"][0]["mlp"]["gate_proj"]["kernel"]
    result["runs"][mesh_spec] = {"ids": greedy_ids(model, prompts(CONFIG)),
                                 "logits": prompt_logits(model, prompts(CONFIG)).tolist(),
                                 "local_shards": len(gate.addressable_shards),
                                 "gate_proj_shard_shapes": sorted({tuple(s.data.shape) for s in gate.addressable_shards})}
with open(out_path, "w") as f:
    json.dump(result, f)
distributed.print0("multihost worker done")
