"""The ``medtl`` command: a thin typer layer over the Python API (one API call per command).

User mistakes (MedtlError) print one line and exit 2; option errors exit 2 through click.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from medtl.console import console, printable
from medtl.errors import MedtlError

app = typer.Typer(
    name="medtl", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Transfer learning for medical image classification, evaluated the way journals ask.",
    rich_markup_mode="rich",
)


class _TextConsole(Console):
    """A console that prints every string as the text it is. Results name the user's files,
    folders and patterns: read as markup, 'scan[left].png' would print as 'scan.png' and
    '[/_](P\\d+)' would crash; control characters (ESC) would steer the terminal, and a file
    name that is not UTF-8 would fail to print. So no markup, no :emoji: codes, and every
    character that is not printable escaped (newlines kept); styles come from Text objects."""

    def render_str(self, text: str, **kwargs) -> Text:  # type: ignore[override]
        return super().render_str(printable(text, keep="\n"), **kwargs)


# Tables and results go to stdout; when that is a file or pipe, rich's 80 columns would
# truncate the tables, so give them room.
out_console = _TextConsole(markup=False, emoji=False,
                           width=None if sys.stdout.isatty() else 120)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or log lines.")]
TtaOverride = Annotated[str | None, typer.Option(help="Test-time augmentation none | flip | "
                                                      "standard in place of the run's own "
                                                      "(default: what the run recorded).")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda.")]
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="Skip unreadable images (counted in "
                                                          "the log) instead of stopping.")]
PathsOption = Annotated[str, typer.Option(
    "--paths", help="How the data's paths are written into outputs: relative (to the data "
                    "folder, or the folder or file given) | hashed (salted pseudonyms) | "
                    "absolute.")]
PatientRegex = Annotated[str | None, typer.Option(
    help="Regex whose first group is the patient id in a file name; validation is then carved "
         "by patient. Kermany: '(person\\d+|IM-\\d+)'.")]
LabelColumns = Annotated[str | None, typer.Option(
    "--labels", help="Multi-label manifests: the labels to use, comma-separated, in this order "
                     "(default: every column of 1/0/-1/blank values, or every finding of a "
                     "'Finding Labels' column).")]
Uncertain = Annotated[str, typer.Option(
    help="Multi-label: what -1 (uncertain) becomes: ignore (unknown, masked) | zeros | ones "
         "(CheXpert's U-Ignore, U-Zeros, U-Ones).")]
Blank = Annotated[str, typer.Option(
    help="Multi-label: what a blank cell becomes: unknown (masked) | zeros (unmentioned = "
         "absent, as CheXpert is often read).")]


def _metrics_table(title: str, metrics: dict) -> Table:
    t = Table(title=title)
    t.add_column("split")
    for name in ("n", "AUC (95% CI)", "accuracy (95% CI)", "sensitivity", "specificity"):
        t.add_column(name, justify="right")

    def cell(m: dict, k: str) -> str:
        if m.get(k) is None:
            return "–"
        ci = m.get(f"{k}_ci95")
        return f"{m[k]:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")

    for split, m in metrics.items():
        if not isinstance(m, dict) or "accuracy" not in m:
            continue
        t.add_row(split, str(m["n"]), *(cell(m, k) for k in ("auc", "accuracy", "sensitivity",
                                                           "specificity")))
        if "per_volume" in m:
            v = m["per_volume"]
            t.add_row(f"{split}, per volume", str(v["n"]),
                      *(cell(v, k) for k in ("auc", "accuracy", "sensitivity", "specificity")))
    return t


def _multilabel_table(title: str, metrics: dict) -> Table:
    """A multi-label run's figures: macro and micro AUC and mAP per split, then each label's
    AUC, sensitivity and specificity at its threshold (chosen on val) on the last split."""
    t = Table(title=title)
    for name in ("split / label", "n (positive)", "AUC (95% CI)", "AP", "sensitivity",
                 "specificity", "threshold"):
        t.add_column(name, justify="left" if name.startswith("split") else "right")

    def cell(m: dict, k: str) -> str:
        if m.get(k) is None:
            return "–"
        ci = m.get(f"{k}_ci95")
        return f"{m[k]:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")

    splits = [s for s, m in metrics.items() if isinstance(m, dict) and "macro_auc" in m]
    for split in splits:
        m = metrics[split]
        t.add_row(f"{split}: macro", str(m["n"]), cell(m, "macro_auc"), cell(m, "map"), "", "",
                  "")
        t.add_row(f"{split}: micro", "", cell(m, "micro_auc"), "", "", "", "")
    if splits:
        last = metrics[splits[-1]]
        for name, lab in last["labels"].items():
            t.add_row(f"{splits[-1]}: {name}", f"{lab['n_known']} ({lab['n_positive']})",
                      cell(lab, "auc"), _fmt(lab.get("average_precision")),
                      cell(lab, "sensitivity"), cell(lab, "specificity"),
                      _fmt(lab.get("threshold")))
    return t


def _results_table(title: str, metrics: dict) -> Table:
    """The figures table of a run: per label for a multi-label one."""
    if any(isinstance(m, dict) and "macro_auc" in m for m in metrics.values()):
        return _multilabel_table(title, metrics)
    return _metrics_table(title, metrics)


def _operating_points(metrics: dict) -> str:
    """One line per operating point chosen on val and applied to test."""
    test = metrics.get("test", {})
    lines = []
    for name, op in test.get("operating_points", {}).items():
        what = ("Youden's J" if name == "youden" else
                f"sensitivity >= {metrics['thresholds']['target_sensitivity']:.2f} on val")
        lines.append(f"test at {what} (threshold {op['threshold']:.3f}): sensitivity "
                     f"{_fmt(op['sensitivity'])}, specificity {_fmt(op['specificity'])}")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run directory to write.")] = Path("runs/demo"),
    quiet: Quiet = False,
) -> None:
    """Run the main job on the embedded chest X-ray sample and print its test metrics.

    Frozen ImageNet MobileNetV2 features + logistic regression on 400 Kermany paediatric chest
    X-rays (CC BY 4.0), validation carved by patient, scored on held-out test patients.

    Example: [bold]medtl demo --out runs/demo[/bold]
    """
    from medtl.workflow import demo as run_demo

    run = run_demo(out, quiet=quiet)
    out_console.print(_metrics_table("medtl demo: mobilenet_v2 + logistic regression",
                                     run.metrics))
    out_console.print(f"run: {run.path}")


@app.command()
def models(
    available: Annotated[bool, typer.Option("--available",
                                            help="Only backbones whose ImageNet weights "
                                                 "resolve on this machine.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the backbones: group, parameters, feature size, input size, ImageNet weights.

    Example: [bold]medtl models --available[/bold]
    """
    from medtl.models import imagenet_available, list_specs

    rows = []
    for spec in list_specs():
        ok, how = imagenet_available(spec)
        if available and not ok:
            continue
        rows.append({"name": spec.name, "group": spec.group, "year": spec.year,
                     "params_total": spec.params_total, "params_features": spec.params_features,
                     "feature_dim": spec.feature_dim, "input_size": spec.input_size,
                     "imagenet_weights": ok, "weights_source" if ok else "how_to_provide": how,
                     "weights_file": spec.weight_files[0] if spec.weight_files else None})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table(title="medtl backbones (groups of Kim et al. 2022)",
              caption="extractor M: parameters without the classifier (millions)")
    for col, just in (("name", "left"), ("group", "left"), ("year", "right"),
                      ("params M", "right"), ("extractor M", "right"), ("dim", "right"),
                      ("input", "right"), ("ImageNet", "left")):
        t.add_column(col, justify=just, no_wrap=True)
    for r in rows:
        ok = r["imagenet_weights"]
        t.add_row(r["name"], r["group"], str(r["year"]), f"{r['params_total'] / 1e6:.1f}",
                  f"{r['params_features'] / 1e6:.1f}", str(r["feature_dim"]),
                  str(r["input_size"]),
                  Text.assemble(("yes", "green"), f" ({r['weights_source'].split(':')[0]})")
                  if ok else "no")
    out_console.print(t)
    missing = [r for r in rows if not r["imagenet_weights"]]
    if missing:
        out_console.print("Weights that do not resolve here: put the file in "
                          "MEDTL_WEIGHTS_DIR, or pass --weights PATH (docs/weights.md):")
        for r in missing:
            out_console.print(f"  {r['name']}: {r['weights_file']}", soft_wrap=True)


@app.command()
def info(
    data: Annotated[str, typer.Argument(help="Class folder, CSV manifest or MedMNIST .npz.")],
    patient_regex: PatientRegex = None,
    skip_bad: SkipBad = False,
    labels: LabelColumns = None,
    uncertain: Uncertain = "ignore",
    blank: Blank = "unknown",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    quiet: Quiet = False,
) -> None:
    """Summarise a dataset: classes, counts per split, patients, image sizes, problems
    (multi-label: positive / negative / unknown images per label, and co-occurrence).

    Every image is decoded once, so unreadable files are found here rather than mid-training.

    Example: [bold]medtl info data/chest_xray --patient-regex '(person\\d+|IM-\\d+)'[/bold]
    """
    from medtl.data import dataset_summary

    summary = dataset_summary(data, patient_regex=patient_regex, skip_bad=skip_bad, quiet=quiet,
                              labels=labels, uncertain=uncertain, blank=blank)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    if summary.get("multilabel"):
        _print_label_tables(f"{data}", summary, summary["patients"])
    else:
        _print_class_table(data, summary)
    if summary.get("patient_structure"):
        out_console.print(_patient_table(summary["patient_structure"]))
    out_console.print(f"image sizes: {summary['image_sizes']}")
    out_console.print("modalities: " + ", ".join(f"{k} x{v}" for k, v in
                                                 summary["modalities"].items()))
    bad = summary["unreadable"]
    out_console.print(f"unreadable images: {len(bad)}")
    for line in bad[:20]:
        out_console.print(f"  {line}")


def _print_class_table(data: str, summary: dict) -> None:
    t = Table(title=f"{data}")
    t.add_column("split")
    for c in summary["classes"]:
        t.add_column(c, justify="right")
    t.add_column("patients", justify="right")
    for split, counts in summary["counts"].items():
        t.add_row(split, *(str(counts.get(c, 0)) for c in summary["classes"]),
                  str(summary["patients"].get(split, "–")))
    out_console.print(t)


def _print_label_tables(title: str | None, summary: dict, patients: dict) -> None:
    """Multi-label: positive / negative / unknown images of each label per split, then the
    co-occurrence of positives (the legends in the first column: a title would wrap)."""
    per_split = summary["label_counts"]
    t = Table(title=title)
    t.add_column("label: positive / negative / unknown")
    for split in per_split:
        t.add_column(split, justify="right")
    for name in summary["classes"]:
        t.add_row(name, *(f"{c[name]['positive']} / {c[name]['negative']} / "
                          f"{c[name]['unknown']}" for c in per_split.values()))
    t.add_row("images", *(str(sum(next(iter(c.values())).values())) if c else "0"
                          for c in per_split.values()))
    if patients:
        t.add_row("patients", *(str(patients.get(s, "–")) for s in per_split))
    out_console.print(t)
    co = summary["cooccurrence"]
    m = Table()
    m.add_column(f"co-occurrence ({co['split']}): images with both")
    for name in co["labels"]:
        m.add_column(name, justify="right")
    for name, row in zip(co["labels"], co["matrix"], strict=True):
        m.add_row(name, *(str(v) for v in row))
    out_console.print(m)


@app.command()
def check(
    data: Annotated[str, typer.Argument(help="Class folder, CSV manifest or MedMNIST .npz.")],
    patient_regex: PatientRegex = None,
    near_threshold: Annotated[int, typer.Option(
        min=0, max=64, help="Most differing bits (of 256) between the perceptual hashes of "
                            "near-duplicate images (0-64).")] = 20,
    labels: LabelColumns = None,
    uncertain: Uncertain = "ignore",
    blank: Blank = "unknown",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    quiet: Quiet = False,
) -> None:
    """Find what would make results wrong: unreadable files, exact and near-duplicate images
    (within and across splits), patients in several splits; note class imbalance, mixed sizes
    and formats, and the patient structure (multi-label: per-label counts and co-occurrence).
    Exit code 1 when a problem is found.

    Example: [bold]medtl check data/chest_xray --patient-regex '(person\\d+|IM-\\d+)'[/bold]
    """
    from medtl.data import check_dataset

    # --json output is for scripts: no progress bar to mix into it.
    result = check_dataset(data, patient_regex=patient_regex, near_threshold=near_threshold,
                           quiet=quiet or as_json, labels=labels, uncertain=uncertain,
                           blank=blank)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        _print_check(result)
    if result["problems"]:
        raise typer.Exit(1)


def _tail(path: str) -> str:
    """The file and its folder: enough to find it, short enough for a table."""
    parts = Path(path).parts
    return str(Path(*parts[-2:])) if len(parts) > 2 else path


def _check_example(problem: dict) -> str:
    item = problem["items"][0]
    if "patient" in item:
        return f"{item['patient']} in {' and '.join(item['splits'])}"
    if "images" in item:
        sep = "  ~  " if "distance" in item else "  =  "
        shown = sep.join(f"{_tail(i['path'])} ({i['split']})" for i in item["images"][:3])
        return shown + (f"  ({item['distance']} bits)" if "distance" in item else "")
    return f"{_tail(item['path'])}: {item['reason']}"


def _patient_table(structure: dict) -> Table:
    t = Table(title="patients")
    for col in ("split", "patients", "images", "images per patient (min/median/max)",
                "patients in several classes"):
        t.add_column(col, justify="left" if col == "split" else "right")
    for split, s in structure.items():
        ipp = s["images_per_patient"]
        t.add_row(split, str(s["patients"]), str(s["images"]),
                  f"{ipp['min']}/{ipp['median']:g}/{ipp['max']}" if ipp else "–",
                  str(s["patients_in_several_classes"]))
    return t


def _print_check(result: dict) -> None:
    summary, problems = result["summary"], result["problems"]
    if problems:
        t = Table(title=f"medtl check {result['source']}: {summary['images']} images")
        t.add_column("problem")
        t.add_column("count", justify="right")
        t.add_column("example")
        for p in problems:
            kind = Text(p["kind"], style="red") if p["leakage"] else p["kind"]
            t.add_row(kind, str(p["count"]), _check_example(p))
        out_console.print(t)
        for p in problems:
            out_console.print(f"{p['kind']}: {p['message']}", soft_wrap=True, highlight=False)
    if summary.get("multilabel"):
        _print_label_tables(None, summary, {})
    if summary["patients"]:
        out_console.print(_patient_table(summary["patients"]))
    for note in result["notes"]:
        out_console.print(f"note: {note}", soft_wrap=True, highlight=False)
    if problems:
        out_console.print(f"{len(problems)} kind(s) of problem found (--json lists every "
                          "file)")
    else:
        out_console.print(f"no problems in {summary['images']} images")


def _cv_table(title: str, cv: dict) -> Table:
    from medtl.workflow import CV_FIGURES

    t = Table(title=title)
    t.add_column("fold")
    for f in CV_FIGURES:
        t.add_column(f, justify="right")

    def cell(v) -> str:
        return "–" if v is None else f"{v:.3f}"

    for row in cv["per_fold"]:
        t.add_row(str(row["fold"]), *(cell(row[f]) for f in CV_FIGURES))
    t.add_row("mean ± sd", *(f"{cell(cv['mean'][f])} ± {cell(cv['sd'][f])}"
                             for f in CV_FIGURES))
    return t


@app.command()
def train(
    data: Annotated[str, typer.Argument(help="Class folder, CSV manifest or MedMNIST .npz.")],
    backbone: Annotated[str, typer.Option(help="Backbone name (see `medtl models`).")]
    = "mobilenet_v2",
    strategy: Annotated[str, typer.Option(help="auto | feature-extractor | hybrid | fine-tune | "
                                               "full | scratch | truncated (docs/usage.md).")]
    = "auto",
    head: Annotated[str, typer.Option(help="hybrid head: logreg | svm | rf | knn | prototype.")]
    = "logreg",
    weights: Annotated[str, typer.Option(
        help="imagenet | random | PATH to a weights file | RUN_DIR: a finished run's "
             "backbone (same --backbone; its classifier is not kept), for ImageNet -> "
             "domain -> task transfer.")]
    = "imagenet",
    image_size: Annotated[int | None, typer.Option(help="Input side in pixels "
                                                        "(default: the backbone's).")] = None,
    in_chans: Annotated[int, typer.Option(help="3 replicates grey images; 1 sums the first "
                                                "convolution's filters (timm's method).")] = 3,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs (default: 200 for the "
                                                    "linear head, 20 when the backbone "
                                                    "trains, 5 per stage of auto and "
                                                    "--gradual).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per backbone batch.")] = 64,
    unfreeze: Annotated[int | None, typer.Option(help="fine-tune: how many top blocks train "
                                                      "(default 1); with --gradual or auto: "
                                                      "the most that may (default all).")]
    = None,
    gradual: Annotated[bool, typer.Option("--gradual", help="fine-tune: frozen features "
                                          "first, then one more top block per stage while "
                                          "validation AUC improves.")] = False,
    time_budget: Annotated[float | None, typer.Option(
        metavar="MINUTES", help="auto: the most minutes the climb may take; stages the "
                                "estimate says cannot finish are skipped and the best stage "
                                "so far is kept.")] = None,
    keep: Annotated[int | None, typer.Option(help="truncated: how many lower blocks to keep "
                                                  "(default: half).")] = None,
    lr: Annotated[float, typer.Option(help="Learning rate of the head when the backbone "
                                           "trains.")] = 1e-3,
    lr_decay: Annotated[float, typer.Option(help="Each lower block trains at this times the "
                                                 "rate of the block above.")] = 0.5,
    augment: Annotated[str, typer.Option(help="none | basic | strong (docs/augmentation.md)."
                                         )] = "basic",
    hflip: Annotated[bool, typer.Option("--hflip/--no-hflip", help="Horizontal flips in "
                                        "augmentation; --no-hflip where laterality matters "
                                        "(chest X-rays).")] = True,
    tta: Annotated[str, typer.Option(help="Test-time augmentation of val/test and later "
                                          "predictions: none | flip | standard (flips only "
                                          "where --augment flipped; docs/augmentation.md).")]
    = "none",
    patience: Annotated[int, typer.Option(help="Epochs without a better validation AUC "
                                               "before stopping.")] = 5,
    label_smoothing: Annotated[float, typer.Option(
        metavar="F", help="Trainable strategies: label smoothing of the training loss "
                          "(0 = off; e.g. 0.1).")] = 0.0,
    ema: Annotated[float | None, typer.Option(
        metavar="DECAY", help="Trainable strategies: validate and save an exponential moving "
                              "average of the weights (e.g. 0.999 per step; off by "
                              "default).")] = None,
    mix: Annotated[str, typer.Option(
        metavar="KIND",
        help="none | mixup | cutmix | both. Trainable strategies: mixup (Zhang et al. 2018) or "
             "CutMix (Yun et al. 2019) of each training batch; both = one of the two per "
             "batch. Off by default (it lowered validation AUC on BreastMNIST). Frozen "
             "strategies refuse any but none (docs/augmentation.md).")] = "none",
    class_weight: Annotated[str, typer.Option(help="auto (balanced when minority/majority < "
                                                   "0.5) | balanced | none.")] = "auto",
    sampler: Annotated[str, typer.Option(help="none | balanced (each class drawn equally "
                                              "often; replaces class weights).")] = "none",
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Fit temperature scaling "
                                            "on validation (probabilities, not decisions, "
                                            "change).")] = False,
    target_sensitivity: Annotated[float, typer.Option(help="Binary: the second operating "
                                                          "point, the highest threshold "
                                                          "reaching this sensitivity on "
                                                          "val.")] = 0.9,
    positive_class: Annotated[str | None, typer.Option(help="Binary: the class sensitivity, "
                                                            "specificity, operating points and "
                                                            "ROC refer to (default: the last "
                                                            "in name order).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out from its "
                                              "last checkpoint; refused if any option or the "
                                              "data changed.")] = False,
    folds: Annotated[int | None, typer.Option(help="K-fold cross-validation over train + val "
                                                   "(grouped by patient); test untouched.")]
    = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/DATA-BACKBONE-"
                                                  "STRATEGY).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for splits and training.")] = 0,
    device: Device = "auto",
    engine: Annotated[str, typer.Option(help="Frozen features: auto (ONNX Runtime on CPU) | "
                                             "onnx | torch.")] = "auto",
    patient_regex: PatientRegex = None,
    val_fraction: Annotated[float, typer.Option(help="Share of train carved as validation "
                                                     "when DATA has no val split.")] = 0.2,
    skip_bad: SkipBad = False,
    window: Annotated[str, typer.Option(help="DICOM/volume window: auto (the file's own, else "
                                             "min-max) | minmax | lung | mediastinum | "
                                             "abdomen | brain | bone.")] = "auto",
    slices: Annotated[str, typer.Option(help="Volumes: middle | all | sample:N slices per "
                                             "volume (predictions are averaged per "
                                             "volume).")] = "middle",
    mode: Annotated[str, typer.Option(help="Volumes: 2d (one slice) | 2.5d (slices k-1, k, "
                                           "k+1 as the three channels) | mip.")] = "2d",
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Read and write the "
                                        "frozen-feature cache.")] = True,
    threads: Annotated[int | None, typer.Option(help="CPU threads for PyTorch and ONNX "
                                                     "Runtime (default: every core).")] = None,
    devices: Annotated[int, typer.Option(help="Train with N processes on this machine "
                                              "(DDP through torchrun: one per GPU, or CPU "
                                              "processes sharing the cores); across machines "
                                              "use torchrun (docs/scale.md).")] = 1,
    sync_bn: Annotated[bool, typer.Option("--sync-bn", help="DDP on GPUs: BatchNorm "
                                          "statistics over the whole global batch.")] = False,
    frozen_cache: Annotated[int, typer.Option(help="fine-tune: run the frozen blocks once "
                                                   "and keep their output for K versions of "
                                                   "each image (the plain one and K-1 "
                                                   "augmented copies); 0: off.")] = 0,
    precision: Annotated[str, typer.Option(help="Trainable strategies on CPU: fp32 | bf16 "
                                                "(autocast of the training passes; faster on "
                                                "CPUs with AVX-512 BF16 or AMX).")] = "fp32",
    memory_budget: Annotated[str, typer.Option(help="Trainable strategies: the most memory "
                                                    "decoded images may take (50% of RAM, "
                                                    "8GB, 0); over it the training split "
                                                    "streams from disk.")] = "50%",
    align: Annotated[str, typer.Option(
        help="Trainable strategies: align the features with the unlabelled --align-target "
             "images while training: none | coral (Deep CORAL; docs/domain-adaptation.md).")]
    = "none",
    align_target: Annotated[list[str] | None, typer.Option(
        metavar="TARGET", help="--align: unlabelled images of the new domain (files, folders "
                               "or CSV manifests; repeat for several). Aligning to the images "
                               "later scored is transductive.")] = None,
    align_weight: Annotated[float, typer.Option(
        metavar="W", help="--align: weight of the alignment loss added to the "
                          "classification loss.")] = 1.0,
    labels: LabelColumns = None,
    uncertain: Uncertain = "ignore",
    blank: Blank = "unknown",
    paths: PathsOption = "relative",
    quiet: Quiet = False,
) -> None:
    """Train a transfer-learned classifier and write a run directory.

    The default strategy, auto, starts from frozen features and unfreezes one more block per
    stage while validation AUC improves.

    Example: [bold]medtl train data/chest_xray --patient-regex '(person\\d+|IM-\\d+)' --no-hflip
    --image-size 160 --out runs/cxr[/bold]

    Example: [bold]medtl train data/chest_xray --strategy hybrid --head svm --out runs/svm[/bold]
    """
    from medtl.training.options import TrainOptions
    from medtl.workflow import train as run_train

    # The flags named as TrainOptions fields are the training options; the rest say what data
    # and where (so a new option is a field there and a flag here, nothing else).
    options = TrainOptions.from_mapping(locals())
    if devices != 1:
        raise typer.Exit(_launch(devices, options, folds, data))
    run = run_train(data, options, target_sensitivity=target_sensitivity, out=out,
                    overwrite=overwrite, resume=resume, patient_regex=patient_regex,
                    val_fraction=val_fraction, window=window, slices=slices, mode=mode,
                    folds=folds, positive_class=positive_class, paths=paths,
                    labels=_label_list(labels), uncertain=uncertain, blank=blank)
    if os.environ.get("RANK", "0") != "0":
        return  # one DDP process prints the results: rank 0
    if folds is not None:
        out_console.print(_cv_table(f"{backbone} / {strategy}, {folds}-fold CV",
                                    run.metrics["cv"]))
    else:
        out_console.print(_results_table(f"{backbone} / {strategy}", run.metrics))
        if points := _operating_points(run.metrics):
            out_console.print(points)
    if run.metrics.get("positive_class"):
        out_console.print(f"positive class: {run.metrics['positive_class']} (sensitivity, "
                          "specificity and operating points refer to it)", markup=False,
                          highlight=False)
    out_console.print(f"run: {run.path}  (report: {run.path / 'report.html'})")


def _label_list(labels: str | None) -> list[str] | None:
    """--labels a,b,c as a list (None: every label of the manifest)."""
    return [n.strip() for n in labels.split(",") if n.strip()] if labels else None


def _load_options(labels: str | None, uncertain: str, blank: str) -> dict:
    """The multi-label reading options that differ from the defaults (bench passes them to
    each cell's train, which records them)."""
    out: dict = {"labels": _label_list(labels)} if labels else {}
    if uncertain != "ignore":
        out["uncertain"] = uncertain
    if blank != "unknown":
        out["blank"] = blank
    return out


def _launch(devices: int, options, folds: int | None, data: str) -> int:
    """``train --devices N``: the request checked here, then ``medtl`` run again as N
    processes by torchrun, without ``--devices``; the exit status of the first that fails."""
    from medtl.training import distributed
    from medtl.transfer.estimator import TransferClassifier
    from medtl.workflow import check_distributable

    if devices < 1:
        raise MedtlError(f"--devices {devices}: at least 1")
    if distributed.requested():
        raise MedtlError("--devices inside a torchrun process: give torchrun --nproc-per-node "
                         "instead")
    check_distributable(TransferClassifier.from_options(options).make_strategy(), folds)
    if not Path(data).exists():  # the commonest mistake, said once rather than by N processes
        raise MedtlError(f"{data}: no such file or folder")
    return distributed.launch(devices, _without_devices(_ARGV))


def _without_devices(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--devices":
            skip = True
        elif not arg.startswith("--devices="):
            out.append(arg)
    return out


@app.command()
def evaluate(
    run: Annotated[str, typer.Argument(help="Run directory written by `medtl train`.")],
    data: Annotated[str | None, typer.Argument(help="Data to score (default: the run's "
                                                    "own).")] = None,
    split: Annotated[str, typer.Option(help="Split to score.")] = "test",
    output: Annotated[Path | None, typer.Option(help="Write predictions to this CSV.")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics as JSON.")] = False,
    tta: TtaOverride = None,
    adapt_bn: Annotated[list[str] | None, typer.Option(
        help="AdaBN before scoring: the model takes the BatchNorm statistics of these images "
             "(files or folders, labels unused), for this evaluation only; repeat for "
             "several. Scoring the same images is transductive (said in the output).")]
    = None,
    device: Device = "auto",
    skip_bad: SkipBad = False,
    paths: PathsOption = "relative",
    quiet: Quiet = False,
) -> None:
    """Score a saved run on a split (default test) of its data or of other data.

    Example: [bold]medtl evaluate runs/cxr --split test --output test_predictions.csv[/bold]
    """
    from medtl.run import write_csv
    from medtl.workflow import evaluate as run_evaluate

    result = run_evaluate(run, data, split=split, device=device, skip_bad=skip_bad,
                          quiet=quiet, paths=paths, tta=tta, adapt_bn=adapt_bn)
    if output:
        write_csv(output, result["rows"])
    if as_json:
        print(json.dumps(result["metrics"], indent=2))
    else:
        out_console.print(_results_table(f"{run}", {split: result["metrics"]}))


@app.command()
def adapt(
    run: Annotated[str, typer.Argument(help="Run directory written by `medtl train`.")],
    target: Annotated[list[str], typer.Argument(help="Images of the new scanner or site "
                                                     "(files or folders; labels unused).")],
    out: Annotated[Path, typer.Option(help="The adapted run's directory.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """AdaBN: a copy of RUN whose BatchNorm statistics are re-estimated on TARGET's images
    (no labels, no training); evaluate, predict, export and serve then use it.

    Example: [bold]medtl adapt runs/cxr /data/new_scanner --out runs/cxr-new-scanner[/bold]
    """
    from medtl.workflow import adapt as run_adapt

    adapted = run_adapt(run, target, out=out, overwrite=overwrite, device=device, quiet=quiet)
    record = adapted.config["adapted_bn"]
    out_console.print(f"AdaBN: {record['layers']} BatchNorm layers re-estimated on "
                      f"{record['images']} images; run written to {adapted.path} (score it "
                      "with `medtl evaluate`)")


@app.command()
def pretrain(
    data: Annotated[str, typer.Argument(help="Class folder, CSV manifest or MedMNIST .npz "
                                             "(labels unused; train and val images only).")],
    method: Annotated[str, typer.Option(help="simclr | byol | dino.")],
    start: Annotated[str, typer.Option("--from", help="Starting weights: imagenet | random.")],
    epochs: Annotated[int, typer.Option(help="Epochs over the images.")],
    out: Annotated[Path, typer.Option(help="Weights file to write (.safetensors); its "
                                           "checkpoint is kept in OUT.partial/ meanwhile.")],
    backbone: Annotated[str, typer.Option(help="Backbone name (see `medtl models`).")]
    = "mobilenet_v2",
    image_size: Annotated[int | None, typer.Option(help="Input side in pixels (default: the "
                                                        "backbone's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch (each seen in 2 views, "
                                                 "DINO 8).")] = 32,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate (default 1e-4 from "
                                                  "imagenet, 1e-3 from random).")] = None,
    splits: Annotated[str, typer.Option(help="DATA's splits whose images are used; never "
                                             "test.")] = "train,val",
    seed: Annotated[int, typer.Option(help="Seed for order, augmentation and new layers.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted pretraining from "
                                              "OUT.partial/.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
    device: Device = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads for PyTorch (default: every "
                                                     "core).")] = None,
    quiet: Quiet = False,
) -> None:
    """Self-supervised pretraining on DATA's own images (labels unused, test never read):
    the backbone's weights, trained further, for `medtl train --weights OUT`.

    Example: [bold]medtl pretrain data/chest_xray --method simclr --from imagenet --epochs 20
    --image-size 128 --out cxr-simclr.safetensors[/bold]
    """
    from medtl.training.pretrain import pretrain as run_pretrain

    # The default names train and val; a DATA without val simply has none to add.
    result = run_pretrain(data, out, method=method, start=start, epochs=epochs,
                          backbone=backbone, image_size=image_size, batch_size=batch_size,
                          lr=lr, splits=None if splits == "train,val" else splits, seed=seed,
                          resume=resume, overwrite=overwrite, device=device, threads=threads,
                          quiet=quiet)
    meta = result.metadata
    out_console.print(f"{meta['method']} on {meta['images']} images ({meta['splits']}), "
                      f"{meta['epochs']} epochs, final loss {result.history[-1]['loss']:.4f}, "
                      f"{meta['wall_s']} s; weights written to {result.path} (use them with "
                      "`medtl train ... --weights` that file)")


@app.command()
def predict(
    run: Annotated[str, typer.Argument(help="Run directory written by `medtl train`, or a "
                                             "bundle written by `medtl export`.")],
    inputs: Annotated[list[str], typer.Argument(help="Image files or folders of images.")],
    output: Annotated[Path | None, typer.Option(help="Write the predictions to this CSV "
                                                     "(default: print them).")] = None,
    tta: TtaOverride = None,
    adapt_bn: Annotated[list[str] | None, typer.Option(
        help="AdaBN before predicting: the model takes the BatchNorm statistics of these "
             "images (files or folders, labels unused), for these predictions only; repeat "
             "for several. A run only (adapt, then export, for a bundle).")] = None,
    device: Device = "auto",
    skip_bad: SkipBad = False,
    paths: PathsOption = "relative",
    quiet: Quiet = False,
) -> None:
    """Predict class probabilities for new images with a saved run.

    Example: [bold]medtl predict runs/cxr scans/*.jpeg --output predictions.csv[/bold]
    """
    from medtl.workflow import predict as run_predict

    rows = run_predict(run, inputs, output=output, device=device, skip_bad=skip_bad,
                       quiet=quiet, paths=paths, tta=tta, adapt_bn=adapt_bn)
    if output:
        out_console.print(f"{len(rows)} predictions written to {output}")
        return
    t = Table()
    for col in rows[0] if rows else ["path"]:
        t.add_column(col)
    for r in rows:
        t.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()))
    out_console.print(t)


@app.command()
def ensemble(
    runs: Annotated[list[str], typer.Argument(help="Run directories written by `medtl train` "
                                                   "on the same data.")],
    out: Annotated[Path, typer.Option(help="Folder to write the ensemble run into.")],
    method: Annotated[str, typer.Option(
        help="mean (of probabilities) | vote (majority; ties by mean probability) | weighted "
             "(weights minimising validation log-loss) | stack (logistic regression).")]
    = "mean",
    folds: Annotated[int, typer.Option(help="Cross-fitting folds on validation (weighted, "
                                            "stack).")] = 5,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it holds a run.")] = False,
    quiet: Quiet = False,
) -> None:
    """Combine finished runs into an ensemble run (metrics with CIs, operating points chosen on
    validation, predictions, report) from their saved predictions; `medtl predict` and
    `medtl evaluate` take it like any run.

    Example: [bold]medtl ensemble runs/cxr-a runs/cxr-b --method weighted --out runs/cxr-ens[/bold]
    """
    from medtl.ensembles import ensemble as run_ensemble

    run = run_ensemble(runs, method=method, out=out, overwrite=overwrite, folds=folds,
                       quiet=quiet)
    out_console.print(_metrics_table(f"ensemble {run.path} ({method})",
                                     {s: run.metrics[s] for s in ("val", "test")
                                      if s in run.metrics}))


@app.command()
def export(
    run: Annotated[str, typer.Argument(help="Run directory written by `medtl train` or "
                                             "`medtl ensemble` (ONNX only: a bundle per "
                                             "member and their combiner).")],
    out: Annotated[Path, typer.Option(help="New folder to write the bundle into.")],
    format: Annotated[str, typer.Option(help="Model format: onnx (every run; predicts without "
                                             "PyTorch) or torchscript (model.pt; torch "
                                             "models only, needs PyTorch).")] = "onnx",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Write a deployable bundle of a run: model.onnx or model.pt (normalised pixels to
    calibrated probabilities), preprocessing.json, the model card (model-card.md and .json) and
    manifest.json; `medtl predict BUNDLE` runs it.

    Example: [bold]medtl export runs/cxr --format onnx --out deploy/cxr[/bold]
    """
    from medtl.export.writer import export_run
    from medtl.run import load_run

    path = export_run(load_run(run), out, format=format, overwrite=overwrite)
    out_console.print(f"bundle written to {path}")


@app.command()
def serve(
    source: Annotated[str, typer.Argument(help="Bundle written by `medtl export`, or a run "
                                                "directory (exported to a temporary folder; "
                                                "Grad-CAM for /v1/explain; occlusion for an "
                                                "ensemble run or a bundle).")],
    host: Annotated[str, typer.Option(help="Address to bind; any but loopback needs a "
                                           "token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token: Annotated[str | None, typer.Option(
        help="Bearer token every /v1/ request must send (default: $MEDTL_SERVE_TOKEN; prefer "
             "the variable: a command line is visible to the machine's other users).")] = None,
    batch_size: Annotated[int, typer.Option(help="Most images in one model call.")] = 32,
    batch_wait_ms: Annotated[float, typer.Option(
        help="How long the first image of a batch waits for others.")] = 5.0,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request accepted (413 "
                                                      "beyond).")] = 64.0,
    max_pixels: Annotated[int, typer.Option(help="Most pixels an image may have (422 beyond, "
                                                 "judged before decoding).")] = 50_000_000,
    cors_origin: Annotated[list[str] | None, typer.Option(
        help="Allow this browser origin (repeatable); CORS is off otherwise.")] = None,
) -> None:
    """Serve a model over HTTP: the API (/v1/predict, /v1/explain, /docs) and a web page at /.

    Example: [bold]medtl serve deploy/cxr --port 8000[/bold]
    """
    from medtl.serving.server import serve as run_server

    run_server(source, host=host, port=port, token=token, batch_size=batch_size,
               batch_wait_ms=batch_wait_ms, max_upload_mb=max_upload_mb, max_pixels=max_pixels,
               cors_origins=cors_origin)


@app.command()
def explain(
    run: Annotated[str, typer.Argument(help="Run directory written by `medtl train`, or by "
                                             "`medtl ensemble` (the mean of its members' "
                                             "maps).")],
    inputs: Annotated[list[str], typer.Argument(help="Image files or folders of images.")],
    out: Annotated[Path, typer.Option(help="Folder for the overlays (PNG), raw maps (.npy) "
                                           "and explanations.csv.")] = Path("explanations"),
    method: Annotated[str, typer.Option(help="gradcam | gradcam++ | scorecam | occlusion | "
                                             "integrated-gradients.")] = "gradcam",
    target: Annotated[str, typer.Option(help="Class whose evidence is mapped: 'predicted' or "
                                             "a class name.")] = "predicted",
    sanity_check: Annotated[bool, typer.Option(
        "--sanity-check", help="Also re-map up to 16 images with the backbone's weights "
                               "randomised (Adebayo et al. 2018) and report the rank "
                               "correlation: low means the maps depend on what was learned."
    )] = False,
    device: Device = "auto",
    skip_bad: SkipBad = False,
    paths: PathsOption = "relative",
    quiet: Quiet = False,
) -> None:
    """Show where a run's model looks: an overlay PNG and the raw map (.npy) per image.

    Hybrid runs with an SVM, random forest or kNN head have no gradient: every method falls
    back to occlusion there, and says so.

    Example: [bold]medtl explain runs/cxr scans/*.jpeg --method gradcam --out cxr-maps[/bold]
    """
    from medtl.workflow import explain as run_explain

    result = run_explain(run, inputs, out=out, method=method, target=target, device=device,
                         sanity_check=sanity_check, skip_bad=skip_bad, quiet=quiet,
                         paths=paths)
    t = Table(title=f"{result['method']} maps in {out}")
    for col in ("overlay", "target", "prediction", "probability_target"):
        t.add_column(col)
    for r in result["rows"]:
        if "overlay" in r:
            t.add_row(r["overlay"], r["target"], r["prediction"], f"{r['probability_target']:.3f}")
    out_console.print(t)
    s = result["sanity"]
    if s is not None:
        verdict = (Text("the maps depend on the learned weights") if s["passed"] else
                   Text("the maps barely change: they do not explain this model",
                        style="bold red"))
        empty = (f", {s['empty_randomised_maps']} of them empty after randomisation (median "
                 f"of the others {s['median_spearman_nonempty']:.2f})"
                 if s["empty_randomised_maps"] and s["median_spearman_nonempty"] is not None
                 else "")
        out_console.print(f"model randomisation check: median Spearman {s['median_spearman']:.2f} "
                          f"over {s['n']} images{empty} (below {s['threshold']}: pass); ",
                          verdict, sep="")


RankBy = Annotated[str, typer.Option(
    help="Figure the runs are ranked and the best chosen on, read on validation (a "
         "cross-validated run's mean over folds), never on test: auc | accuracy | "
         "balanced_accuracy | sensitivity | specificity | f1.")]


@app.command()
def bench(
    data: Annotated[str, typer.Argument(help="Class folder, CSV manifest or MedMNIST .npz.")],
    backbones: Annotated[str, typer.Option(help="Comma-separated backbone names.")]
    = "mobilenet_v2,efficientnet_lite0",
    strategies: Annotated[str, typer.Option(help="Comma-separated strategies; hybrid heads "
                                                 "as hybrid:svm.")]
    = "feature-extractor,hybrid:logreg,fine-tune,full",
    seeds: Annotated[int, typer.Option(help="Seeds per cell (0..N-1).")] = 1,
    jobs: Annotated[int, typer.Option(help="Cells run in this many processes.")] = 1,
    ray: Annotated[str | None, typer.Option(help="Run cells as Ray tasks on the cluster at "
                                                 "this address ('local': a Ray on this "
                                                 "machine); needs a shared file system.")]
    = None,
    out: Annotated[Path, typer.Option(help="Bench directory (cells, leaderboard.csv, "
                                           "report.html).")] = Path("runs/bench"),
    image_size: Annotated[int | None, typer.Option(help="Input side in pixels for every "
                                                        "cell.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs for every cell.")] = None,
    folds: Annotated[int | None, typer.Option(help="Cross-validate every cell with K "
                                                   "patient-grouped folds.")] = None,
    patient_regex: PatientRegex = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads per cell (default: the cores "
                                                     "divided among --jobs).")] = None,
    rank_by: RankBy = "auc",
    ensemble: Annotated[int | None, typer.Option(
        help="Also rank the ensemble of the K cells best on validation (medtl ensemble).")]
    = None,
    ensemble_method: Annotated[str, typer.Option(help="mean | vote | weighted | stack.")]
    = "mean",
    labels: LabelColumns = None,
    uncertain: Uncertain = "ignore",
    blank: Blank = "unknown",
    quiet: Quiet = False,
) -> None:
    """Run backbones x strategies (x seeds): one run directory per cell, a leaderboard and a
    report. Rerun the same command after an interruption: finished cells are kept. The best
    cell is chosen on validation (--rank-by), and its test figures are shown.

    Example: [bold]medtl bench data/cxr --backbones mobilenet_v2,efficientnet_lite0
    --strategies feature-extractor,hybrid:svm,full --seeds 3 --out runs/bench[/bold]
    """
    from medtl.bench import bench as run_bench

    path = run_bench(data, backbones=[b for b in backbones.split(",") if b],
                     strategies=[s for s in strategies.split(",") if s], seeds=seeds,
                     jobs=jobs, ray=ray, out=out, image_size=image_size, epochs=epochs,
                     patient_regex=patient_regex, folds=folds, threads=threads,
                     rank_by=rank_by, ensemble=ensemble, ensemble_method=ensemble_method,
                     quiet=quiet, **_load_options(labels, uncertain, blank))
    _print_leaderboard(path, data, rank_by)


@app.command()
def curve(
    data: Annotated[str, typer.Argument(help="Class folder, CSV manifest or MedMNIST .npz "
                                             "with a test split.")],
    sizes: Annotated[str, typer.Option(help="Labelled images per class (train + val), "
                                            "comma-separated; 'all' for the whole pool.")]
    = "10,25,50,100,all",
    strategies: Annotated[str, typer.Option(help="Comma-separated strategies; hybrid heads as "
                                                 "hybrid:logreg, the few-shot baseline as "
                                                 "hybrid:prototype.")]
    = "feature-extractor,hybrid:logreg,hybrid:prototype,fine-tune,full",
    repeats: Annotated[int, typer.Option(help="Draws of the labelled subset per budget (seeds "
                                              "SEED..SEED+R-1).")] = 3,
    out: Annotated[Path, typer.Option(help="Curve directory (cells, curve.csv, summary.csv, "
                                           "crossings.csv, report.html).")] = Path("runs/curve"),
    backbone: Annotated[str, typer.Option(help="Backbone name (see `medtl models`).")]
    = "mobilenet_v2",
    image_size: Annotated[int | None, typer.Option(help="Input side in pixels for every "
                                                        "cell.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs of the strategies that "
                                                    "train the network (frozen heads keep "
                                                    "their own).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of each drawn subset (by patient) "
                                                     "that validates.")] = 0.2,
    patient_regex: PatientRegex = None,
    positive_class: Annotated[str | None, typer.Option(help="Binary: the class AUC and "
                                                            "sensitivity refer to.")] = None,
    seed: Annotated[int, typer.Option(help="First repeat's seed.")] = 0,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    quiet: Quiet = False,
) -> None:
    """Learning curves: test AUC against labelled images per class for each strategy, with a
    95 % interval over repeated draws (by patient), and where one strategy overtakes another.
    Rerun the same command after an interruption: finished cells are kept.

    Example: [bold]medtl curve data/cxr --sizes 10,25,50,100,all --strategies
    feature-extractor,hybrid:prototype,fine-tune --repeats 3 --image-size 64 --out runs/curve[/bold]
    """
    from medtl.curve import curve as run_curve

    options = {k: v for k, v in (("image_size", image_size), ("threads", threads))
               if v is not None}
    path = run_curve(data, out=out, sizes=sizes, strategies=[s for s in strategies.split(",")
                                                              if s],
                     repeats=repeats, seed=seed, val_fraction=val_fraction,
                     patient_regex=patient_regex, positive_class=positive_class, quiet=quiet,
                     epochs=epochs, backbone=backbone, **options)
    _print_curve(path, data)


def _print_curve(path: Path, data: str) -> None:
    import csv

    with open(path / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    t = Table(title=f"medtl curve {data}: mean test AUC (95% interval over repeats)")
    t.add_column("strategy")
    for n in sizes:
        t.add_column(f"{n} per class", justify="right")
    for s in dict.fromkeys(r["strategy"] for r in rows):
        cells = {r["size"]: r for r in rows if r["strategy"] == s}
        t.add_row(s, *(_num(cells[n]["test_auc_mean"]) + (
            f" ({_num(cells[n]['test_auc_ci95_low'])}-{_num(cells[n]['test_auc_ci95_high'])})"
            if cells[n]["test_auc_ci95_low"] not in ("", "None") else "")
            if n in cells else "–" for n in sizes))
    out_console.print(t)
    with open(path / "crossings.csv", newline="") as f:
        for c in csv.DictReader(f):
            out_console.print(f"{c['overtakes']} overtakes {c['overtaken']} between "
                              f"{c['from_size']} and {c['at_size']} per class "
                              f"(paired difference {float(c['auc_difference']):+.3f})",
                              markup=False)
    out_console.print(f"curves: {path / 'summary.csv'}  report: {path / 'report.html'}")


def _print_leaderboard(path: Path, data: str, rank_by: str) -> None:
    """The bench's leaderboard.csv as a table, saying what the chosen cell was chosen on."""
    import csv

    with open(path / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    metric = "AUC" if rank_by == "auc" else rank_by.replace("_", " ")
    shown = rows[0]["shown"] if rows else "test"
    extra = rank_by not in ("auc", "accuracy")
    t = Table(title=f"medtl bench {data}")
    for col in ("cell", f"val {metric}", f"{shown} AUC", f"{shown} accuracy",
                *([f"{shown} {metric}"] if extra else []), "trainable", "train s"):
        t.add_column(col, justify="left" if col == "cell" else "right")
    for r in rows:
        val = (_num(r["val_value"]) if r["val_value"] not in ("", "None")
               else f"– ({r['val_source']}: cannot be chosen)")
        t.add_row(r["cell"] + (" (chosen)" if r["chosen"] == "yes" else ""), val,
                  _num(r["auc"]), _num(r["accuracy"]), *([_num(r[rank_by])] if extra else []),
                  r["trainable_params"], _num(r["train_s"], 1))
    out_console.print(t)
    if rows and rows[0]["chosen"] == "yes":
        out_console.print(f"chosen on validation {metric}; {shown} shown for the chosen run: "
                          f"{rows[0]['cell']}", markup=False, soft_wrap=True)
    else:
        out_console.print("no cell has validation figures: none chosen", markup=False)
    out_console.print(f"leaderboard: {path / 'leaderboard.csv'}  report: {path / 'report.html'}")


def _num(text: str, digits: int = 3) -> str:
    return "–" if text in ("", "None") else f"{float(text):.{digits}f}"


@app.command()
def recommend(
    data: Annotated[str, typer.Argument(help="Class folder, CSV manifest or MedMNIST .npz.")],
    patient_regex: PatientRegex = None,
    modality: Annotated[str | None, typer.Option(help="What the images are (e.g. X-ray, CT, "
                                                      "dermoscopy), when not DICOM.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """A starting configuration and a short grid for DATA, each with its reason from the
    reviews (Kim et al. 2022; Morid et al. 2021 as a hypothesis).

    Example: [bold]medtl recommend data/chest_xray --patient-regex '(person\\d+|IM-\\d+)'
    --modality X-ray[/bold]
    """
    from medtl.data import load_dataset
    from medtl.transfer.recommend import dataset_stats, format_options
    from medtl.transfer.recommend import recommend as advise

    stats = dataset_stats(load_dataset(data, patient_regex=patient_regex, val_fraction=0))
    if modality:
        stats.modality = modality
    rec = advise(stats)
    if as_json:
        print(json.dumps(rec.to_dict(), indent=2))
        return
    out_console.print(f"{stats.n_images} images, classes {stats.per_class}, patients "
                      f"{stats.n_patients or 'unknown'}, median side {stats.median_side} px, "
                      f"modality {stats.modality or 'unknown'}")
    out_console.print(Text("\nstart:", style="bold"), f"medtl train {data} "
                      f"{format_options(rec.start.options)}", soft_wrap=True)
    out_console.print(f"  why: {rec.start.reason}", soft_wrap=True)
    out_console.print(Text("\nthen compare:", style="bold"))
    for a in rec.grid:
        out_console.print(f"  {format_options(a.options)}\n    why: {a.reason}", soft_wrap=True)
    for note in rec.notes:
        out_console.print(f"note: {note}", soft_wrap=True)


@app.command()
def report(
    runs: Annotated[list[str], typer.Argument(help="Run directories written by `medtl "
                                                   "train`.")],
    out: Annotated[Path, typer.Option(help="HTML file to write.")] = Path("report.html"),
    split: Annotated[str, typer.Option(help="Split whose figures are compared.")] = "test",
    rank_by: RankBy = "auc",
) -> None:
    """Compare runs in one self-contained HTML page: runs ranked and the best chosen on
    validation (--rank-by), test figures with 95% CIs shown, DeLong's and McNemar's paired
    tests against the chosen run, ROC curves and AUC against training time.

    Example: [bold]medtl report runs/cxr-* --out cxr-report.html --rank-by accuracy[/bold]
    """
    from medtl.workflow import report as run_report

    path = run_report(runs, out, split=split, rank_by=rank_by)
    metric = "AUC" if rank_by == "auc" else rank_by.replace("_", " ")
    out_console.print(f"report written to {path}: runs ranked and chosen on validation "
                      f"{metric} (a run without validation figures cannot be chosen); {split} "
                      "shown", markup=False, soft_wrap=True)


_USER_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                          getattr(errno, "EDQUOT", errno.ENOSPC), errno.ENAMETOOLONG,
                          errno.ENOTDIR, errno.EISDIR, errno.ELOOP,
                          errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY})


def _print_error(message: str) -> None:
    """``error: message`` on stderr, one line. The message names the user's files and patterns:
    printed as text, never as markup (a regex like '[/_](P\\d+)' or a file 'scan[left].png'
    would be eaten or crash rich), without control characters that could steer the terminal
    (a newline would split the line, a tab become spaces), and with the bytes of a file name that
    are not UTF-8 written \\xNN."""
    rank = os.environ.get("RANK", "0")  # a DDP process other than rank 0 says which it is
    prefix = "" if rank == "0" else f"(process {printable(rank)}) "
    console.print(Text.assemble(("error:", "bold red"), " ", prefix + printable(message)),
                  highlight=False, soft_wrap=True)


_ARGV: list[str] = []  # the command line main() runs, for train --devices to pass on


@app.command()
def federate(
    sites: Annotated[list[str] | None, typer.Argument(
        help="Each site's DATA (a folder or manifest with its own splits), at least two; or "
             "one manifest with a site column. None with --superlink.")] = None,
    strategy: Annotated[str, typer.Option(help="feature-extractor (a linear head on frozen "
                                               "features) | fine-tune (the top --unfreeze "
                                               "blocks and the head).")]
    = "feature-extractor",
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 20,
    local_epochs: Annotated[int | None, typer.Option(help="Epochs each site trains per round "
                                                          "(default 5 for feature-extractor, "
                                                          "1 for fine-tune).")] = None,
    algorithm: Annotated[str, typer.Option(help="fedavg | fedprox.")] = "fedavg",
    mu: Annotated[float | None, typer.Option(help="FedProx's proximal weight (default "
                                                  "0.01).")] = None,
    min_sites: Annotated[int | None, typer.Option(help="Fewest sites a round needs; a round "
                                                       "with fewer answers stops the "
                                                       "federation (default: every site).")]
    = None,
    round_timeout: Annotated[float, typer.Option(help="Seconds a round waits for its "
                                                      "sites.")] = 3600.0,
    dp_epsilon: Annotated[float | None, typer.Option(help="feature-extractor: differential "
                                                          "privacy of each site's records "
                                                          "(DP-SGD, Opacus) at this epsilon "
                                                          "over all rounds.")] = None,
    dp_delta: Annotated[float, typer.Option(help="DP's delta.")] = 1e-5,
    dp_clip: Annotated[float, typer.Option(help="DP-SGD's per-example gradient norm "
                                                "bound.")] = 1.0,
    baselines: Annotated[bool, typer.Option("--baselines", help="Also train each site alone "
                                            "and the pooled data by the same recipe "
                                            "(runs in OUT/baselines).")] = False,
    backbone: Annotated[str, typer.Option(help="Backbone name (see `medtl models`).")]
    = "mobilenet_v2",
    weights: Annotated[str, typer.Option(help="imagenet | random | a weights file.")]
    = "imagenet",
    image_size: Annotated[int | None, typer.Option(help="Input side in pixels (default: the "
                                                        "backbone's).")] = None,
    unfreeze: Annotated[int | None, typer.Option(help="fine-tune: top blocks that train "
                                                      "(default 1).")] = None,
    lr: Annotated[float, typer.Option(help="Learning rate of the head.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Images (or feature vectors) per "
                                                 "batch.")] = 64,
    class_weight: Annotated[str, typer.Option(help="auto | balanced | none, at each "
                                                   "site.")] = "auto",
    augment: Annotated[str, typer.Option(help="fine-tune: none | basic | strong.")] = "basic",
    hflip: Annotated[bool, typer.Option("--hflip/--no-hflip", help="fine-tune: horizontal "
                                        "flips in augmentation.")] = True,
    target_sensitivity: Annotated[float, typer.Option(help="Binary: the second operating "
                                                          "point, chosen on the pooled "
                                                          "val.")] = 0.9,
    positive_class: Annotated[str | None, typer.Option(help="Binary: the positive class.")]
    = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/federated-"
                                                  "BACKBONE-STRATEGY).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for splits and training.")] = 0,
    device: Device = "auto",
    patient_regex: PatientRegex = None,
    val_fraction: Annotated[float, typer.Option(help="Share of each site's train carved as "
                                                     "validation when it has no val "
                                                     "split.")] = 0.2,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Read and write the "
                                        "frozen-feature cache.")] = True,
    engine: Annotated[str, typer.Option(help="Frozen features: auto (ONNX Runtime on CPU) | "
                                             "onnx | torch.")] = "auto",
    superlink: Annotated[str | None, typer.Option(
        help="HOST:PORT of a running Flower SuperLink on this machine: train across the "
             "hospitals' SuperNodes instead of simulating (docs/federated.md).")] = None,
    classes: Annotated[str | None, typer.Option(help="--superlink: the class names every "
                                                     "site labels, comma-separated.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="--superlink without TLS (one "
                                           "machine or a private network only).")] = False,
    root_certificates: Annotated[str | None, typer.Option(
        help="--superlink: the CA certificate (PEM) the SuperLink's TLS certificate is "
             "signed by.")] = None,
    paths: PathsOption = "relative",
    quiet: Quiet = False,
) -> None:
    """Train one model across sites with Flower, each site's images staying where they are.

    Simulation on this machine: one virtual Flower client per SITE. Only the shared
    parameters and counts pass between the sites and the server (docs/federated.md; across
    hospitals see `medtl federate-site` and --superlink there).

    Example: [bold]medtl federate sites/a.csv sites/b.csv sites/c.csv --rounds 20
    --baselines --out runs/fed[/bold]
    """
    from medtl.federated.job import federate as run_federate
    from medtl.training.options import TrainOptions

    options = TrainOptions.from_mapping(locals())
    run = run_federate(sites or [], options, rounds=rounds, local_epochs=local_epochs,
                       algorithm=algorithm, mu=mu, min_sites=min_sites, dp_epsilon=dp_epsilon,
                       dp_delta=dp_delta, dp_clip=dp_clip, baselines=baselines, out=out,
                       overwrite=overwrite, patient_regex=patient_regex,
                       val_fraction=val_fraction, positive_class=positive_class,
                       target_sensitivity=target_sensitivity, paths=paths,
                       round_timeout=round_timeout, superlink=superlink,
                       classes=classes.split(",") if classes else None, insecure=insecure,
                       root_certificates=root_certificates)
    if superlink is None:
        out_console.print(_metrics_table(f"federated {backbone} / {strategy}", run.metrics))
        _print_federation(run)
    else:
        fed = run.metrics["federation"]
        out_console.print(f"{fed['rounds_done']} rounds across the SuperNodes of {superlink}; "
                          f"each site scores the model with `medtl evaluate {run.path} DATA`")
    out_console.print(f"run written to {run.path}")


@app.command("federate-site")
def federate_site(
    data: Annotated[str, typer.Argument(help="This site's DATA (with train and val splits, "
                                             "and test to score the model here).")],
    superlink: Annotated[str, typer.Option(help="HOST:PORT of the coordinator's SuperLink "
                                                "(the port given to flower-superlink --port; "
                                                "Flower's default 8000).")],
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS (one machine or a "
                                           "private network only).")] = False,
    root_certificates: Annotated[str | None, typer.Option(
        help="The CA certificate (PEM) of the SuperLink's TLS certificate.")] = None,
    port: Annotated[int | None, typer.Option(help="This SuperNode's own local port (Flower's "
                                                  "default 9094).")] = None,
    patient_regex: PatientRegex = None,
    val_fraction: Annotated[float, typer.Option(help="Share of train carved as validation "
                                                     "when DATA has no val split.")] = 0.2,
    weights: Annotated[str | None, typer.Option(help="A weights file of this site's own, when "
                                                     "the federation trains from one (the "
                                                     "server can only ask for imagenet or "
                                                     "random).")] = None,
) -> None:
    """Serve this hospital's data to a federation: a Flower SuperNode that trains medtl's model
    here each round. Only the model's shared parameters and counts leave this machine.

    Example: [bold]medtl federate-site /data/cxr.csv --superlink coordinator.example.org:9092
    --root-certificates ca.pem[/bold]
    """
    from medtl.federated.deploy import run_site

    run_site(data, superlink, insecure=insecure, root_certificates=root_certificates,
             port=port, patient_regex=patient_regex, val_fraction=val_fraction, weights=weights)


def _print_federation(run) -> None:
    """Each site's test AUC, and the baselines beside the federated model."""
    from medtl.federated.job import compare

    table = Table(title="pooled test AUC (95 % CI)")
    for column in ("model", "AUC", "95 % CI", "n"):
        table.add_column(column)
    for row in compare(Path(run.path)):
        ci = row["auc_ci95"]
        table.add_row(row["model"], _fmt(row["auc"]),
                      f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "-", str(row["n"] or "-"))
    out_console.print(table)
    for name, figures in run.metrics.get("sites", {}).items():
        m = figures["test"]
        out_console.print(f"site {name} test: AUC {_fmt(m.get('auc'))} (n={m.get('n')})")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; a MedtlError becomes one line on stderr and exit code 2."""
    _ARGV[:] = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=argv, standalone_mode=True)
    except MedtlError as exc:
        _print_error(str(exc))
        sys.exit(2)
    except OSError as exc:
        # The file system refused (permission denied, read-only, full disk, a name too long):
        # the user's to fix, so one line naming the path, as for a MedtlError. Anything else
        # (a broken pipe, an I/O error of a device) keeps its traceback.
        if exc.errno not in _USER_ERRNOS:
            raise
        where = "".join(f"{f}: " for f in (exc.filename, exc.filename2) if f is not None)
        _print_error(f"{where}{exc.strerror or exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        # Only fitting writes the feature cache (a loaded run never does: docs/decisions.md).
        console.print("interrupted: feature batches a training finished stay in the cache")
        sys.exit(130)


if __name__ == "__main__":
    main()
