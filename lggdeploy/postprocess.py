"""Post-processing of a patient's predicted volume: 3-D components removed by size, then by the model's confidence.

A low-grade glioma is one lesion: in every one of the 34 shared patients the largest 3-D connected component holds at
least 97 % of the tumor voxels, and the smallest tumor has 2,057 voxels. The model's false positives, in contrast,
are blobs apart from the tumor: many small ones scattered through tumor-free slices, and in some patients a few large
ones. So the rule removes every 6-connected 3-D component smaller than `min_component_voxels` or smaller than
`min_fraction_of_largest` times the patient's largest component, but never the largest one (a patient whose only
prediction is small keeps it); then, of the components left, every one whose mean foreground probability is under
`min_mean_probability`, but never the most confident one. The large false positives are as confident as the tumor at
their peak but not on average (benchmarks/results/component-confidence-zen4/), so the second step removes a false
positive that outgrows a small tumor — the case where keeping the largest component deletes the tumor.

What training stores (`tune`) is decided on the val patients in two steps, neither tuned to the test patients: the
absolute size, half the smallest tumor (in voxels at 256x256) among its *train* patients — a component that small is
unlike any whole tumor the model learned — then the mean-probability floor `CONFIDENCE_FLOOR` on top; each is kept
only if it does not lower the val patients' mean per-patient Dice and leaves no val patient missed that was found
before it (nnU-Net's habit: post-processing is kept only where validation says it does not hurt). The rule and the
evidence are stored in the checkpoint (`postprocess`, `postprocess_tuning`) and travel, like the threshold, into
eval, the engines' manifests, bench, the bundle and the edge runtime, which hand `apply` the probabilities the masks
were thresholded from.

The relative part (`min_fraction_of_largest`, e.g. 0.5: "1034,0.5" on the command line) and keeping only the largest
component (the special value `LARGEST`, "largest"; Buda et al.) score higher on most runs but are not what training
stores: when the model's largest component is a false positive they delete the tumor the model found, and the val
patients did not warn where it happened (benchmarks/results/postprocess/: the two-part rule lost a test patient in 1
of 11 runs, largest-only in 3, the size alone in none).

A third step may follow (`outline`, lggdeploy/outline.py): a dense CRF redraws the outline of each kept mask on the
slice's own edges, within 8 px of it. It needs the slices themselves (`images`) and every pixel's probability, and
`pydensecrf2` (the `outline` extra). Training's `auto` judges it like the other steps, on the val patients.

numpy only: the runtime imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from lggdeploy.metrics import confusion_counts, summarize
from lggdeploy.outline import OutlineCRF

LARGEST = -1  # min_component_voxels value meaning "keep only the largest component"
SIZE_FRACTION = 0.5  # the absolute size is this fraction of the smallest train tumor
CONFIDENCE_FLOOR = 0.9  # training's second candidate: components of lower mean foreground probability removed
JSON_KEYS = ("min_component_voxels", "min_fraction_of_largest", "min_mean_probability", "outline")
OUTLINE_SUFFIX = "+crf"  # command-line form of the outline step


@dataclass(frozen=True)
class PostProcess:
    """Remove 3-D components smaller than `min_component_voxels` or than `min_fraction_of_largest` x the largest
    component (never the largest); then, of the components left, those whose mean foreground probability is under
    `min_mean_probability` (never the most confident one); then, with `outline`, the kept masks' outlines redrawn
    (outline.py). All 0 and no outline: off; LARGEST: keep only the largest component."""

    min_component_voxels: int = 0
    min_fraction_of_largest: float = 0.0
    min_mean_probability: float = 0.0
    outline: OutlineCRF | None = None

    def __post_init__(self):
        if not (self.min_component_voxels >= 0 or self.min_component_voxels == LARGEST):
            raise ValueError(
                f"min_component_voxels must be >= 0 (or {LARGEST}: largest only), got {self.min_component_voxels}"
            )
        if not 0.0 <= self.min_fraction_of_largest <= 1.0:
            raise ValueError(f"min_fraction_of_largest must be between 0 and 1, got {self.min_fraction_of_largest}")
        if not 0.0 <= self.min_mean_probability < 1.0:
            raise ValueError(f"min_mean_probability must be in [0, 1), got {self.min_mean_probability}")
        if self.min_component_voxels == LARGEST and (
            self.min_fraction_of_largest or self.min_mean_probability or self.outline is not None
        ):
            raise ValueError("largest-only post-processing takes no fraction, no probability floor and no outline step")

    @property
    def active(self) -> bool:
        return self.removes_components or self.outline is not None

    @property
    def removes_components(self) -> bool:
        """Whether the size or confidence step is on."""
        return self.min_component_voxels != 0 or self.min_fraction_of_largest > 0 or self.min_mean_probability > 0

    @property
    def needs_probabilities(self) -> bool:
        """Whether `apply` needs the foreground probabilities beside the masks."""
        return self.min_mean_probability > 0 or self.outline is not None

    @property
    def needs_images(self) -> bool:
        """Whether `apply` needs the slices beside the masks, and every pixel's probability (not only the masks'):
        the outline step."""
        return self.outline is not None

    def apply(
        self, volume: np.ndarray, probabilities: np.ndarray | None = None, images: np.ndarray | None = None
    ) -> np.ndarray:
        """The post-processed copy of one patient's (slices, H, W) bool mask volume; `probabilities` (the same shape:
        the foreground probabilities the masks were thresholded from) are required when `needs_probabilities`, and
        `images` (the (slices, H, W, 3) uint8 slices) when `needs_images`."""
        volume = np.asarray(volume, bool)
        if not self.active or not volume.any():
            return volume.copy()
        if self.needs_probabilities and (probabilities is None or np.shape(probabilities) != volume.shape):
            raise ValueError(
                f"post-processing by probability needs the probabilities of the volume {volume.shape}, got "
                f"{None if probabilities is None else np.shape(probabilities)}"
            )
        if self.needs_images and (images is None or np.shape(images)[:3] != volume.shape):
            raise ValueError(
                f"redrawing outlines needs the slices of the volume {volume.shape}, got "
                f"{None if images is None else np.shape(images)}"
            )
        kept = self._components(volume, probabilities)
        return self.outline.redraw(kept, probabilities, images) if self.outline is not None else kept

    def _components(self, volume: np.ndarray, probabilities: np.ndarray | None) -> np.ndarray:
        """The size and confidence steps."""
        if not self.removes_components:
            return volume.copy()
        labels, ids, sizes = connected_components(volume)
        if self.min_component_voxels == LARGEST:
            keep = ids[[int(np.argmax(sizes))]]
        else:
            floor = max(self.min_component_voxels, self.min_fraction_of_largest * sizes.max())
            kept = (sizes >= floor) | (sizes == sizes.max())
            if self.min_mean_probability > 0:
                sums = np.bincount(labels[volume], np.asarray(probabilities)[volume].astype(np.float64))
                confidence = sums[ids] / sizes
                confident = confidence >= self.min_mean_probability
                confident |= confidence == confidence[kept].max()
                kept &= confident
            keep = ids[kept]
        return np.isin(labels, keep)

    def apply_per_patient(
        self,
        masks: np.ndarray,
        patients: np.ndarray,
        probabilities: np.ndarray | None = None,
        images: np.ndarray | None = None,
    ) -> np.ndarray:
        """`apply` to each patient's slices of a stack (slices of one patient need not be contiguous)."""
        if not self.active:
            return np.asarray(masks, bool)
        out = np.array(masks, bool, copy=True)
        patients = np.asarray(patients)
        for pid in dict.fromkeys(patients.tolist()):
            sel = patients == pid
            out[sel] = self.apply(
                out[sel], None if probabilities is None else probabilities[sel], None if images is None else images[sel]
            )
        return out

    def describe(self) -> str:
        if not self.active:
            return "none"
        if self.min_component_voxels == LARGEST:
            return "largest 3-D component only"
        parts = [f"{self.min_component_voxels} voxels"] if self.min_component_voxels else []
        parts += [f"{self.min_fraction_of_largest:g} x the largest"] if self.min_fraction_of_largest else []
        text = f"3-D components < {' or < '.join(parts)} removed (largest kept)" if parts else ""
        if self.min_mean_probability > 0:
            floor = f"components of mean probability < {self.min_mean_probability:g} removed (the most confident kept)"
            text = f"{text}; then {floor}" if text else floor
        if self.outline is not None:
            text = f"{text}; then {self.outline.describe()}" if text else self.outline.describe()
        return text

    def to_json(self) -> dict:
        """{"min_component_voxels": N} (+ "min_fraction_of_largest", "min_mean_probability", "outline" when set, so
        rules without them read as before)."""
        out = {"min_component_voxels": int(self.min_component_voxels)}
        if self.min_fraction_of_largest:
            out["min_fraction_of_largest"] = float(self.min_fraction_of_largest)
        if self.min_mean_probability:
            out["min_mean_probability"] = float(self.min_mean_probability)
        if self.outline is not None:
            out["outline"] = self.outline.to_json()
        return out

    @classmethod
    def from_json(cls, obj: dict | None) -> PostProcess:
        """None (a checkpoint or manifest from before post-processing existed) means none. A key this lggdeploy does
        not know is refused (a rule written by a newer one must not run as a different rule)."""
        if obj is None:
            return cls()
        unknown = sorted(set(obj) - set(JSON_KEYS))
        if unknown:
            raise ValueError(f"unknown post-processing field(s) {', '.join(unknown)}: written by a newer lggdeploy?")
        return cls(
            int(obj["min_component_voxels"]),
            float(obj.get("min_fraction_of_largest", 0.0)),
            float(obj.get("min_mean_probability", 0.0)),
            OutlineCRF.from_json(obj["outline"]) if obj.get("outline") is not None else None,
        )

    @classmethod
    def parse(cls, text: str) -> PostProcess:
        """Command-line form: none, largest, N (components under N voxels removed), N,F (under N voxels or under F x
        the largest component removed; e.g. 1034,0.5 or 0,0.5) or N,F,Q (then the components of mean foreground
        probability under Q removed, the most confident kept; e.g. 1034,0,0.9); any of them but largest followed by
        +crf: then the outlines redrawn (outline.py; e.g. 1034,0,0.9+crf, none+crf)."""
        text = text.strip().lower()
        if text.endswith(OUTLINE_SUFFIX):
            base = cls.parse(text.removesuffix(OUTLINE_SUFFIX))
            if base.min_component_voxels == LARGEST:
                raise ValueError(f"largest-only post-processing takes no {OUTLINE_SUFFIX}")
            return replace(base, outline=OutlineCRF())
        if text == "none":
            return cls()
        if text == "largest":
            return cls(LARGEST)
        fields = text.split(",")
        try:
            if len(fields) > 3:
                raise ValueError
            value = int(fields[0])
            share, floor = (float(f) if f else 0.0 for f in [*fields[1:], "", ""][:2])
        except ValueError:
            raise ValueError(
                "post-processing must be none, largest, N, N,F or N,F,Q (N voxels, F a fraction of the largest "
                f"component, Q a mean probability), each but largest optionally followed by +crf, got {text!r}"
            ) from None
        if value < 0:
            raise ValueError(f"a minimum component size must be >= 0 voxels, got {value}")
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"the fraction of the largest component must be between 0 and 1, got {share:g}")
        if not 0.0 <= floor < 1.0:
            raise ValueError(f"the mean-probability floor must be in [0, 1), got {floor:g}")
        return cls(value, share, floor)


def connected_components(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """6-connected components of a bool volume: (labels, component ids, their sizes in voxels); labels are 0 off
    the foreground. Union-find on the foreground voxels with vectorized hooking and pointer jumping (each round
    links every edge's two roots, the larger under the smaller, then compresses paths), so the number of rounds
    grows with the log of a component's size, not its length. numpy only."""
    volume = np.asarray(volume, bool)
    index = np.full(volume.shape, -1, np.int64)
    index[volume] = np.arange(int(volume.sum()))
    a_parts, b_parts = [], []
    for axis in range(volume.ndim):
        here = [slice(None)] * volume.ndim
        there = [slice(None)] * volume.ndim
        here[axis], there[axis] = slice(None, -1), slice(1, None)
        both = volume[tuple(here)] & volume[tuple(there)]
        a_parts.append(index[tuple(here)][both])
        b_parts.append(index[tuple(there)][both])
    a, b = np.concatenate(a_parts), np.concatenate(b_parts)
    parent = np.arange(len(index[volume]), dtype=np.int64)
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(ra, rb)[differ], np.minimum(ra, rb)[differ])
        while True:  # pointer jumping until every voxel points at its root
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    labels = np.zeros(volume.shape, np.int64)
    labels[volume] = parent + 1
    ids, sizes = np.unique(parent + 1, return_counts=True)
    return labels, ids, sizes


def smallest_tumor(masks: np.ndarray, patients: np.ndarray) -> int | None:
    """Voxels of the smallest patient tumor among `patients` (None when no patient has a tumor)."""
    patients = np.asarray(patients)
    volumes = [int(masks[patients == pid].sum()) for pid in dict.fromkeys(patients.tolist())]
    volumes = [v for v in volumes if v > 0]
    return min(volumes) if volumes else None


def tune(
    predicted: np.ndarray,
    masks: np.ndarray,
    patients: np.ndarray,
    train_smallest_tumor: int | None,
    fraction: float = SIZE_FRACTION,
    probabilities: np.ndarray | None = None,
    confidence_floor: float = CONFIDENCE_FLOOR,
    images: np.ndarray | None = None,
    outline: OutlineCRF | None = None,
) -> dict:
    """The post-processing to store, decided on the val patients in up to three steps, each kept only if the val
    patients' mean per-patient Dice does not drop and no val patient found before the step is missed after it:

    1. components smaller than `fraction` x the smallest train tumor removed (never the largest);
    2. on top of what step 1 left, components of mean foreground probability under `confidence_floor` removed
       (never the most confident) — only with `probabilities` (the val patients' foreground probabilities, every
       pixel's, the shape of `predicted`) and a floor above 0;
    3. on top of that, the outlines redrawn by `outline` — only with it, `probabilities` and `images` (the val
       slices, (N, H, W, 3) uint8).

    `predicted` are the val masks at the stored threshold (native size); returns the record kept in the checkpoint
    as `postprocess_tuning`: the rule under "postprocess", step 1's judgement at the top level ("kept", "why",
    "val_mean_patient_dice_without"/"_with"), step 2's under "confidence", step 3's under "outline"."""
    record = {
        "fraction_of_smallest_train_tumor": fraction,
        "smallest_train_tumor_voxels": train_smallest_tumor,
        "patients": list(dict.fromkeys(np.asarray(patients).tolist())),
    }
    if not train_smallest_tumor:
        record.update(postprocess=PostProcess().to_json(), kept=False, why="no tumor in the train patients")
        rule = PostProcess()
    else:
        candidate = PostProcess(max(1, int(fraction * train_smallest_tumor)))
        step = judge(candidate, PostProcess(), predicted, masks, patients, probabilities)
        rule = candidate if step["kept"] else PostProcess()
        record.update(
            candidate=candidate.to_json(),
            postprocess=rule.to_json(),
            kept=step["kept"],
            why=step["why"],
            val_mean_patient_dice_without=step["val_mean_patient_dice_before"],
            val_mean_patient_dice_with=step["val_mean_patient_dice_after"],
        )
    if probabilities is not None and confidence_floor > 0:
        candidate = replace(rule, min_mean_probability=confidence_floor)
        step = judge(candidate, rule, predicted, masks, patients, probabilities)
        record["confidence"] = {"candidate": candidate.to_json(), **step}
        if step["kept"]:
            record["postprocess"] = candidate.to_json()
            rule = candidate
    if outline is not None and probabilities is not None and images is not None:
        candidate = replace(rule, outline=outline)
        step = judge(candidate, rule, predicted, masks, patients, probabilities, images)
        record["outline"] = {"candidate": candidate.to_json(), **step}
        if step["kept"]:
            record["postprocess"] = candidate.to_json()
    return record


def tuned_val_dice(record: dict) -> float | None:
    """The val patients' mean per-patient Dice with the rule a `tune` record stores (None when it stores none)."""
    for later in ("outline", "confidence"):
        step = record.get(later) or {}
        if step.get("kept"):
            return step["val_mean_patient_dice_after"]
    return record["val_mean_patient_dice_with"] if record.get("kept") else None


def judge(
    candidate: PostProcess,
    base: PostProcess,
    predicted: np.ndarray,
    masks: np.ndarray,
    patients: np.ndarray,
    probabilities: np.ndarray | None,
    images: np.ndarray | None = None,
) -> dict:
    """Whether `candidate` may replace `base` on the val patients: their mean per-patient Dice does not drop and no
    patient `base` finds is missed (nnU-Net's habit: post-processing only where validation says it does not hurt)."""
    before = summarize(
        confusion_counts(base.apply_per_patient(predicted, patients, probabilities, images), masks), patients
    )
    after = summarize(
        confusion_counts(candidate.apply_per_patient(predicted, patients, probabilities, images), masks), patients
    )
    newly_missed = [
        a["patient"] for a, b in zip(before["per_patient"], after["per_patient"]) if a["detected"] and not b["detected"]
    ]
    dice_before, dice_after = before["aggregates"]["mean_patient_dice"], after["aggregates"]["mean_patient_dice"]
    kept = dice_after >= dice_before and not newly_missed
    why = (
        "val mean per-patient Dice did not drop and no val patient was lost"
        if kept
        else f"it would miss val patient(s) {', '.join(newly_missed)}"
        if newly_missed
        else "it lowered the val mean per-patient Dice"
    )
    return {
        "kept": kept,
        "why": why,
        "val_mean_patient_dice_before": dice_before,
        "val_mean_patient_dice_after": dice_after,
    }
