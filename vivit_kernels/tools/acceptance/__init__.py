"""``vivit-kernels acceptance``: the first thing to run on a GPU, in one bounded command (see ``run``'s docstring
for the sections and their budget). ``run``: the plan, the budget and its steps; ``command``: the arguments and the
run of the sections; ``checks``: environment, correctness, per-op speed; ``seed``: the seed's tables, predict end to
end, what auto chose; ``report``: report.md, bench/results/ and the README section."""

from .checks import section_correctness, section_environment, section_ops, versions
from .command import add_arguments, execute, run_cli
from .report import (
                     FORMAT,
                     README_BEGIN,
                     README_END,
                     RESULTS_DIR,
                     default_out_dir,
                     gpu_slug,
                     newest_results,
                     readme_section,
                     render_report,
                     update_readme,
)
from .run import (
                     DEFAULT_BUDGET_S,
                     DRY_PLAN,
                     GPU_PLAN,
                     SECTION_ENDS,
                     SECTIONS,
                     Acceptance,
                     Plan,
                     ops_dtype,
)
from .seed import peak_memory_mb, section_auto, section_seed, seed_step

__all__ = ["Acceptance", "DEFAULT_BUDGET_S", "DRY_PLAN", "FORMAT", "GPU_PLAN", "Plan",
           "README_BEGIN", "README_END", "RESULTS_DIR", "SECTIONS", "SECTION_ENDS", "add_arguments",
           "default_out_dir", "execute", "gpu_slug", "newest_results", "ops_dtype",
           "peak_memory_mb", "readme_section", "render_report", "run_cli", "section_auto", "section_correctness",
           "section_environment", "section_ops", "section_seed", "seed_step", "update_readme", "versions"]
