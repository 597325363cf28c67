"""Entry point of verl's ``verl.plugins`` group (see pyproject.toml).

verl 0.9.1 imports every entry point of that group at the end of ``import verl``, in the driver and in every
Ray worker, and swallows any exception at debug level. So this module stays light, in this order:

1. the CPU backend, only when ``CALIBRL_DEVICE=cpu`` (its platform must exist before anything asks verl
   for the device; a no-op otherwise, so GPU runs never see it);
2. the CalibRL advantage estimator and policy losses, registered by name;
3. verl's file logger made resume-safe (``integration.tracking``: verl opens its JSONL with ``"wb"``, so a resumed
   run would erase the steps logged before the restart);
4. the CalibRL trainer, only in runs started by ``calibrl_verl.main_calibrl`` (``CALIBRL_REGISTER_TRAINER=1``,
   forwarded to Ray workers), because importing verl's trainer is heavy and only the Ray TaskRunner looks
   trainers up.

Code that needs the registrations also imports the modules directly, so a broken install fails loudly there.
"""

import os

from calibrl_verl import cpu

cpu.activate_if_requested()

from calibrl_verl.integration import registry, tracking  # noqa: E402, F401  (importing registry registers)

tracking.install()

if os.environ.get("CALIBRL_REGISTER_TRAINER") == "1":
    from calibrl_verl.integration import trainer  # noqa: F401  (import registers trainer_mode=calibrl)
