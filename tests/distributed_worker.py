"""Run under torchrun by test_distributed.py: slicing jobs through the Python API inside a process group.

argv[1] is a JSON file with a list of jobs; each is {"api": "slice_and_save" | "slice_model", "kwargs": {...}}.
slice_model jobs are saved by rank 0 to kwargs' "out".
"""

import json
import sys

import torch.distributed as dist

import slicegpt


def main() -> None:
    dist.init_process_group("gloo")
    for job in json.loads(open(sys.argv[1]).read()):
        kwargs = dict(job["kwargs"])
        if job["api"] == "slice_and_save":
            slicegpt.slice_and_save(**kwargs)
            continue
        out = kwargs.pop("out")
        loaded = slicegpt.load_model(kwargs.pop("model"), dtype=kwargs.pop("dtype", None))
        model, config = slicegpt.slice_model(loaded.model, loaded.tokenizer, **kwargs)
        assert config.distributed["world_size"] == dist.get_world_size()
        if dist.get_rank() == 0:
            slicegpt.save(model, loaded.tokenizer, config, out)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
