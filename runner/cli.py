"""The ``runner`` console script's entry point, kept free of imports.

multiprocessing's ``spawn`` re-runs the parent's main *script* in every child it starts. The
script pip generates for ``runner`` imports its entry point at top level, so with
``runner.app:main`` every worker imported the whole Hydra app (hydra, omegaconf, the
planner: ~0.3 s of CPU each) before doing anything. Pointing the script here, each worker
imports only this file; the app is imported when :func:`main` runs, in the controller.
(``python -m runner`` never had the problem: spawn does not re-run a package's __main__.)
"""


def main() -> None:
    from runner.app import main as app_main

    app_main()
