"""The runtime of sliced models, shared by the algorithm (`core`) and the output formats (`formats`).

`runtime.py` is self-contained (torch, transformers and safetensors only): `slicegpt.save`
copies it beside the weights as ``modeling_slicegpt.py``, so a per-layer sliced model loads
with plain `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.
"""
