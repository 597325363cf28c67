"""The toy-scale study: GRPO vs CalibRL (and variants) on the tiny multimodal task, on CPU.

``grid`` runs the grid of methods x seeds with the real recipe (resumable); ``report`` turns the runs' logs into
the plots and table of ``docs/toy_study/``. The wrapper script is ``examples/toy_study/run_study.sh``.
"""
