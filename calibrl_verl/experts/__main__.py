"""``python -m calibrl_verl.experts generate ...`` (see ``calibrl_verl.experts.cli``)."""

from calibrl_verl.experts.cli import main

if __name__ == "__main__":
    main()
