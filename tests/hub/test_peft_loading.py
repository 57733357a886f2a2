"""Plain PEFT (no cladapt) loads what cladapt pushed, through HF_ENDPOINT, in a fresh process.

HF_ENDPOINT must be set before huggingface_hub is imported, so this runs PEFT in a subprocess,
exactly as a user's script would run against a mirror.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hub_helpers import BASE_ID

from cladapt.registry import Store
from cladapt.registry.hub import push

SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from peft import PeftModel
base_path, out, base_id = sys.argv[1], sys.argv[2], sys.argv[3]
ids = torch.tensor([[1, 5, 9, 17, 33]])
results = {}
for name, repo, sub in [("registry", "org/reg", "topics__v1"), ("single", "org/one", None)]:
    base = AutoModelForCausalLM.from_pretrained(base_path)
    kwargs = {"subfolder": sub} if sub else {}
    model = PeftModel.from_pretrained(base, repo, **kwargs)
    assert model.peft_config["default"].base_model_name_or_path == base_id
    with torch.no_grad():
        results[name] = model(ids).logits.contiguous()
save_file(results, out)
"""


def test_peft_from_pretrained_loads_pushed_folders(hub_env: Any, src_store: Store, tmp_path: Path, tiny_base_path: Path) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    push(src_store, "org/reg", base_model_id=BASE_ID)
    push(src_store, "org/one", "sentiment@2", base_model_id=BASE_ID)
    env = {**os.environ, "HF_ENDPOINT": hub_env.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
           "HF_TOKEN": hub_env.token, "HF_HOME": str(tmp_path / "hf-home")}
    out = tmp_path / "logits.safetensors"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_base_path), str(out), BASE_ID], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(out)
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    for name, ref in (("registry", "topics@1"), ("single", "sentiment@2")):
        base = AutoModelForCausalLM.from_pretrained(tiny_base_path)
        with torch.no_grad():
            want = PeftModel.from_pretrained(base, src_store.adapter_dir(ref))(ids).logits
        assert torch.equal(got[name], want), name
    served = {path for method, path in hub_env.requests if "/resolve/" in path}
    assert "/org/reg/resolve/main/topics__v1/adapter_model.safetensors" in served
