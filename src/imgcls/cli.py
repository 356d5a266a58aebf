"""The ``imgcls`` command: parses arguments, then calls library functions.

Commands import what they use when they run (the ``# start-up time`` imports), so that
``imgcls --help`` and a mistyped flag answer without importing torch.

Training flags are generated from the config dataclasses, so every flag is
also a config-file field and the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import csv
import errno
import io
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from imgcls import terminal
from imgcls.config import RunConfig, flat_fields, parse_yaml_value, shown, split_list
from imgcls.errors import ConfigError, ImgclsError, is_disk_full
from imgcls.startup import import_paused, keep_freed_memory


def _parse_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {shown(text)}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), parse_yaml_value(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"{shown(key.strip())}: {exc}") from None


class _Parser(argparse.ArgumentParser):
    """argparse, with a refused value shown cut short (a 100,000-character --optimizer was echoed whole)."""

    def error(self, message: str):
        super().error(_cut_quoted(message))


def _cut_quoted(message: str, keep: int = 80) -> str:
    """``message`` with every quoted value longer than ``keep`` characters cut, saying how long it was."""
    pattern = "'([^']{" + str(keep) + "})[^']{120,}'"
    return re.sub(pattern, lambda m: f"'{m.group(1)}...' ({len(m.group(0)) - 2:,} characters)", message)


def _flag_type(f):
    kind = str(f.type)
    if kind.startswith("bool"):
        return None
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return float
    if kind.startswith("list[str]"):
        return split_list
    return str


def add_config_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """One flag per config field (those named in ``only``, when given), defaulting to None (= leave the config's
    value)."""
    defaults = RunConfig()
    groups = {s: parser.add_argument_group(f"{s} options") for s in ("data", "model", "train")}
    groups[None] = parser.add_argument_group("run options")
    for key, (section, f) in flat_fields().items():
        if only is not None and key not in only:
            continue
        default = getattr(getattr(defaults, section) if section else defaults, f.name)
        help_text = f.metadata.get("help", "") + (f" (default: {default})" if default not in (None, [], {}) else "")
        flag = "--" + key.replace("_", "-")
        group = groups[section]
        if key == "model_option":
            group.add_argument(flag, dest=key, type=_parse_option, action="append", metavar="KEY=VALUE",
                               help=help_text)
        elif _flag_type(f) is None:
            group.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif _flag_type(f) is split_list:  # a list: "a,b" and a repeated flag both add to it
            group.add_argument(flag, dest=key, type=split_list, action="extend", default=None, help=help_text)
        else:
            group.add_argument(flag, dest=key, type=_flag_type(f), choices=f.metadata.get("choices"),
                               default=None, help=help_text)


# Arguments several commands take.  Each command's own arguments are added by the _<command>_args function just
# above its cmd_<command>; COMMANDS, near the end, ties the two together with its line in `imgcls --help`.
RUN_OR_CHECKPOINT = "run folder or checkpoint file"


def _add_run(p: argparse.ArgumentParser, what: str = RUN_OR_CHECKPOINT) -> None:
    p.add_argument("run", type=Path, help=what)


def _add_run_folder(p: argparse.ArgumentParser) -> None:
    """The ``run`` argument of a command that needs a run folder, not a lone checkpoint."""
    _add_run(p, "run folder")


def _add_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="image files, folders or .zip files")


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", choices=("best", "last"), help="which checkpoint (default: the run's final one)")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def _add_config_file(p: argparse.ArgumentParser, what: str = "YAML config file") -> None:
    p.add_argument("--config", type=Path, help=what)


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _config_overrides(args) -> dict:
    """The config flags of ``train`` and ``cv`` as flat overrides (unset flags are None)."""
    overrides = {k: getattr(args, k, None) for k in flat_fields()}
    if overrides.get("model_option"):
        overrides["model_option"] = dict(overrides["model_option"])
    return overrides


def _train_args(p: argparse.ArgumentParser) -> None:
    _add_config_file(p, "YAML config file (e.g. a run's config.yaml to repeat it)")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue a run folder from its last checkpoint")
    p.add_argument("--update", type=Path, metavar="RUN",
                   help="a new run from a head-first RUN (stage 1 only) and the photos in --data FOLDER (one folder "
                        "per class: new classes, more photos of its own, or both): its classifier refitted in seconds "
                        "on the cached frozen features; --out, --name and --report may change, nothing else")
    _add_quiet(p)
    _add_launch_flags(p)
    add_config_flags(p)


def _add_launch_flags(p: argparse.ArgumentParser) -> None:
    launch = p.add_argument_group("distributed options (torch.distributed; or start imgcls under torchrun)")
    launch.add_argument("--nproc", type=int, metavar="N",
                        help="train in N processes on this node (DDP: gloo on CPU, NCCL on CUDA; --batch-size is the "
                             "global batch)")
    launch.add_argument("--nnodes", type=int, default=1, metavar="N", help="nodes in the job (default: 1)")
    launch.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                        help="several nodes: the first node's address, where the nodes meet (c10d rendezvous)")
    launch.add_argument("--rdzv-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="how long to wait for every node to join (default: 300)")
    launch.add_argument("--force", action="store_true",
                        help="start --nproc processes even where they are more than this node's CPU cores")



def cmd_train(args) -> int:
    import imgcls  # its train() imports torch with the garbage collector paused (imgcls.startup)

    overrides = _config_overrides(args)
    if "LOCAL_RANK" in os.environ:  # started by torchrun or by --nproc: the job is already running
        from imgcls.training.launch import die_with_launcher  # start-up time

        die_with_launcher()
        if args.nproc is not None and args.nproc != int(os.environ.get("LOCAL_WORLD_SIZE", args.nproc)):
            raise ImgclsError(f"--nproc {args.nproc} differs from the {os.environ['LOCAL_WORLD_SIZE']} processes "
                              f"per node torchrun started; give one or the other")
    elif args.nproc is not None and (args.nproc > 1 or args.nnodes > 1):
        from imgcls.training.launch import launch  # start-up time: torch.distributed

        return launch(["train", *args.argv], args.nproc, args.nnodes, args.rdzv_endpoint, args.rdzv_timeout,
                      args.force)
    else:
        from imgcls.training.launch import check_launch  # start-up time

        check_launch(args.nproc, args.nnodes, args.rdzv_endpoint, args.rdzv_timeout, args.force)
        if args.nnodes > 1:
            raise ImgclsError(f"--nnodes {args.nnodes} needs --nproc (processes on each node)")
        if args.rdzv_endpoint is not None:
            raise ImgclsError(f"--rdzv-endpoint {args.rdzv_endpoint} is where several processes meet; give --nproc "
                              f"(and --nnodes for several machines), or leave it out to train in one process")
    if args.update is not None and args.nproc is not None:
        raise ImgclsError(f"--update {args.update} refits a classifier in one process; leave --nproc out")
    imgcls.train(args.config, resume=args.resume, update=args.update, quiet=args.quiet, **overrides)
    return 0


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    _add_run(p)
    p.add_argument("--data", help="evaluate on this dataset instead of the run's own (same classes)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--top-k", type=int, default=5, help="k of top-k accuracy (default: 5)")
    _add_checkpoint(p)
    _add_device(p)



def cmd_evaluate(args) -> int:
    import imgcls  # start-up time
    from imgcls.evaluation.metrics import (  # start-up time
        format_confusion,
        format_report,
    )

    if args.top_k < 1:
        raise ImgclsError(f"--top-k must be at least 1, got {args.top_k}")
    clf = imgcls.load(args.run, which=args.checkpoint, device=args.device)
    metrics = clf.evaluate(args.data, split=args.split, top_k=args.top_k, save=True)
    print(format_report(metrics, title=f"{args.run}: {args.split} split"))
    if "confusion_matrix" in metrics:  # one class per image (a multi-label report has its table of labels)
        print()
        print(format_confusion(metrics))
    return 0


def _predict_args(p: argparse.ArgumentParser) -> None:
    _add_run(p)
    _add_inputs(p)
    p.add_argument("--top-k", type=int, default=3, help="classes to show per image (default: 3)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    _add_checkpoint(p)
    _add_device(p)
    p.add_argument("--thresholds", action="store_true",
                   help="answer 'unknown' when no class clears its tuned threshold (see `imgcls thresholds`); a "
                        "multi-label model always answers the labels over their thresholds, and a model with an "
                        "out-of-distribution score answers 'unknown' for an image below it, with the score")



def cmd_predict(args) -> int:
    import imgcls  # start-up time

    if args.top_k < 1:
        raise ImgclsError(f"--top-k must be at least 1, got {args.top_k}")
    clf = imgcls.load(args.run, which=args.checkpoint, device=args.device)
    thresholds = clf.meta.get("thresholds") if args.thresholds else None
    if args.thresholds and thresholds is None:
        raise ImgclsError(f"{args.run} has no thresholds stored; run `imgcls thresholds {args.run}` first")
    names, images, bad = clf.load_inputs(args.inputs)
    from imgcls.evaluation.thresholds import prediction_rows  # start-up time

    proba, scores = clf.scored_arrays(images) if len(images) else ([], None)
    rows = [{"input": name, **r} for name, r in
            zip(names, prediction_rows(clf.meta, proba, scores, args.top_k, thresholds) if len(images) else [])]
    print(_format_predictions(rows, bad, args.format), end="")
    for b in bad:
        print(terminal.safe(f"error: cannot read {b.path}: {b.reason}"), file=sys.stderr)
    return 1 if bad else 0


def _format_predictions(rows: list[dict], bad: list, fmt: str) -> str:
    if fmt == "json":
        doc = {"predictions": rows, "errors": [{"input": b.path, "error": b.reason} for b in bad]}
        return json.dumps(doc, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        answers = any("answer" in r for r in rows)
        sets = any("labels" in r for r in rows)
        scored = any("ood_score" in r for r in rows)
        writer.writerow(["input", "rank", "class", "probability"] + (["answer"] if answers else [])
                        + (["labels"] if sets else []) + (["ood_score"] if scored else []))
        for row in rows:
            for rank, t in enumerate(row["top"], 1):
                extra = ([row.get("answer", "")] if answers else []) + ([";".join(row["labels"])] if sets else []) \
                    + ([row["ood_score"]] if scored else [])
                writer.writerow([row["input"], rank, t["class"], f"{t['probability']:.6f}"] + extra)
        return buf.getvalue()
    width = max([len(r["input"]) for r in rows] + [5])
    lines = []
    for row in rows:
        tops = "   ".join(f"{t['class']} {t['probability']:.1%}" for t in row["top"])
        answer = f"{row['answer']:<10}  " if "answer" in row else ""
        if "labels" in row:
            answer = f"[{', '.join(row['labels']) or ('unknown' if row.get('answer') == 'unknown' else 'no label')}]  "
        if "ood_score" in row:
            answer += f"(score {row['ood_score']:.3f})  "
        lines.append(f"{row['input']:<{width}}  {answer}{tops}")
    return terminal.safe("\n".join(lines) + ("\n" if lines else ""))


def option_as_flag(key: str, value) -> str:
    """A flat option as the command-line flag that sets it."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    if isinstance(value, dict):  # --model-option KEY=VALUE, repeated
        return " ".join(f"{flag} {k}={json.dumps(v, separators=(',', ':'))}" for k, v in value.items())
    return f"{flag} {','.join(value) if isinstance(value, list) else value}"


def cmd_recipes(args) -> int:
    from imgcls.inference import resolve_runtime  # start-up time
    from imgcls.recipes import PRECISION_CLASSES, RECIPES  # start-up time

    runtime = resolve_runtime()
    here = runtime.precision
    for recipe in RECIPES.values():
        print(f"{recipe.name}\n  {recipe.summary}\n  suits: {recipe.suits}")
        for precision, variant in recipe.variants.items():
            taken = f"  <- this machine ({runtime.device}, {here})" if precision == here else ""
            settings = " ".join(option_as_flag(k, v) for k, v in recipe.options(precision).items())
            print(f"  variant {precision}, for {PRECISION_CLASSES[precision]}: {variant.summary}{taken}\n"
                  f"    settings: {settings}")
            for hardware, figure in variant.measured.items():
                print(f"    measured on {hardware}: {figure}")
        print()
    print("A run takes the variant of the precision it trains in (--precision auto: bf16 where the device computes "
          "it natively); --precision bf16 or fp32 picks one.")
    return 0


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="a registered model to summarise")
    p.add_argument("--input", default="3x32x32", help="input shape CxHxW (default: 3x32x32)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default: 10)")
    p.add_argument("--model-option", dest="options", type=_parse_option, action="append", metavar="KEY=VALUE")



def cmd_models(args) -> int:
    from imgcls.config import parse_image_size  # start-up time
    from imgcls.models import (  # start-up time
        create_model,
        format_summary,
        list_models,
        summarize,
    )

    if not args.name:
        models = list_models()
        width = max(len(n) for n in models)
        for name, desc in models.items():
            print(f"{name:<{width}}  {desc}")
        return 0
    try:
        c, h, w = (int(v) for v in args.input.lower().split("x"))
    except ValueError:
        raise ImgclsError(f"--input must be CxHxW, e.g. 3x32x32 or 1x28x28; got {args.input!r}") from None
    parse_image_size([h, w])
    model = create_model(args.name, in_chans=c, num_classes=args.classes, img_size=(h, w),
                         **dict(args.options or []))
    print(format_summary(summarize(model, (c, h, w))))
    return 0


def _explain_args(p: argparse.ArgumentParser) -> None:
    _add_run(p)
    _add_inputs(p)
    p.add_argument("--method", default="gradcam", help="gradcam (default), gradcam++, integrated-gradients, "
                   "occlusion or saliency")
    p.add_argument("--target", default="predicted", help="predicted (default), true (the class folder an image "
                   "is in), a class name, or several separated by commas: one map per image and name (a "
                   "multi-label model's labels)")
    p.add_argument("--layer", default="auto", help="layer for Grad-CAM (default: the model's own choice)")
    p.add_argument("--out", type=Path, help="output folder (default: <run>/explain)")
    p.add_argument("--save-maps", action="store_true", help="also write each raw map as .npy")
    p.add_argument("--score", action="store_true", help="score every method: deletion AUC and the "
                   "model-randomisation check")
    _add_device(p)



def cmd_explain(args) -> int:
    import imgcls  # start-up time
    from imgcls.explain.explain import write_explanations  # start-up time

    clf = imgcls.load(args.run, device=args.device)
    exp = clf.explain(args.inputs, method=args.method, target=args.target, layer=args.layer)
    out = args.out or (Path(args.run) / "explain" if Path(args.run).is_dir() else Path("explain"))
    for path in write_explanations(exp, out, save_maps=args.save_maps):
        print(path)
    sanity = clf.sanity_check(exp)
    verdict = "passed" if sanity["passed"] else "FLAGGED: the maps barely depend on the learned weights"
    print(f"{args.method}: rank correlation with a randomised model {sanity['mean_correlation']:.2f} ({verdict})")
    if args.score:
        print(_format_scores(clf.score_explanations(exp)))
    return 0 if not exp.bad else 1


def _format_scores(rows: list[dict]) -> str:
    lines = ["method                deletion AUC  (random order)  randomisation corr.  check     seconds",
             "(lower deletion AUC = the map finds the evidence; low correlation = the map depends on the weights)"]
    for r in rows:
        check = "passed" if r["passed"] else "FLAGGED"
        lines.append(f"{r['method']:<20}  {r['deletion_auc']:12.4f}  {r['random_deletion_auc']:14.4f}  "
                     f"{r['randomisation_correlation']:19.3f}  {check:<8}  {r['seconds']:7.2f}")
    return "\n".join(lines)


def _serve_args(p: argparse.ArgumentParser) -> None:
    _add_run_folder(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--runtime", choices=("torch", "onnx", "onnx-int8"), default="torch",
                   help="onnx serves <run>/export/model.onnx (see `imgcls export`), onnx-int8 "
                        "<run>/export/model-int8.onnx (`imgcls export RUN --int8`)")
    _add_api_key_flags(p)
    p.add_argument("--max-request-bytes", type=int, default=64_000_000,
                   help="largest whole request body in bytes, however many files it carries (default: 64000000)")
    p.add_argument("--client-timeout", type=float, default=20.0,
                   help="seconds a client may take to send a request's headers, or pause while sending its body, "
                        "before it is answered 408 and dropped (default: 20)")
    p.add_argument("--max-batch", type=int, default=32, help="most images a batched model call takes (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill, milliseconds")



def cmd_serve(args) -> int:
    from imgcls.serving.app import serve  # start-up time

    if args.max_batch < 1 or args.max_wait_ms < 0:
        raise ImgclsError("--max-batch must be at least 1 and --max-wait-ms at least 0")
    if not 0 <= args.port <= 65535:
        raise ImgclsError(f"--port must be between 0 and 65535, got {args.port}")
    serve(args.run, host=args.host, port=args.port, runtime=args.runtime, api_key=api_key_of(args),
          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_request_bytes=args.max_request_bytes,
          client_timeout=args.client_timeout)
    return 0


def _add_api_key_flags(p: argparse.ArgumentParser) -> None:
    """The flags ``api_key_of`` reads (its third source, $IMGCLS_API_KEY, needs none)."""
    p.add_argument("--api-key", help="require this key in the X-API-Key header of every API request (it shows in "
                   "`ps`: prefer --api-key-file or the IMGCLS_API_KEY environment variable)")
    p.add_argument("--api-key-file", type=Path, help="read the key from the first line of this file")



def api_key_of(args) -> str | None:
    """The serving key: --api-key, else --api-key-file's first line, else $IMGCLS_API_KEY; None: no key."""
    import os

    given = [name for name, value in (("--api-key", args.api_key), ("--api-key-file", args.api_key_file))
             if value is not None]
    if len(given) > 1:
        raise ImgclsError("give the key once: --api-key or --api-key-file, not both")
    if args.api_key is not None:
        return args.api_key
    if args.api_key_file is not None:
        try:
            lines = args.api_key_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ImgclsError(f"--api-key-file {args.api_key_file}: cannot read it ({exc.__class__.__name__}); "
                              f"give a text file whose first line is the key") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ImgclsError(f"--api-key-file {args.api_key_file}: its first line is empty; write the key there")
        return key
    return os.environ.get("IMGCLS_API_KEY") or None


def _export_args(p: argparse.ArgumentParser) -> None:
    from imgcls.quantize import (  # start-up time: a module without imports
        CALIBRATIONS,
        DEFAULT_CALIBRATION,
    )

    _add_run(p)
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("--out", type=Path, help="output file (default: <run>/export/model.onnx, or model-int8.onnx)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted difference of probabilities")
    p.add_argument("--int8", action="store_true",
                   help="write a static int8 model instead (export/model-int8.onnx, about 4x smaller), calibrated "
                        "on the run's train images and refused when its test accuracy drops more than --max-drop")
    p.add_argument("--max-drop", type=float, default=None,
                   help="with --int8: largest accepted drop of test accuracy (mAP for several labels per image) "
                        "from fp32, a fraction (default: 0.01, 1 point)")
    p.add_argument("--calibration", choices=CALIBRATIONS, default=None,
                   help=f"with --int8: how activation ranges are calibrated (default: {DEFAULT_CALIBRATION})")
    p.add_argument("--data", help="with --int8: the run's data from where it is now, if it moved since training")



def cmd_export(args) -> int:
    from imgcls.export import MAX_DROP, check_summary, export_onnx  # start-up time

    if not args.int8:
        given = [flag for flag, value in (("--max-drop", args.max_drop), ("--calibration", args.calibration),
                                          ("--data", args.data)) if value is not None]
        if given:
            raise ImgclsError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to an int8 export: "
                              f"add --int8")
        result = export_onnx(args.run, out=args.out, tolerance=args.tolerance)
        score = (f", its out-of-distribution score ({result['ood_score']}) to {result['max_abs_diff_ood_score']:.2e}"
                 if "ood_score" in result else "")
        print(f"{result['path']}: {result['exporter']} exporter, opset {result['opset']}; ONNX Runtime matches "
              f"PyTorch on {result['images_checked']} images to {result['max_abs_diff_probabilities']:.2e} "
              f"(tolerance {result['tolerance']:g}){score}")
        return 0
    max_drop = MAX_DROP if args.max_drop is None else args.max_drop
    result = export_onnx(args.run, out=args.out, tolerance=args.tolerance, int8=True, max_drop=max_drop,
                         calibration=args.calibration, data=args.data)
    q = result["quantization"]
    bits = (f" with 7-bit weights (8-bit ones lost {q['tried'][0]['drop'] * 100:.2f} points)"
            if q.get("reduce_range") else "")
    print(f"{result['path']}: int8{bits}, {result['bytes'] / 1e6:.1f} MB ({result['times_smaller']:g}x smaller than fp32), "
          f"{q['calibration']} calibration on {q['calibration_images']} images of the {q['calibration_split']} split; "
          f"{check_summary(result['check'])}")
    return 0


def cmd_report(args) -> int:
    from imgcls import analysis  # start-up time

    print(analysis.report(args.run))
    return 0


def cmd_calibrate(args) -> int:
    from imgcls import analysis  # start-up time

    result = analysis.calibrate(args.run)
    print(f"temperature {result['temperature']:.4f} (fitted on the val split), stored with the model")
    for split in ("val", "test"):
        r = result[split]
        print(f"{split:5s} ECE {r['ece_before']:.4f} -> {r['ece_after']:.4f}   NLL {r['nll_before']:.4f} -> {r['nll_after']:.4f}")
    return 0


def _thresholds_args(p: argparse.ArgumentParser) -> None:
    _add_run_folder(p)
    p.add_argument("--objective", default="f1", help="f1 (default), precision=0.95 or recall=0.9")



def cmd_thresholds(args) -> int:
    from imgcls import analysis  # start-up time

    result = analysis.tune(args.run, args.objective)
    width = max(len(r["class"]) for r in result["per_class"])
    print(f"per-class thresholds for {args.objective}, tuned on the val split and stored with the model:")
    print(f"{'class':<{width}}  threshold  precision  recall      f1")
    for r in result["per_class"]:
        flag = "" if r.get("met", True) else "  (target not reachable)"
        print(f"{r['class']:<{width}}  {r['threshold']:9.4f}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:6.4f}{flag}")
    return 0


def _probe_args(p: argparse.ArgumentParser) -> None:
    _add_run_folder(p)
    p.add_argument("--max-train", type=int, default=5000, help="training images for the probes (default: 5000)")
    p.add_argument("--max-eval", type=int, default=5000, help="held-out images for scoring (default: 5000)")



def cmd_probe(args) -> int:
    from imgcls import analysis  # start-up time
    from imgcls.evaluation.probes import format_probes  # start-up time

    print(format_probes(analysis.probe(args.run, args.max_train, args.max_eval)))
    return 0


def _cv_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folds", type=int, default=5, help="number of folds (default: 5)")
    _add_config_file(p)
    add_config_flags(p)



def cmd_cv(args) -> int:
    api, cv = import_paused("imgcls.api"), import_paused("imgcls.evaluation.cv")
    overrides = _config_overrides(args)
    result = api.cross_validate(args.config, args.folds, console=terminal.console(), **overrides)
    print(cv.format_cv(result))
    return 0


# The settings that decide which images inspect reads and how it sees them (the rest train).
INSPECT_FLAGS = ("model", "pretrained", "image_size", "resize", "channels", "val_fraction", "test_fraction",
                 "on_bad_image", "cache", "follow_links", "seed", "device", "out", "exclude")


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="a folder or .zip of images, in any layout that train --data takes")
    p.add_argument("--name", help="the inspection's folder in --out (default: <data>-inspect)")
    p.add_argument("--folds", type=int, default=5, help="folds of the label check (default: 5)")
    p.add_argument("--fail-on", type=split_list, default=[], metavar="PROBLEMS",
                   help="exit 1 when any of these is found, for CI: problems (leakage, label_error, ...) or groups "
                        "(duplicates, label_errors, outliers, quality), comma-separated")
    _add_quiet(p)
    add_config_flags(p, only=INSPECT_FLAGS)


def cmd_inspect(args) -> int:
    api, inspection = import_paused("imgcls.api"), import_paused("imgcls.inspection")
    inspection.failed_checks({"findings": []}, args.fail_on)  # a bad name is refused before any work
    overrides = {k: v for k, v in _config_overrides(args).items() if k in INSPECT_FLAGS and v is not None}
    result = api.inspect(args.data, name=args.name, folds=args.folds, quiet=args.quiet, **overrides)
    failed = inspection.failed_checks(result, args.fail_on)
    if failed:
        print(f"inspect: found {', '.join(failed)} (--fail-on {','.join(args.fail_on)})", file=sys.stderr)
        return 1
    return 0


def _tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=int, default=20, help="finished trials the study runs to; the same command run "
                   "again continues the study up to this number (default: 20)")
    p.add_argument("--timeout", help="start no trial after this long, e.g. 30m or 2h (default: none)")
    p.add_argument("--space", type=Path, help="YAML search space: config fields mapped to ranges or choices "
                   "(default: the one --show-space prints)")
    p.add_argument("--metric", default="auto", choices=("auto", "val_accuracy", "val_loss", "val_macro_f1", "val_map"),
                   help="what the trials are ranked and pruned by, on the val split after every epoch "
                        "(default auto: val_map for data with several labels per image, else val_accuracy)")
    p.add_argument("--study", help="study name; its folder is <out>/<study> (default: <data>-tune)")
    p.add_argument("--storage", help="SQLAlchemy URL of the study's database, e.g. postgresql://USER:PASS@HOST/DB "
                   "for workers on several machines (default: sqlite:///<study folder>/study.db)")
    p.add_argument("--sampler", default="tpe", choices=("tpe", "random", "grid"),
                   help="tpe (default, seeded by --seed), random, or grid (a space of choices only)")
    p.add_argument("--pruner", default="median", choices=("median", "hyperband", "none"),
                   help="stop bad trials after an epoch: median (default), hyperband or none")
    p.add_argument("--show-space", action="store_true", help="print the search space (as a --space file) and exit")
    p.add_argument("--retrain-best", action="store_true", help="then train the best trial's config on train + val "
                   "and evaluate it on the test split once (<study folder>/best-retrained)")
    _add_config_file(p, "YAML config file the trials start from")
    _add_quiet(p)
    add_config_flags(p)



def cmd_tune(args) -> int:
    api = import_paused("imgcls.api")
    overrides = _config_overrides(args)
    if args.show_space:
        print(api.search_space(args.config, space=args.space, **overrides), end="")
        return 0
    summary = api.tune(args.config, trials=args.trials, timeout=args.timeout, space=args.space, metric=args.metric,
                       study=args.study, storage=args.storage, sampler=args.sampler, pruner=args.pruner,
                       console=terminal.console(args.quiet), **overrides)
    if summary["best_trial"] is None:
        counts = ", ".join(f"{n} {state}" for state, n in summary["counts"].items() if n)
        first = next((f"trial {r['trial']}: {r['reason']}" for r in summary["trials"] if r.get("reason")), "")
        print(terminal.safe(f"error: no trial of study {summary['study']} completed ({counts or 'none ran'})"
                            + (f"; {first}" if first else "") + f"; every trial's reason is in "
                            f"{Path(summary['path']) / 'study.json'}"), file=sys.stderr)
        return 1
    if args.retrain_best:
        run = api.retrain_best(summary, console=terminal.console(args.quiet))
        print(f"best configuration retrained: {run.path}, test accuracy {run.test_metrics['accuracy']:.4f}")
    return 0


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", type=Path, nargs="+", help="run folders")
    p.add_argument("--out", type=Path, default=Path("compare"), help="folder for compare.html (default: compare)")



def cmd_compare(args) -> int:
    from imgcls.reports.compare import (  # start-up time
        compare_runs,
        format_leaderboard,
        write_compare,
    )

    result = compare_runs(args.runs)
    print(format_leaderboard(result))
    print(write_compare(result, args.out))
    return 0


class Command(NamedTuple):
    """A subcommand: its line in ``imgcls --help``, what adds its arguments (None: it takes none), what runs it."""

    help: str
    add_args: Callable[[argparse.ArgumentParser], None] | None
    run: Callable[[argparse.Namespace], int]


# In the order ``imgcls --help`` lists them.
COMMANDS = {
    "train": Command("train a model (default: a CNN on the built-in 8x8 digits)", _train_args, cmd_train),
    "evaluate": Command("metrics of a trained model on a split", _evaluate_args, cmd_evaluate),
    "predict": Command("top classes for images, folders or zips", _predict_args, cmd_predict),
    "explain": Command("heatmaps of the evidence behind predictions (Grad-CAM and others)", _explain_args,
                       cmd_explain),
    "serve": Command("a web page and an HTTP API for a trained model", _serve_args, cmd_serve),
    "export": Command("export a trained model (ONNX), checked against PyTorch on real images", _export_args,
                      cmd_export),
    "report": Command("write report.html with every figure into a run folder", _add_run_folder, cmd_report),
    "calibrate": Command("fit temperature scaling on the val split and store it with the model", _add_run_folder,
                         cmd_calibrate),
    "thresholds": Command("tune per-class decision thresholds on the val split and store them", _thresholds_args,
                          cmd_thresholds),
    "probe": Command("linear probes of each convolutional stage (per layer and cumulative)", _probe_args, cmd_probe),
    "inspect": Command("the problems of a folder of images before training: duplicates, leakage, label errors, "
                       "outliers, image quality", _inspect_args, cmd_inspect),
    "cv": Command("stratified k-fold cross-validation (takes the training options)", _cv_args, cmd_cv),
    "tune": Command("search hyperparameters with Optuna: trials as run folders, with pruning (takes the training "
                    "options)", _tune_args, cmd_tune),
    "compare": Command("several runs side by side: leaderboard and validation curves", _compare_args, cmd_compare),
    "recipes": Command("list the named training recipes and the data each suits", None, cmd_recipes),
    "models": Command("list architectures, or summarise one", _models_args, cmd_models),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imgcls", description="Train, evaluate and use CNN image classifiers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help)
        if command.add_args is not None:
            command.add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    distributed = sys.modules.get("imgcls.training.distributed")  # imported only by a run that may join a group
    if distributed is not None:
        distributed.exit_now(code)  # a process that joined a group ends here (its teardown could abort)
    return code


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[argv.index(args.command) + 1:]  # what --nproc hands on to every process
    keep_freed_memory()  # a command is a process of its own: the entry point sets it (imgcls.startup)
    try:
        if args.command != "train" and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise ImgclsError(f"imgcls {args.command} runs in one process; torchrun starts only `imgcls train` "
                              f"(each of its {os.environ['WORLD_SIZE']} processes would repeat the whole command)")
        return COMMANDS[args.command].run(args)
    except ImgclsError as exc:
        print(terminal.safe(f"error: {exc}"), file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            name = str(exc.filename or "")
            shown_name = name if len(name) <= 120 else f"{name[:60]}...{name[-50:]}"
            print(f"error: a path is too long for the file system ({len(name):,} characters): {shown_name}",
                  file=sys.stderr)
            return 2
        if not is_disk_full(exc):
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"error: the disk is full{where}. Every checkpoint written before stays as it was: free space, then "
              f"`imgcls train --resume RUN` goes on from the last one", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
