"""The conformance suite: any backend, ours or a third party's, measured against the reference.

Entry points: ``memcore verify`` (see :mod:`memcore.cli`), the pytest plugin
(``pytest --pyargs memcore.conformance --memcore-backend NAME``), and
:func:`memcore.conformance.runner.run_backend` from Python. Modules: ``tolerances`` (the
per-dtype table), ``compare`` (errors and where), ``checks`` (per-op checks),
``routing_checks`` (routing equivalences), ``runner``, ``report``, ``xfails``,
``selfcheck`` (the reference's own finite-difference table), ``broken`` (mutants for
the meta-tests). Importing this package imports nothing heavy: the plugin loads with
every pytest run.
"""

__all__: list[str] = []
