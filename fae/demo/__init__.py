"""`fae demo`: the method end to end on Fashion-MNIST, on a CPU, in minutes, with an HTML report.

`steps.py` holds the steps (each writes `<out>/<step>/` and a `done.json`; re-running skips finished steps, a
half-finished training step resumes from its checkpoint), `run.py` runs them with a time estimate, `report.py`
writes the report, `html.py` is the small HTML/plot toolkit it uses.
"""
from fae.demo.run import (
                          BUDGET_SECONDS,
                          REFERENCE_CALIBRATION,
                          REFERENCE_SECONDS,
                          Forecast,
                          calibration_step_seconds,
                          run_demo,
)
from fae.demo.steps import PROFILES, STEPS, DemoContext, Step, step_classifier, step_encoder

__all__ = ["BUDGET_SECONDS", "PROFILES", "REFERENCE_CALIBRATION", "REFERENCE_SECONDS", "STEPS", "DemoContext", "Forecast",
           "Step", "calibration_step_seconds", "run_demo", "step_classifier", "step_encoder"]
