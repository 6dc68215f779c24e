"""``beit demo``: an application on top of the library, the whole pipeline on images shipped with beit.

:mod:`.plan` (what runs, the budget, the folders), :mod:`.run` (:class:`Demo`: the stages, each a ``beit``
command run through the runner it is handed), :mod:`.report` (the HTML page and the terminal summary, read
from the runs). Nothing in the library imports this package; the CLI's ``beit demo`` hands it the runner.
"""

from .plan import (
    CALIBRATION_STEPS,
    DEFAULT_METHOD,
    FINETUNE_RECIPE,
    LABELS_PER_CLASS,
    METHODS,
    SHARES,
    Plan,
    StageResult,
    make_plan,
    with_hidden,
)
from .report import MEASURED_SPREAD, method_name, summary_rows, summary_text, verdict, write_demo_report
from .run import Demo, Runner, run_demo, run_precisions

__all__ = ["CALIBRATION_STEPS", "DEFAULT_METHOD", "FINETUNE_RECIPE", "LABELS_PER_CLASS", "METHODS", "SHARES", "Demo",
           "Plan", "Runner", "StageResult", "make_plan", "method_name", "run_demo", "run_precisions", "summary_rows",
           "summary_text", "verdict", "with_hidden", "write_demo_report", "MEASURED_SPREAD"]
