"""Memory cost of loading a checkpoint: RSS increase vs the weights' file size.

    python bench/load_memory.py [--mb 600]

Writes a random bf16 checkpoint of >= 500 MB in the real format (once, under
.cache/bench), then loads it in fresh subprocesses, each measuring its own RSS
(VmRSS / VmHWM from /proc) before and after ``StepAudio2.from_pretrained`` and after
one forward that touches every weight:
  * ours, stored dtype (bf16): parameters are views of the mmapped shards;
  * ours, converted to fp32 (a copy is unavoidable: 2x the bytes);
  * naive: build the model with allocated parameters, then copy the state dict in
    (what loading without the meta device costs).
Goal (issue 2): in the stored dtype, RSS increase <= 1.3x the weights' file size.
Prints a table and writes bench/results/load_memory.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, machine, print_table, write_results  # noqa: E402

CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
def mem():
    d = {}
    for line in open('/proc/self/status'):
        k, v = line.split(':', 1)
        if k in ('VmRSS', 'VmHWM'):
            d[k] = int(v.split()[0]) * 1024
    return d
from stepaudio2.model import StepAudio2
from stepaudio2.model.modeling import StepAudio2Net
from stepaudio2.model.config import StepAudio2Config
from stepaudio2.model.checkpoint import load_state_dict
from stepaudio2.model.tokenizer import StepAudioTokenizer
path, mode = sys.argv[1], sys.argv[2]
before = mem()
if mode == 'naive':
    cfg = StepAudio2Config.from_file(path)
    net = StepAudio2Net(cfg).to(torch.bfloat16)
    expected = {k: v.shape for k, v in net.state_dict().items()}
    net.load_state_dict(load_state_dict(path, expected))
    tok = StepAudioTokenizer.from_dir(path)
    model = StepAudio2(net, cfg, tok, torch.device('cpu'))
else:
    model = StepAudio2.from_pretrained(path, dtype=None if mode == 'stored' else torch.float32)
loaded = mem()
ids = model.tokenizer.encode('<|BOT|>human\nhello<|EOT|><|BOT|>assistant\n')
model.logits(ids)
after = mem()
print(json.dumps({'before': before, 'loaded': loaded, 'after_forward': after, 'dtype': str(model.dtype)}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=600, help="approximate checkpoint size (>= 500)")
    args = ap.parse_args()
    from stepaudio2.model.checkpoint import checkpoint_bytes
    from stepaudio2.model.tiny import TinyDims, make_tiny_checkpoint

    # ~14.7 M bf16 parameters per layer at width 1024 / FFN 4096.
    layers = max(1, round(args.mb * 1e6 / 2 / 14.7e6))
    dims = TinyDims(hidden_size=1024, intermediate_size=4096, num_layers=layers, num_heads=16, num_kv_heads=4,
                    audio_state=256, audio_heads=4, audio_layers=2)
    path = CACHE / f"load-{args.mb}mb-bf16"
    if not (path / "config.json").exists():
        print(f"writing a random {layers}-layer bf16 checkpoint to {path} ...")
        make_tiny_checkpoint(path, dims=dims, dtype="bfloat16", max_shard_bytes=200 * 1024**2)
    size = checkpoint_bytes(path)
    results = {"machine": machine(), "checkpoint_bytes": size, "layers": layers, "runs": {}}
    rows = []
    for mode, label in [("stored", "ours, stored dtype (bf16)"), ("fp32", "ours, converted to fp32"),
                        ("naive", "naive copy into allocated params")]:
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True,
                             check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        base = r["before"]["VmRSS"]
        load_inc = r["loaded"]["VmHWM"] - base
        peak_inc = r["after_forward"]["VmHWM"] - base
        results["runs"][mode] = {**r, "load_increase_bytes": load_inc, "peak_increase_bytes": peak_inc,
                                 "peak_ratio_to_file": peak_inc / size}
        rows.append([label, size / 1e6, load_inc / 1e6, peak_inc / 1e6, peak_inc / size])
    print_table("RSS increase while loading (goal for the stored dtype: <= 1.3x file size)",
                ["mode", "weights MB", "load +MB (peak)", "after forward +MB (peak)", "peak / file"], rows)
    print(f"wrote {write_results('load_memory', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
