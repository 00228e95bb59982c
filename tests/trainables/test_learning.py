"""A short run on the synthetic long-tailed set learns: clearly above chance on the balanced test split."""

from trainables.config import load_config
from trainables.loop import train

SHORT = [
    "data.synthetic.num_classes=4", "data.synthetic.image_size=16", "data.synthetic.pool_per_class=400",
    "data.synthetic.test_per_class=100", "data.n1=200", "data.m1=150", "data.gamma_l=4", "model.depth=10",
    "model.widen=1", "model.bn_momentum=0.1", "train.ema_decay=0.9", "optim.lr=0.1", "train.iterations=500",
    "train.eval_every=250", "train.batch_size=32", "train.mu=1", "train.device=cpu",
]  # fmt: skip


def test_short_synthetic_run_beats_chance_clearly(tmp_path):
    """4 classes (chance 25 %), gamma 4, 500 iterations: balanced test accuracy must exceed 40 %."""
    final = train(load_config(None, SHORT), tmp_path, progress=False)
    assert final["test/balanced_acc"] > 0.40, final["test/balanced_acc"]
