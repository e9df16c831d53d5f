"""The ``cls2det`` command: data / teacher / train / eval / study / demo / bench / export / predict.

Every sub-command validates its inputs before spending compute; a bad input ends in one line on stderr
(``error: ...``) and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, NoReturn

from cls2det.config import (
    DET_TERMS,
    KD_TERMS,
    TEACHER_PRECISIONS,
    ConfigError,
    TeacherConfig,
    TrainConfig,
    load_config,
)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
MAX_PROBLEMS = 20  # `data check` prints this many of a dataset's problems, then how many more there are


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come anywhere after the positionals, which argparse alone does not allow
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_BAD_INPUT
    from cls2det.engine.run_dir import TrainingInterrupted
    from cls2det.errors import Cls2detError

    try:
        return args.func(args) or 0
    except TrainingInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Cls2detError as err:  # what a user can fix; anything else is a bug and keeps its traceback
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cls2det", description="Distill image classifiers into object detectors.")
    parser.add_argument("--version", action="version", version=f"cls2det {package_version()}")
    commands = parser.add_subparsers(title="commands")

    data = commands.add_parser("data", help="make, check or import COCO-format datasets").add_subparsers(title="data")
    p = data.add_parser("demo", help="generate the embedded demo dataset (digits in 22 fonts on skimage photos)")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write (annotations/, images/)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    p.add_argument("--train-images", type=positive_int, default=None, help="images in the train split (default 600)")
    p.add_argument("--val-images", type=positive_int, default=None, help="images in the val split (default 200)")
    p.add_argument("--image-size", type=positive_int, default=None, help="square image side in px (default 256)")
    p.add_argument(
        "--object-size", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
        help="range of a digit's longer side, fraction of the image side (default 0.1 0.6)",
    )  # fmt: skip
    p.add_argument("--source-px", type=int, default=None, help="render glyphs at this em and upscale (default: native)")
    p.set_defaults(func=cmd_data_demo)
    p = data.add_parser("check", help="validate a COCO-format dataset (JSON, ids, boxes, image files)")
    p.add_argument("dir", type=Path, help="dataset folder (annotations/{train,val}.json, images/) or a data YAML")
    p.add_argument("--splits", default="train,val", help="comma list of the splits to check (default train,val)")
    p.add_argument("--no-images", action="store_true", help="skip opening every image file")
    p.add_argument(
        "--clip-tolerance", type=non_negative_float, default=1.0, help="pixels a box may exceed the image (clipped)"
    )
    p.set_defaults(func=cmd_data_check)
    p = data.add_parser("import", help="convert a Pascal VOC or YOLO dataset to the COCO-format layout")
    p.add_argument("format", choices=["voc", "yolo"], help="the layout of SRC")
    p.add_argument("src", type=Path, help="the VOC folder (Annotations/, JPEGImages/) or the YOLO dataset folder")
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="the COCO-format dataset folder to write (new, or an earlier import it replaces)",
    )
    p.add_argument(
        "--classes",
        default=None,
        help="class names, a comma list or a file with one per line (default: voc: the names in the XML files, "
        "sorted; yolo: data.yaml's names or classes.txt)",
    )
    p.add_argument(
        "--splits",
        default=None,
        help="voc: split=image list, e.g. train=train.txt,val=val.txt (default: ImageSets/Main/trainval.txt + "
        "test.txt, else train.txt + val.txt); yolo: split names or split=source split, e.g. train,val=valid "
        "(default train,val); the output splits are train, val or test",
    )
    p.set_defaults(func=cmd_data_import)

    p = commands.add_parser("teacher", help="train the classifier teacher on the GT crops of a dataset")
    p.add_argument("dir", type=Path, help="dataset folder or data YAML")
    p.add_argument("--out", required=True, type=Path, help="the teacher run folder")
    p.add_argument("--arch", default=None, help="resnet18 | resnet50 | any torchvision or timm classifier name")
    p.add_argument("--epochs", type=positive_int, default=None, help="passes over the train crops (default 6)")
    p.add_argument("--pretrained", default=None, help="'imagenet' or a local weights file")
    p.add_argument("--loss", default=None, help="ce+bce (default: suits softmax and sigmoid students) | ce | bce")
    p.add_argument("--config", type=Path, default=None, help="YAML with TeacherConfig keys")
    p.add_argument("--resume", action="store_true", help="continue the teacher run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a teacher run already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="key=value overrides of TeacherConfig")
    p.set_defaults(func=cmd_teacher)

    p = commands.add_parser("train", help="train a student detector, with or without distillation")
    p.add_argument("dir", type=Path, help="dataset folder or data YAML")
    p.add_argument("--out", required=True, type=Path, help="the run folder")
    p.add_argument("--list", action=_ListDetectors, help="list the detector names and exit")
    p.add_argument("--teacher", default=None, help="teacher run folder (needed for --kd cls / kd_loc)")
    p.add_argument(
        "--detector", default=None, help="student detector name (default fasterrcnn_mobilenet_v3; see --list)"
    )
    p.add_argument("--kd", default=None, help=f"none, or a comma list of {', '.join(KD_TERMS + DET_TERMS)}")
    p.add_argument(
        "--det-teacher",
        default=None,
        metavar="RUN",
        help="detector teacher for the det:* terms: a run of the student's detector (train --kd none)",
    )
    p.add_argument("--epochs", type=positive_int, default=None, help="passes over the train split (default 12)")
    p.add_argument("--config", type=Path, default=None, help="YAML with TrainConfig keys (configs/*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--devices", default=None, help="Fabric devices: N or 'auto'")
    p.add_argument("--accelerator", default=None, help="Fabric accelerator: auto | cpu | cuda")
    p.add_argument("--strategy", default=None, help="Fabric strategy: auto | ddp | ...")
    p.add_argument("--precision", default=None, help="Fabric precision: 32-true | bf16-mixed | 16-mixed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. distill.temperature=4 optim.lr=0.01")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("eval", help="COCO mAP of a trained student on a split")
    p.add_argument("run", type=Path, help="the training run folder")
    p.add_argument("dir", type=Path, help="dataset folder or data YAML with the run's classes")
    p.add_argument("--split", default="val", help="the split to evaluate (default val)")
    p.add_argument("--checkpoint", default="last", choices=["last", "best"], help="which weights (default last)")
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write the metrics to this JSON file (a metric without a value: null)",
    )
    p.add_argument("--errors", action="store_true", help="also print the TIDE error breakdown (AP50 points lost)")
    p.set_defaults(func=cmd_eval)

    p = commands.add_parser("study", help="run a grid of rows x seeds x detectors from a YAML and write the report")
    p.add_argument("config", type=Path, help="study YAML (e.g. configs/study_full.yaml, a file or a shipped recipe)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the study config, e.g. out=runs/study")
    p.set_defaults(func=cmd_study)

    p = commands.add_parser("demo", help="the paper's Table 1 on the embedded dataset, end to end")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="study folder (default runs/demo)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the demo study config")
    p.set_defaults(func=cmd_demo)

    p = commands.add_parser("bench", help="time distillation (online and cached teacher) against plain training")
    p.add_argument("--detector", default="fasterrcnn_mobilenet_v3", help="student detector name")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per step (default 4)")
    p.add_argument("--image-size", type=positive_int, default=256, help="side of the random images (default 256)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed steps per variant; the median is shown")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--teacher-size", type=positive_int, default=112, help="the teacher's input side in pixels")
    p.add_argument("--sample-size", type=positive_int, default=112, help="KD_loc's crop side s in pixels")
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="also time every variant with student and teacher in channels_last memory format",
    )
    p.add_argument(
        "--teacher-precision",
        default=None,
        choices=TEACHER_PRECISIONS[1:],
        help="also time the cached KD_loc modes with the teacher in this precision",
    )
    p.add_argument(
        "--precision",
        default="32-true",
        choices=TEACHER_PRECISIONS[1:],
        help="autocast of every step, as train.precision (default 32-true)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.set_defaults(func=cmd_bench)

    p = commands.add_parser("export", help="export the student alone (no teacher) for deployment")
    p.add_argument("run", type=Path, help="the training run folder")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="default onnx")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the model file (e.g. model.onnx), or a folder (no suffix) to write student.onnx / "
        "student.torchscript.pt in; default RUN/export",
    )
    p.add_argument("--checkpoint", default="last", choices=["last", "best"], help="which weights (default last)")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser(
        "predict",
        help="detect objects in images with a trained student (or its ONNX export); COCO-results JSON + drawings",
    )
    p.add_argument("run", metavar="RUN", help="the training run folder (with --onnx optional: then a SOURCE)")
    p.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="image files, folders (searched recursively) or quoted globs",
    )
    p.add_argument("--out", required=True, type=Path, help="folder for predictions.json, images.json and drawings")
    p.add_argument("--onnx", type=Path, default=None, help="run this `cls2det export` ONNX file with onnxruntime")
    p.add_argument("--checkpoint", default=None, choices=["best", "last"], help="default: best if the run has it")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--score-threshold", type=fraction, default=0.3, help="least score drawn (default 0.3)")
    p.add_argument("--json-threshold", type=fraction, default=0.05, help="least score in predictions.json (0.05)")
    p.add_argument("--save-images", action="store_true", help="write each image with its detections drawn")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)
    return parser


# --------------------------------------------------------------------------------------------------- commands


def cmd_data_demo(args) -> int:
    from cls2det.data import generate_demo

    sizes = {
        "train_images": args.train_images,
        "val_images": args.val_images,
        "image_size": args.image_size,
        "object_size": args.object_size,
        "source_px": args.source_px,
    }
    try:
        out = generate_demo(args.out, seed=args.seed, **{k: v for k, v in sizes.items() if v is not None})
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"demo dataset written to {out}")
    return 0


def cmd_data_check(args) -> int:
    from cls2det.data import DatasetError, check_dataset

    try:
        summary = check_dataset(
            args.dir,
            splits=tuple(s for s in args.splits.split(",") if s),
            check_images=not args.no_images,
            clip_tolerance=args.clip_tolerance,
        )
    except DatasetError as err:  # every problem on its own line, the first MAX_PROBLEMS of them
        for problem in err.problems[:MAX_PROBLEMS]:
            print(f"error: {_one_line(problem)}", file=sys.stderr)
        if len(err.problems) > MAX_PROBLEMS:
            print(f"error: ... and {len(err.problems) - MAX_PROBLEMS} more problems", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(summary, indent=2, default=str))
    print(f"{args.dir}: OK")
    return 0


def cmd_data_import(args) -> int:
    from cls2det.data import import_voc, import_yolo

    classes = None
    if args.classes is not None:
        path = Path(args.classes)
        if not path.is_file() and path.suffix in (".txt", ".names"):
            raise ConfigError(f"--classes: file not found: {path}")
        text = path.read_text(encoding="utf-8") if path.is_file() else args.classes.replace(",", "\n")
        classes = [name.strip() for name in text.splitlines() if name.strip()]
        if not classes:
            raise ConfigError(f"--classes {args.classes!r} names no class")
    entries = [e.strip() for e in (args.splits or "").split(",") if e.strip()]
    if args.format == "voc":
        splits = {k: v for k, v in (e.split("=", 1) if "=" in e else (e, e) for e in entries)} or None
        summary = import_voc(args.src, args.out, splits=splits, class_names=classes)
    else:
        mapped = {k: v for k, v in (e.split("=", 1) if "=" in e else (e, e) for e in entries)}
        options: dict[str, Any] = {"splits": mapped} if mapped else {}
        summary = import_yolo(args.src, args.out, names=classes, **options)
    print(json.dumps(summary, indent=2, default=str))
    print(f"{args.format} dataset imported to {args.out}")
    return 0


def cmd_teacher(args) -> int:
    from cls2det.teacher import train_teacher

    flags = {"arch": args.arch, "epochs": args.epochs, "pretrained": args.pretrained, "loss": args.loss}
    path = args.config
    if args.resume and path is None:  # the run's own recipe; train_teacher refuses changes but a few
        from cls2det.run_folder import prepare_run_dir

        prepare_run_dir(args.out, resume=True, overwrite=args.overwrite, kind="teacher")  # checks only
        path = args.out / "config.yaml"
    config = load_config(TeacherConfig, path, args.overrides, flags=flags)
    metrics = train_teacher(
        args.dir, args.out, config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
    )
    print(f"teacher written to {args.out}: val top-1 {metrics['top1']:.2f}%")
    return 0


def train_config_from_args(args) -> TrainConfig:
    """YAML < explicit flags (--out, the dataset, --kd, ...) < key=value overrides; --resume without --config starts
    from the run's saved config (fit then refuses any change to the recipe but the few it allows)."""
    path = args.config
    if args.resume and path is None:
        from cls2det.engine.run_dir import prepare_run_dir

        prepare_run_dir(Path(args.out), resume=True, overwrite=args.overwrite, kind="student")  # checks only
        saved = Path(args.out) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"nothing to resume: {saved} not found; run without --resume to start a new run")
        path = saved
    flags = {
        "data": str(args.dir),
        "out": str(args.out),
        "teacher": args.teacher,
        "epochs": args.epochs,
        "devices": _int_or_str(args.devices),
        "accelerator": args.accelerator,
        "strategy": args.strategy,
        "precision": args.precision,
    }
    if args.detector is not None:
        flags["student"] = {"detector": args.detector}
    distill = {"det_teacher": args.det_teacher}
    if args.kd is not None:
        kd = [] if args.kd.strip().lower() == "none" else [t.strip() for t in args.kd.split(",") if t.strip()]
        distill["kd"] = kd
    flags["distill"] = {k: v for k, v in distill.items() if v is not None}
    return load_config(TrainConfig, path, args.overrides, flags=flags)


def cmd_train(args) -> int:
    from cls2det.engine.fit import fit
    from cls2det.students import list_students

    config = train_config_from_args(args)
    if config.student.detector not in list_students():
        raise ConfigError(f"unknown detector {config.student.detector!r}; valid: {', '.join(list_students())}")
    results = fit(config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if results.get("metrics"):
        kd = ",".join(config.distill.kd) or "none"  # as --kd takes it
        print(format_metrics(results["metrics"], title=f"{config.student.detector} --kd {kd}"))
    return 0


def cmd_eval(args) -> int:
    from cls2det.config import resolve_workers
    from cls2det.data import load_split
    from cls2det.engine.loading import check_run_classes, load_student
    from cls2det.evaluation.evaluate import evaluate_student

    split = load_split(args.dir, args.split)
    check_run_classes(args.run, split.class_names, data=args.dir)  # before the model is built
    model, config = load_student(args.run, checkpoint=args.checkpoint)
    metrics = evaluate_student(
        model, split, batch_size=config.batch_size, errors=args.errors, workers=resolve_workers(config.workers)
    )
    print(format_metrics(metrics, title=f"{args.run} on {args.dir} [{args.split}]"))
    if args.errors:
        from cls2det.evaluation.errors import format_errors

        print(format_errors(metrics["errors"], title="TIDE error breakdown (AP50 points lost per error type)"))
    if args.json is not None:  # strict JSON: a metric without a value (NaN: no GT of that size) is null
        args.json.write_text(json.dumps(json_safe(metrics), indent=2, default=float, allow_nan=False))
    return 0


def cmd_study(args) -> int:
    from cls2det.study.runner import run_study

    report = run_study(args.config, args.overrides)
    print(report.read_text())
    return 0


def cmd_demo(args) -> int:
    from cls2det.study.runner import run_demo

    report = run_demo(args.out, args.overrides)
    print(report.read_text())
    return 0


def cmd_bench(args) -> int:
    from cls2det.bench.step import run_benchmarks

    run_benchmarks(
        detector=args.detector,
        batch_size=args.batch_size,
        image_size=args.image_size,
        repeats=args.repeats,
        device=args.device,
        teacher_size=args.teacher_size,
        sample_size=args.sample_size,
        channels_last=args.channels_last,
        teacher_precision=args.teacher_precision,
        precision=args.precision,
        memory=not args.no_memory,
    )
    return 0


def cmd_export(args) -> int:
    from cls2det.deploy.export import export_student

    out = export_student(args.run, fmt=args.format, out=args.out, checkpoint=args.checkpoint)
    print(f"exported to {out}")
    return 0


def cmd_predict(args) -> int:
    from cls2det.deploy.predict import PredictError, is_run, predict_images

    run, inputs = args.run, list(args.sources)
    if args.onnx is not None and not is_run(Path(run)):  # no run folder: the first argument is a source too
        run, inputs = None, [run, *inputs]
    if not inputs:
        raise PredictError("give at least one image file, folder or glob after the run folder")
    summary = predict_images(
        inputs,
        args.out,
        run=run,
        onnx=args.onnx,
        checkpoint=args.checkpoint,
        device=args.device,
        batch_size=args.batch_size,
        score_threshold=args.score_threshold,
        json_threshold=args.json_threshold,
        save_images=args.save_images,
        progress=not args.no_progress,
    )
    skipped = len(summary["skipped"])
    drawn = f", {summary['drawn']} drawn" if args.save_images else ""
    print(
        f"{summary['images']} images, {summary['detections']} detections (score >= {args.json_threshold}){drawn}, "
        f"{skipped} skipped; written to {args.out}"
    )
    return 0


# --------------------------------------------------------------------------------------------------- helpers


def package_version() -> str:
    """The installed distribution's version (``pip show cls2det``), else the source tree's ``__version__``."""
    from importlib import metadata

    try:
        return metadata.version("cls2det")
    except metadata.PackageNotFoundError:
        from cls2det import __version__

        return __version__


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: ``error: cls2det train: argument --epochs: must be >= 1, got 0``
    (``-h`` shows the usage); the sub-command parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {_one_line(message)}\n")


class _ListDetectors(argparse.Action):
    """``cls2det train --list``: print the detector names and exit, before the required arguments are checked."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from cls2det.students import list_students

        print("\n".join(list_students()))
        parser.exit(0)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1] (a score threshold)."""
    value = _finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def json_safe(value: Any) -> Any:
    """``value`` (nested dicts / lists of numbers) with every non-finite float as None, for strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_metrics(metrics: dict, title: str = "") -> str:
    keys = ["mAP", "AP50", "AP75", "APs", "APm", "APl", "mAR"]
    head = " | ".join(f"{k:>6}" for k in keys)
    row = " | ".join(f"{metrics.get(k, float('nan')):6.2f}" for k in keys)
    return f"{title}\n{head}\n{row}"


def _int_or_str(value: str | None):
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def _one_line(err: BaseException | str) -> str:
    text = str(err) or type(err).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
