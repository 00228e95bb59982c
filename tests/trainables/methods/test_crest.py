"""CReST's selection and CReST+'s progressive alignment on hand-computed tensors, the grown labeled store, and
`fixmatch_crest` / `fixmatch_crest_plus` inside the real loop (generations, restarts, resume)."""

import numpy as np
import pytest
import torch

from tests.trainables.methods.test_methods_in_loop import (
    _restore_global_torch_settings,  # noqa: F401  (autouse fixture)
    assert_resume_equals_whole_run,
    assert_same_tensors,
    assert_truth_never_reaches_training,
    data,  # noqa: F401  (fixture)
    tiny_config,
    trajectory,
)
from trainables.batches import GrownStore, ImageStore
from trainables.config import ConfigError, RunConfig, load_config
from trainables.evaluate import Window
from trainables.loop import train
from trainables.methods.crest import (
    EPS,
    ProgressiveAlignment,
    align_distribution,
    progressive_temperature,
    select_confident,
    selection_rates,
)


def test_selection_rates_mirror_the_frequency_ranks():
    """(N_k / N_1)^(1/3) = 1, 2/3, 1/3 for counts 27, 8, 1; the head class takes the tail's rate and back."""
    torch.testing.assert_close(
        selection_rates(torch.tensor([27, 8, 1]), 3.0), torch.tensor([1 / 3, 2 / 3, 1.0], dtype=torch.float64)
    )
    # classes not sorted by frequency: ranks decide, not positions
    torch.testing.assert_close(
        selection_rates(torch.tensor([1, 27, 8]), 3.0), torch.tensor([1.0, 1 / 3, 2 / 3], dtype=torch.float64)
    )


def test_select_confident_by_hand():
    """Predicted 0: rows 0, 1, 3, 4 (confidences 0.9, 0.6, 0.95, 0.7), rate 0.5 -> int(2) most confident: 3, 0.
    Predicted 1: row 2, rate 1 -> row 2. A class whose int(rate n) is 0 adds nothing."""
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.95, 0.05], [0.7, 0.3]])
    idx, labels = select_confident(probs, torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert idx.tolist() == [3, 0, 2] and labels.tolist() == [0, 0, 1]
    idx, labels = select_confident(probs, torch.tensor([0.2, 0.9], dtype=torch.float64))  # int(0.8) = int(0.9) = 0
    assert idx.tolist() == [] and labels.tolist() == []


def test_progressive_temperature():
    assert [progressive_temperature(g, 5, 0.5) for g in range(1, 6)] == [1.0, 0.875, 0.75, 0.625, 0.5]
    assert progressive_temperature(1, 1, 0.5) == 1.0


def test_align_distribution_by_hand():
    """A uniform prediction under a uniform running mean becomes the target raised to t, renormalised."""
    p, mean = torch.tensor([[0.5, 0.5]]), torch.tensor([0.5, 0.5])
    target = torch.tensor([0.8, 0.2])
    torch.testing.assert_close(align_distribution(p, target, mean, 1.0), torch.tensor([[0.8, 0.2]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        align_distribution(p, target, mean, 0.5), torch.tensor([[2 / 3, 1 / 3]]), atol=1e-5, rtol=0
    )
    # a running mean leaning to class 0 pushes toward class 1: p (pi + eps) / (p_bar + eps), renormalised
    got = align_distribution(torch.tensor([[0.6, 0.4]]), torch.tensor([0.5, 0.5]), torch.tensor([0.75, 0.25]), 1.0)
    raw = torch.tensor([0.6 * (0.5 + EPS) / (0.75 + EPS), 0.4 * (0.5 + EPS) / (0.25 + EPS)])
    torch.testing.assert_close(got, (raw / raw.sum()).view(1, 2))


def test_progressive_alignment_keeps_the_last_batches_means():
    """queue 2: after batches with means m1, m2, m3 the running mean is (m2 + m3) / 2; the temperature follows the
    generation of the step (K = 8 in 2 generations: step 4 is generation 2, t = t_min)."""
    da = ProgressiveAlignment(
        torch.tensor([1, 1]), torch.device("cpu"), iterations=8, generations=2, t_min=0.5, queue=2
    )
    batches = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, 1.0]])]
    for step, b in enumerate(batches):
        out = da(b, None, None, step)
    torch.testing.assert_close(da.means.sum(0) / da.filled, torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(out.probs, align_distribution(batches[2], da.target, torch.tensor([0.25, 0.75]), 1.0))
    assert float(da(batches[0], None, None, 4).logs["da_t"]) == 0.5


def test_grown_store_serves_base_then_picked_images():
    base_images = np.arange(3).reshape(3, 1, 1, 1).repeat(3, axis=3).astype(np.uint8)
    other_images = (10 + np.arange(4)).reshape(4, 1, 1, 1).repeat(3, axis=3).astype(np.uint8)
    cpu = torch.device("cpu")
    store = GrownStore(ImageStore(base_images, cpu, True), ImageStore(other_images, cpu, False), torch.tensor([3, 0]))
    assert len(store) == 5
    assert store.gather(torch.tensor([4, 0, 3, 2]))[:, 0, 0, 0].tolist() == [10, 0, 13, 2]
    assert store.gather(torch.tensor([1]))[:, 0, 0, 0].tolist() == [1]
    assert store.gather(torch.tensor([3]))[:, 0, 0, 0].tolist() == [13]


def test_generations_must_divide_the_iterations():
    with pytest.raises(
        ConfigError, match=r"train.iterations \(100\) must be a multiple of method.crest.generations \(3\)"
    ):
        load_config(None, ["train.iterations=100", "method.preset=fixmatch_crest", "method.crest.generations=3"])


def crest_config(preset: str, generations: int) -> RunConfig:
    raw = tiny_config("fixmatch").model_dump()
    raw["method"] = {"preset": preset, "crest": {"generations": generations}}
    if preset == "fixmatch_crest_plus":
        raw["method"]["da"] = {"queue": 5}
    return RunConfig.model_validate(raw)


@pytest.mark.parametrize("preset, generations", [("fixmatch_crest", 4), ("fixmatch_crest_plus", 3)])
def test_crest_presets_resume_bit_exactly(tmp_path, data, preset, generations):  # noqa: F811
    """24 iterations: 4 generations of 6 (the step-8 checkpoint is mid-generation 2: the resumed run trains on the
    selection restored from the checkpoint) or 3 of 8 (the checkpoint falls on the boundary: the selection happens
    after resuming). The learning-rate schedule restarts each generation; the labeled set grows."""
    cfg = crest_config(preset, generations)
    assert_resume_equals_whole_run(cfg, tmp_path, data)
    rows = trajectory(tmp_path / "whole")
    labeled = [sum(row[f"crest/labeled/c{c:02d}"] for c in range(4)) for row in rows]
    # the step-8 evaluation ends generation 1 of 3 (nothing added yet) or is inside generation 2 of 4 (one made)
    assert (labeled[0] == len(data.labeled.labels)) == (generations == 3)
    assert labeled[-1] > len(data.labeled.labels)
    if preset == "fixmatch_crest_plus":
        assert [row["train/da_t"] for row in rows] == [1.0, 0.75, 0.5]


def test_crest_restarts_the_model_and_schedule_each_generation(tmp_path, data):  # noqa: F811
    """With a cosine schedule over generations of 8 iterations, every evaluation (the last step of a generation)
    reports the schedule's last value for K = 8, not for K = 24."""
    raw = crest_config("fixmatch_crest", 3).model_dump()
    raw["optim"]["schedule"] = "cosine"
    cfg = RunConfig.model_validate(raw)
    train(cfg, tmp_path, progress=False, data=data)
    from trainables.loop import lr_at

    assert [row["train/lr"] for row in trajectory(tmp_path)] == [lr_at(7, 8, cfg.optim)] * 3


def test_a_new_generation_starts_from_a_fresh_model_on_the_grown_set(data):  # noqa: F811
    """At the first step of generation 2 the model is a newly built one (the weights a fresh build_model gives
    from the same generator state), the EMA and optimiser are new, and the labeled set holds the selection."""
    from trainables.loop import Run, resolve_runtime
    from trainables.models import build_model

    cfg = crest_config("fixmatch_crest", 3)
    run = Run(cfg, data, resolve_runtime(cfg))
    window = Window()
    for _ in range(8):
        run.train_step(window)
    old_model, old_optimizer = run.model, run.optimizer
    state = torch.get_rng_state()
    fresh = build_model(cfg.model, data.num_classes).state_dict()
    torch.set_rng_state(state)
    run._new_generation()
    assert run.model is not old_model and run.optimizer is not old_optimizer and not run.optimizer.state
    assert_same_tensors(run.model.state_dict(), fresh)
    assert_same_tensors(run.ema.module.state_dict(), fresh)
    picks, labels = run.method.extension.additions()
    assert len(picks) > 0 and len(run.lb_store) == len(data.labeled.labels) + len(picks)
    assert torch.equal(run.y_lb[len(data.labeled.labels) :], labels)


def test_crest_never_reads_the_unlabeled_truth(tmp_path, data):  # noqa: F811
    cfg = crest_config("fixmatch_crest_plus", 3)
    assert_truth_never_reaches_training(cfg, tmp_path, data)
