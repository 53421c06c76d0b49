"""``hs-star`` and ``python -m hs_star_pl fit|validate|test ...``: the command line's entry point.

``hs-star`` / ``hs-star --help`` answer from this module alone, without importing torch or
Lightning (seconds, not the half minute the full parser's imports take on a loaded machine);
every other command line goes to ``hs_star_pl.cli.main``. The stop handler goes in before the
heavy imports, and a SIGTERM while they run stops the process at once (they take seconds on a
busy machine, and nothing has been written yet); nothing is imported outside the ``__main__``
guard or ``main``: spawned worker processes (answer checks) import this module
again and need none of it.
"""


def short_help() -> str:
    """The top-level help: what the tool is, its commands, the demo command and where to go next."""
    from hs_star_pl import COMMANDS, DEMO, DESCRIPTION, PROG

    width = max(len(name) for name in COMMANDS) + 2
    lines = [f"usage: {PROG} [-h] {{{','.join(COMMANDS)}}} -c CONFIG.yaml [-c MORE.yaml] [--dotted.key value]", "",
             DESCRIPTION, f"The demo: {DEMO}", "", "commands:"]
    lines += [f"  {name:<{width}}{text}" for name, text in COMMANDS.items()]
    lines += ["", "options:",
              "  -h, --help  show this help and exit",
              "", f"A command's options: {PROG} fit --help. The merged config: {PROG} fit -c FILE --print_config.",
              "Configs: configs/ (the demo: configs/tiny/hs_star.yaml); docs: docs/ and README.md."]
    return "\n".join(lines) + "\n"


def main(args: list[str] | None = None) -> None:
    """``hs-star``: the short help without heavy imports, else the full CLI (``hs_star_pl.cli.main``)."""
    import sys

    argv = sys.argv[1:] if args is None else list(args)
    if argv in ([], ["-h"], ["--help"]):
        sys.stdout.write(short_help())
        if not argv:  # no command: as argparse does, a usage error
            sys.stderr.write("hs-star: error: name a command: fit, validate or test (hs-star fit --help)\n")
            raise SystemExit(2)
        return
    from hs_star_pl.infra import preemption

    preemption.install()
    preemption.begin_startup()  # the handler raises where the imports are
    try:
        from hs_star_pl.cli import main as cli_main
    except preemption.Preempted as stop:
        print(f"hs-star: stopped by {preemption.signal_name(stop.signum)} while starting; nothing was written. "
              "Run the same command again (with --ckpt_path last to resume a run).", file=sys.stderr, flush=True)
        raise SystemExit(stop.exit_code) from None

    cli_main(args)


if __name__ == "__main__":
    main()
