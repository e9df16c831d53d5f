"""Crop K boxes: ours (one grid_sample per image) vs the naive replicate-the-image reference, in one run.

python benchmarks/bench_crops.py --boxes 256 --images 2 --size 1024 --crop 112
"""

from cls2det.bench.crops import main

if __name__ == "__main__":
    main()
