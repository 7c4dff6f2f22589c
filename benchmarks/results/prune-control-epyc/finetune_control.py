"""Control: the unpruned base fine-tuned exactly as `lggdeploy prune --ratio 0.35 --finetune-epochs 10 --lr 3e-4` fine-tunes
its pruned model (prune_checkpoint's finetune: same TrainConfig, teacher = the base, distill weight 0.5), without the pruning."""

from pathlib import Path

from lggdeploy.models.checkpoint import load_checkpoint
from lggdeploy.models.train import TrainConfig, train

base = Path("benchmarks/runs/s18/base/best.pt")
ckpt = load_checkpoint(base)
result = train(
    TrainConfig(
        model=ckpt["model"]["name"],
        data=Path("../shared/data/kaggle_3m"),
        out=Path("benchmarks/runs/s18/control/stage1"),
        epochs=10,
        batch_size=8,
        lr=3e-4,
        img_size=ckpt["img_size"],
        device="auto",
        init_checkpoint=base,
        teacher=base,
        distill_weight=0.5,
        missing_modality=float(ckpt.get("train_config", {}).get("missing_modality", 0.0)),
    )
)
print(result.best_path, result.best)
