"""Analysis of a sweep's run dir: Pareto fronts, curves, importance, a self-contained report.

Reads only the result files of a run dir (``aerl_ray.results.RunDir``), never logs.

- :mod:`analysis.pareto`  loading, metric selection, dominance, hypervolume, the CLI
- :mod:`analysis.plots`   matplotlib figures (Agg backend)
- :mod:`analysis.report`  ``write_report(run_dir) -> ReportResult`` and the HTML page

Public names: ``analysis.pareto.AnalysisError``, ``analysis.report.write_report``.
(Nothing is imported here so that ``python -m analysis.pareto`` runs cleanly.)
"""
