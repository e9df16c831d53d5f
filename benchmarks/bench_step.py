"""Training-step cost of distillation vs the plain baseline, every mode with the teacher online and cached, all
timed round-robin in one run (the same as `cls2det bench`).

    python benchmarks/bench_step.py --detector ssdlite320_mobilenet_v3 --batch-size 16 --image-size 128
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
    parser.add_argument("--channels-last", action="store_true",
                        help="also time every variant with student and teacher in channels_last memory format")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    args = parser.parse_args()
    run_benchmarks(detector=args.detector, batch_size=args.batch_size, image_size=args.image_size,
                   repeats=args.repeats, device=args.device, channels_last=args.channels_last,
                   memory=not args.no_memory)
