"""Entry point of verl's ``verl.plugins`` group (see pyproject.toml).

verl 0.9.1 imports every entry point of that group at the end of ``import verl``, in the driver and in every
Ray worker, and swallows any exception at debug level. So this module must stay light and must not fail:
it only registers the CalibRL advantage estimator and policy losses by name. Code that needs them (our
trainer entry point) imports ``calibrl_verl.integration.registry`` directly as well, so a broken install
fails loudly there instead of silently here.
"""

from calibrl_verl.integration import registry  # noqa: F401  (import registers)
