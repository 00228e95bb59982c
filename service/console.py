"""One console line per trial event, instead of Tune's status table (which would list every config field)."""

from __future__ import annotations

from typing import Any

from ray import tune

from trainables.ray_trainable import NOT_RETRIED

SHOWN = ("val/balanced_acc", "val/top1", "val/recall_tail", "val/recall_min")


class TrialEvents(tune.Callback):
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"[sweep] start      {trial}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result
        if NOT_RETRIED in result:
            print(f"[sweep] failed     {trial}: {result[NOT_RETRIED]} (not retried)", flush=True)
            return
        step, iterations = int(result.get("step", 0)), trial.config["train"]["iterations"]
        verb = "finished" if step >= iterations else f"stopped at {step}/{iterations}"
        shown = ", ".join(f"{k}={result[k]:.4f}" for k in SHOWN if k in result)
        print(f"[sweep] {verb:10} {trial}  {shown}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"[sweep] failed     {trial}: see {trial.path}", flush=True)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"[sweep] retrying   {trial} from its last checkpoint", flush=True)
