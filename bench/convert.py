"""Converting the default GGUF base model: ftpipe's conversion against plain transformers (config, weights and
tokenizer read from the .gguf), each in a fresh interpreter, side by side in the same run.

    python bench/convert.py [--repeats 3]

Prints the median CPU seconds of each, the ratio, and whether both gave the same weights, tokenizer and config
(ftpipe drops the config's note that the weights were quantized: it saves them de-quantized).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from ftpipe.core.layout import downloads_dir
from ftpipe.core.modeling import fetch_default_gguf

LOAD = {
    "transformers": "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                    "model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)\n"
                    "tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)\n",
    "ftpipe": "from ftpipe.core.modeling import _load_source\n"
              "model, tokenizer = _load_source({'kind': 'gguf', 'location': gguf}, False, None)\n",
}
PROGRAM = """
import hashlib, json, sys, time
from pathlib import Path
import torch, transformers
gguf = Path(sys.argv[1])
start = time.process_time()
{load}
seconds = time.process_time() - start
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode() + tensor.contiguous().view(torch.uint8).numpy().tobytes())
config = {{key: value for key, value in model.config.to_dict().items() if key != "quantization_config"}}
digest.update(json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.chat_template, config],
                         sort_keys=True, default=str).encode())
print(json.dumps({{"seconds": seconds, "digest": digest.hexdigest()}}))
"""


def convert(side: str, gguf: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROGRAM.format(load=LOAD[side]), gguf],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    gguf = str(fetch_default_gguf(downloads_dir()))
    runs = {side: [] for side in LOAD}
    for _ in range(args.repeats):
        for side in LOAD:
            runs[side].append(convert(side, gguf))
    median = {side: statistics.median(r["seconds"] for r in found) for side, found in runs.items()}
    same = len({r["digest"] for found in runs.values() for r in found}) == 1
    print(f"converting {gguf.rsplit('/', 1)[-1]}: transformers {median['transformers']:.1f} s of CPU, "
          f"ftpipe {median['ftpipe']:.1f} s (median of {args.repeats}): "
          f"{median['transformers'] / median['ftpipe']:.2f}x; same weights, tokenizer and config: {same}")


if __name__ == "__main__":
    main()
