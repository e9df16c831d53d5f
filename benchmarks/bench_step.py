"""Training-step cost of distillation vs the plain baseline, every mode with the teacher online and cached, all
timed round-robin in one run: a script form of `cls2det bench` (same options).

    python benchmarks/bench_step.py --detector ssdlite320_mobilenet_v3 --batch-size 16 --image-size 128
"""

import sys

from cls2det.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
