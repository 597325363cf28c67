"""calibrl-verl: CalibRL (expert-calibrated hybrid-policy RLVR, ICLR 2026) on verl 0.9.1.

Layout: ``core_algos`` is the pure math (torch only); ``integration`` is the verl glue (registries,
trainer, actor loss, expert data-source hook); ``reward``, ``data``, ``evaluate`` are the researcher's tools.
This module stays import-light: verl loads ``calibrl_verl.plugin`` while verl itself is importing.
"""

__version__ = "0.1.0"
VERL_VERSION = "0.9.1"  # the verl release every seam in `integration` was written against
