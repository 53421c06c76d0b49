"""``python -m hs_star_pl fit|validate|test ...``: the same as the ``hs-star`` script.

The stop handler goes in before the heavy imports (a SIGTERM while they run is a stop
request too), and nothing is imported outside the ``__main__`` guard: spawned worker
processes (answer checks) import this module again and need none of it.
"""

if __name__ == "__main__":
    from hs_star_pl.infra import preemption

    preemption.install()
    from hs_star_pl.cli import main

    main()
