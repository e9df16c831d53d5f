"""Train a student detector with Lightning Fabric: ``setup`` + a plain loop, one state, atomic checkpoints.

Every step's randomness (flips, the detector's samplers, the positives' and negatives' samples) is drawn from RNGs
seeded by ``(seed, step, rank)``, and the epoch's image order from ``(seed, epoch)``: a run stopped at a step
boundary and resumed reproduces the uninterrupted run exactly on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch
from lightning_fabric import Fabric

from cls2det.config import TrainConfig, det_methods, load_config, resolve_workers, save_config, to_dict
from cls2det.data import CocoDetection, collate, load_split
from cls2det.determinism import deterministic_algorithms
from cls2det.engine.advice import input_notices
from cls2det.engine.checkpoint import load_model_state, load_state, save_checkpoint
from cls2det.engine.distributed import end_launched_ranks, fabric_strategy, module_checksum
from cls2det.engine.loading import load_det_teacher, load_distillation_teacher
from cls2det.engine.logger import MetricsLogger, ProgressBar, peak_memory_mb, truncate_metrics
from cls2det.engine.objective import distillation_losses, loss_weights, total_loss
from cls2det.engine.run_caches import open_teacher_caches
from cls2det.engine.run_dir import (
    BEST,
    CLASSES,
    CONFIG,
    LAST,
    METRICS_CSV,
    RESULTS,
    RESUME_PATHS,
    RESUME_SAFE,
    RunStart,
    TrainingError,
    TrainingInterrupted,
    prepare_run_dir,
    with_absolute_inputs,
    write_json,
)
from cls2det.engine.sampling import EpochBatches, hflip_batch
from cls2det.engine.schedule import build_optimizer, build_scheduler
from cls2det.evaluation.evaluate import evaluate_student
from cls2det.files import append_csv_row
from cls2det.lr import continue_schedule
from cls2det.run_folder import VAL_CSV, resume_changes
from cls2det.students import create_student
from cls2det.students.backbones import CHECKPOINT_WEIGHTS, is_local_weights
from cls2det.teacher import check_teacher_for_head


def fit(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Train ``config``'s student in ``config.out`` and return the final results (also in ``results.json``).

    ``resume``: continue the run in ``config.out`` from its last checkpoint; ``config`` must be the run's own recipe
    (``config.yaml``) up to the keys of :data:`RESUME_SAFE`. A resumed run that has nothing left to do returns the
    results it wrote when it finished, untouched.
    """
    config = with_absolute_inputs(config)  # recorded so in config.yaml: the run folder works from anywhere
    out = Path(config.out)
    fabric = build_fabric(config)  # before the run folder is touched: a machine that cannot run it changes nothing
    start = prepare_run_dir(out, resume=resume, overwrite=overwrite, kind="student")
    if resume:
        saved = load_config(TrainConfig, out / CONFIG)
        start.changes = resume_changes(out, to_dict(saved), to_dict(config), RESUME_SAFE, RESUME_PATHS)
    try:
        fabric.launch()
        with deterministic_algorithms(config.deterministic):
            trainer = _start(fabric, config, out, start, progress=progress)
            if trainer.nothing_to_do:
                if trainer.logger is not None:
                    trainer.logger.close()
                fabric.print(
                    f"{out} finished at step {trainer.step} (epoch {trainer.epoch}): nothing to resume; "
                    "raise epochs=N (or max_steps) to train on"
                )
                return json.loads((out / RESULTS).read_text())
            return trainer.run()
    except BaseException as err:
        if fabric.is_global_zero:
            start.failed()  # a start that failed before its first checkpoint leaves nothing behind
        # a torch.distributed error (a RuntimeError) may only mean that another rank died and closed the connection:
        # give the ranks this process launched a moment to exit, and point at the error of the one that failed
        lost_peer = isinstance(err, RuntimeError) and not isinstance(err, (TrainingError, TrainingInterrupted))
        failed = end_launched_ranks(fabric, grace_s=10.0 if lost_peer else 0.0)
        if lost_peer and failed:
            rank, code = failed[0]
            raise TrainingError(
                f"rank {rank} failed (exit code {code}, its error is above); rank {fabric.global_rank} stopped: "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
            ) from err
        raise


def build_fabric(config: TrainConfig) -> Fabric:
    """Fabric for ``config``'s accelerator / devices / strategy / precision; a machine without them (``cuda`` without
    CUDA, a strategy's missing package, devices of the wrong kind) is a one-line :class:`TrainingError`."""
    try:
        return Fabric(
            accelerator=config.accelerator,
            devices=config.devices,
            num_nodes=config.num_nodes,
            strategy=fabric_strategy(config.strategy, config.dist_timeout_s),
            precision=cast(Any, config.precision),  # Fabric checks it (its ValueError is caught below)
        )
    except (RuntimeError, ImportError, TypeError, ValueError) as err:  # Lightning's checks raise all of these
        setting = (
            f"accelerator={config.accelerator!r}, devices={config.devices!r}, strategy={config.strategy!r}, "
            f"precision={config.precision!r}"
        )
        reason = " ".join(str(err).split()) or type(err).__name__
        raise TrainingError(f"cannot train with {setting} on this machine: {reason}") from None


def _start(fabric: Fabric, config: TrainConfig, out: Path, start: RunStart, *, progress: bool) -> _Trainer:
    """Validate the inputs and build the trainer; an old run moved aside by --overwrite comes back on failure."""
    trainer = _Trainer(fabric, config, out, resume=start.resume, progress=progress)
    trainer.nothing_to_do = start.resume and trainer.is_finished() and (out / RESULTS).is_file()
    if fabric.is_global_zero and not trainer.nothing_to_do:
        # saved only once the data, teacher and student are validated: a run that failed on a bad input leaves no
        # config.yaml behind; a resume that changed a safe key records the new recipe
        if not start.resume or start.changes:
            save_config(config, out / CONFIG)
        start.started(step=trainer.step, data=config.data)
        for line in trainer.notices:
            print(line, file=sys.stderr)
    return trainer


class _Trainer:
    def __init__(self, fabric: Fabric, config: TrainConfig, out: Path, *, resume: bool, progress: bool) -> None:
        self.fabric, self.config, self.out = fabric, config, out
        fabric.seed_everything(config.seed, verbose=False)
        self.train_split = load_split(config.data, "train")
        self.val_split = load_split(config.data, "val")
        self.dataset = CocoDetection(self.train_split)
        self.loader = None  # built by _batches
        # left-right flips of the student's images: where the dataset says a mirror keeps its labels, unless set
        self.flips = self.train_split.hflip_preserves_labels if config.hflip is None else config.hflip
        self.teacher = load_distillation_teacher(
            config, self.train_split.class_names, flips=self.flips, device=fabric.device
        )
        if self.teacher is not None:
            self._check_same_weights(self.teacher, "teacher", str(config.teacher))
        self.weights = loss_weights(config.distill)  # eq. (12)'s lambda of each KD term
        distill = config.distill
        self.soft_labels, self.gt_features = open_teacher_caches(
            fabric,
            out,
            self.teacher,
            self.dataset,
            distill,
            flips=self.flips,
            workers=resolve_workers(config.workers),
            progress=progress,
        )
        student_config = config.student
        if resume and is_local_weights(student_config.backbone_weights):  # last/ holds every weight: no file read
            student_config = dataclasses.replace(student_config, backbone_weights=CHECKPOINT_WEIGHTS)
        student = create_student(config.student.detector, self.train_split.num_classes, student_config)
        student.max_negatives = distill.kd_cls_negatives  # 0: the adapter draws no negatives
        if self.teacher is not None and "cls" in distill.kd:
            check_teacher_for_head(self.teacher, student.head, allow_ce_teacher=distill.allow_ce_teacher)
        self.notices = input_notices(config, student, self.train_split)  # printed once the run has started
        self.det_teacher = self._det_teacher(student) if det_methods(config.distill.kd) else None
        if config.channels_last:  # weights only: convolutions then return channels_last outputs for any input
            for net in (student, self.teacher, self.det_teacher):
                if net is not None:
                    net.to(memory_format=torch.channels_last)
        if fabric.is_global_zero:
            classes = {"class_names": self.train_split.class_names, "category_ids": self.train_split.label_to_cat_id}
            write_json(out / CLASSES, classes)
        optimizer = build_optimizer(student, config.optim)
        world = fabric.world_size
        self.steps_per_epoch = math.ceil(len(self.dataset) / (config.batch_size * world))
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.scheduler = build_scheduler(optimizer, self.total_steps, config.optim)
        self.model, self.optimizer = fabric.setup(student, optimizer)
        self.step, self.epoch, self.batch_in_epoch, self.best_map = 0, 0, 0, -1.0
        self.nonfinite_in_row, self.nonfinite_total = 0, 0
        self.last_metrics: dict[str, Any] = {}
        self.last_eval_step = -1
        if resume:
            self._load(out / LAST)
            if fabric.is_global_zero:
                truncate_metrics(out / METRICS_CSV, self.step)
                truncate_metrics(out / VAL_CSV, self.step)
        self.stop_signal: int | None = None
        self.logger = MetricsLogger(out / METRICS_CSV, out / "tb") if fabric.is_global_zero else None
        self.progress = progress and fabric.is_global_zero
        self.nothing_to_do = False  # set by _start: a resumed run that had already finished

    def is_finished(self) -> bool:
        return self.epoch >= self.config.epochs or self.step >= self.total_steps

    # ----------------------------------------------------------------------------------------------- loop

    def run(self) -> dict:
        config, fabric = self.config, self.fabric
        start = time.perf_counter()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with ProgressBar(self.progress, self.total_steps, self.step) as bar:
                while self.epoch < config.epochs and self.step < self.total_steps:
                    for images, targets in self._batches():
                        self._train_step(images, targets)
                        bar(self.step, self.epoch)
                        if self._should_stop() or self.step >= self.total_steps:
                            break
                    if self.stop_signal is not None:
                        self._save(LAST)
                        raise TrainingInterrupted(
                            f"stopped by signal {self.stop_signal} at step {self.step}; "
                            f"continue with --resume (checkpoint {self.out / LAST})"
                        )
                    epoch_done = self.batch_in_epoch >= self.steps_per_epoch
                    if epoch_done:
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    finished = self.epoch >= config.epochs or self.step >= self.total_steps
                    if epoch_done and (finished or self.epoch % config.eval_every == 0):
                        self._evaluate_and_keep_best(final=finished)
                    if finished or (epoch_done and self.epoch % config.checkpoint_every == 0):
                        self._save(LAST)
        finally:
            self.loader = None  # its persistent workers end with the run, not at a later garbage collection
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.logger is not None:
                self.logger.close()
        ranks_agree = self._ranks_agree()
        if fabric.is_global_zero and self.last_eval_step != self.step:
            self.last_metrics = self._evaluate(errors=True)
        metrics = self.last_metrics
        results = {
            "metrics": metrics,
            "steps": self.step,
            "epochs": self.epoch,
            "nonfinite_steps": self.nonfinite_total,
            "wall_s": time.perf_counter() - start,
            "peak_mem_mb": peak_memory_mb(fabric.device),
            "detector": config.student.detector,
            "kd": list(config.distill.kd),
            "seed": config.seed,
            "world_size": fabric.world_size,
            "ranks_agree": ranks_agree,
        }
        if fabric.is_global_zero:
            write_json(self.out / RESULTS, results)
        fabric.barrier()
        return results

    def _batches(self):
        """This rank's batches of the current epoch, from ``batch_in_epoch`` on (resume mid-epoch)."""
        if self.loader is None:  # one loader per run: its workers persist across epochs
            workers = resolve_workers(self.config.workers)
            self.loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=EpochBatches(self),
                collate_fn=collate,
                num_workers=workers,
                persistent_workers=workers > 0,
                pin_memory=self.fabric.device.type == "cuda",
            )
        yield from self.loader

    def _train_step(self, images, targets) -> None:
        config, fabric = self.config, self.fabric
        seed = (config.seed * 1_000_003 + self.step) * fabric.world_size + fabric.global_rank
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the detector's own samplers draw from the global RNG
        images, targets, flipped = hflip_batch(images, targets, generator, p=0.5 if self.flips else 0.0)
        soft_labels = gt_features = None
        if self.soft_labels is not None or self.gt_features is not None:
            image_ids = torch.stack([t["image_id"] for t in targets]).cpu()  # [N]

            def cache_rows(positives):  # what the caches are indexed by: (image id, GT index, flipped) per positive
                index = positives.image_index.cpu()
                return image_ids[index], positives.gt_index, flipped[index]

            if self.soft_labels is not None:

                def soft_labels(positives):
                    return self.soft_labels.lookup(*cache_rows(positives))

            if self.gt_features is not None:

                def gt_features(positives):
                    return self.gt_features.lookup(*cache_rows(positives))

        images = [img.to(fabric.device) for img in images]
        targets = [{k: v.to(fabric.device) for k, v in t.items()} for t in targets]

        output = self.model(images, targets)
        kd_losses = distillation_losses(
            output,
            self.teacher,
            config.distill,
            generator=generator,
            soft_labels=soft_labels,
            gt_features=gt_features,
            det_teacher=self.det_teacher,
        )
        loss = total_loss(output.losses, kd_losses, self.weights)
        terms = {**output.losses, **kd_losses}
        self.batch_in_epoch += 1
        if not torch.isfinite(loss):
            self._skip_nonfinite(terms)
            return
        self.nonfinite_in_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        if config.optim.grad_clip:
            fabric.clip_gradients(self.model, self.optimizer, max_norm=config.optim.grad_clip, error_if_nonfinite=False)
        lr = self.optimizer.param_groups[0]["lr"]  # the LR this step used (the scheduler moves it on below)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        if self.logger is not None:
            row = {
                "step": self.step,
                "epoch": self.epoch,
                "lr": lr,
                "loss": loss.item(),
                "positives": float(len(output.positives)),
            }
            if output.negatives is not None:
                row["negatives"] = float(len(output.negatives))
            row.update({name: value.item() for name, value in terms.items()})
            row.update({f"w_{n}": self.weights[n] * v.item() for n, v in kd_losses.items()})
            self.logger.log(row, self.step)

    def _skip_nonfinite(self, terms: dict[str, torch.Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        # every term finite but not their weighted sum (an overflow): name the total rather than nothing
        bad = [name for name, value in terms.items() if not torch.isfinite(value)] or ["total loss"]
        self.fabric.print(f"step {self.step}: non-finite loss in {', '.join(bad)}; step skipped")
        if self.nonfinite_in_row >= self.config.max_nonfinite_steps:
            raise TrainingError(
                f"{self.nonfinite_in_row} non-finite losses in a row (last in: {', '.join(bad)}); "
                "lower optim.lr or enable gradient clipping"
            )

    def _ranks_agree(self) -> bool:
        """Whether every rank ended with the same weights (a cheap checksum, gathered across ranks)."""
        with torch.no_grad():
            checksum = torch.stack([p.double().sum() for p in self.model.parameters()]).sum()
        if self.fabric.world_size == 1:
            return True
        gathered = cast(torch.Tensor, self.fabric.all_gather(checksum.to(self.fabric.device)))  # a tensor for a tensor
        return bool(torch.all(gathered == gathered[0]))

    def _should_stop(self) -> bool:
        """True on every rank once any rank got SIGINT/SIGTERM."""
        stop = self.stop_signal is not None
        if self.fabric.world_size > 1:
            stop = bool(self.fabric.strategy.reduce_boolean_decision(stop, all=False))
            if stop and self.stop_signal is None:
                self.stop_signal = signal.SIGTERM
        return stop

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_signal = signum

    def _det_teacher(self, student):
        """The det2det teacher, loaded once, frozen, on this rank's device (never wrapped in DDP)."""
        config = self.config
        if not config.distill.det_teacher:
            raise TrainingError(
                f"--kd {','.join(config.distill.kd)} needs a detector teacher: pass --det-teacher RUN "
                "(a run of the student's detector, trained with `cls2det train --kd none`)"
            )
        det_teacher = load_det_teacher(
            config.distill.det_teacher,
            student,
            self.train_split.class_names,
            det_methods(config.distill.kd),
            device=self.fabric.device,
        )
        self._check_same_weights(det_teacher, "det teacher", config.distill.det_teacher)
        return det_teacher

    def _check_same_weights(self, teacher: torch.nn.Module, role: str, path: str) -> None:
        """Every rank loads its own copy of a teacher run (on its own node's disk): all must distill from the same
        weights."""
        fabric = self.fabric
        if fabric.world_size == 1:
            return
        gathered = cast(torch.Tensor, fabric.all_gather(module_checksum(teacher).to(fabric.device))).cpu()  # [world, T]
        differ = [rank for rank in range(1, fabric.world_size) if not torch.equal(gathered[rank], gathered[0])]
        if differ:
            raise TrainingError(
                f"the {role} differs across ranks: rank {', '.join(map(str, differ))} loaded other weights from "
                f"{path} than rank 0 (a different copy of the teacher run on that node?)"
            )

    # ----------------------------------------------------------------------------------------------- eval / ckpt

    def _evaluate(self, errors: bool = False) -> dict:
        """COCO metrics on val; ``errors``: also the TIDE breakdown (the final evaluation, for the reports)."""
        # the unwrapped module: rank 0 evaluates alone, and a DDP forward would broadcast buffers to ranks that are
        # waiting in a barrier (a deadlock)
        return evaluate_student(
            self.model.module,
            self.val_split,
            device=self.fabric.device,
            batch_size=self.config.batch_size,
            errors=errors,
            workers=resolve_workers(self.config.workers),
        )

    def _evaluate_and_keep_best(self, final: bool = False) -> None:
        if self.fabric.is_global_zero:
            metrics = self.last_metrics = self._evaluate(errors=final)
            self.last_eval_step = self.step
            self.fabric.print(f"epoch {self.epoch}: val mAP {metrics['mAP']:.2f}  AP50 {metrics['AP50']:.2f}")
            val = {"step": self.step, "epoch": self.epoch, **{k: metrics[k] for k in ("mAP", "AP50", "AP75")}}
            append_csv_row(self.out / VAL_CSV, val)  # the val curve (a report's plateau plot)
            if self.logger is not None and self.logger.tb is not None:
                for key in ("mAP", "AP50", "AP75"):
                    self.logger.tb.add_scalar(f"val/{key}", metrics[key], self.step)
            if metrics["mAP"] > self.best_map:
                self.best_map = metrics["mAP"]
                save_checkpoint(self.out / BEST, self.model.state_dict(), {"step": self.step, "mAP": metrics["mAP"]})
        self.fabric.barrier()

    def _save(self, name: str) -> None:
        if self.fabric.is_global_zero:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "best_map": self.best_map,
                "nonfinite_total": self.nonfinite_total,
            }
            save_checkpoint(self.out / name, self.model.state_dict(), state)
        self.fabric.barrier()

    def _load(self, path: Path) -> None:
        self.model.load_state_dict(load_model_state(path))
        state = load_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        continue_schedule(self.scheduler)  # the (maybe extended) schedule's LR, not the one the old schedule reached
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_map, self.nonfinite_total = state["best_map"], state["nonfinite_total"]
