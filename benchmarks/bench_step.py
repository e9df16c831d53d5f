"""Training-step cost of distillation vs the plain baseline, all modes timed round-robin in one run.

    python benchmarks/bench_step.py --detector fasterrcnn_mobilenet_v3 --batch-size 4 --image-size 256
"""
import argparse

from cls2det.engine.bench import run_benchmarks

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--detector", default="fasterrcnn_mobilenet_v3")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    run_benchmarks(detector=args.detector, batch_size=args.batch_size, image_size=args.image_size,
                   repeats=args.repeats, device=args.device)
