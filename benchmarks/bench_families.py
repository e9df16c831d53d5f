"""Train-step cost of the three families of `configs/study_families.yaml` at its settings (128 px, batch 16, 10
classes, its anchors and Faster R-CNN options; teacher ResNet-18 at 48 px, s = 32): CPU seconds (process time, one
intra-op thread, so that other jobs on a shared machine inflate it little) and wall seconds per step, median of
``--repeats`` after one warm-up, for the baseline, +KD_loc (GT branch online, as `cls2det train` runs it by default),
and the full method with the teacher's GT branch cached / online. Reuses ``cls2det.bench.step.StepBench``
(synthetic batch, SGD step); backbones are random, so every layer trains (an upper bound for the study's runs,
whose pre-trained backbones freeze their first stages).

    python benchmarks/bench_families.py [detector ...] [--repeats 3]
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from cls2det.bench import step
from cls2det.config import StudentConfig, StudyConfig, load_config, shipped_config
from cls2det.study.runner import row_config

VARIANTS = [step.Variant("baseline"), step.Variant("+kd_loc"), step.Variant("+all", cached=True), step.Variant("+all")]


def main() -> None:
    study = load_config(StudyConfig, shipped_config("study_families.yaml"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("detectors", nargs="*", default=study.detectors)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    students: dict[str, StudentConfig] = {
        d: row_config(study, "baseline", d, Path(study.out), 0).student for d in study.detectors
    }
    create = step.create_student
    step.create_student = lambda name, num_classes, _: create(name, num_classes, students[name])  # the study's settings
    torch.set_num_threads(1)
    distill = study.train.distill
    for detector in args.detectors:
        bench = step.StepBench(
            detector,
            batch_size=study.train.batch_size,
            image_size=students[detector].image_size,
            device="cpu",
            teacher_size=study.teacher.input_size,
            sample_size=distill.sample_size,
        )
        for variant in VARIANTS:  # warm-up
            bench.step(variant)
        cpu: dict = {v: [] for v in VARIANTS}
        wall: dict = {v: [] for v in VARIANTS}
        for _ in range(args.repeats):
            for variant in VARIANTS:
                start = time.process_time()
                wall[variant].append(bench.step(variant))
                cpu[variant].append(time.process_time() - start)
        print(detector, flush=True)
        for v in VARIANTS:
            seconds = statistics.median(cpu[v]), statistics.median(wall[v])
            print(f"  {v.name:18s} cpu {seconds[0]:.3f} s/step  wall {seconds[1]:.3f} s/step", flush=True)


if __name__ == "__main__":
    main()
