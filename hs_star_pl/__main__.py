"""``python -m hs_star_pl fit|validate|test ...``: the same as the ``hs-star`` script."""

from hs_star_pl.cli import main

if __name__ == "__main__":
    main()
