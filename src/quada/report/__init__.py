"""Reports: what a run saved, rendered as Markdown and self-contained HTML.

The compute modules (`quada.vet`, the analyses, the defense) measure and save their results; this
package only reads and draws them, and imports nothing above the measurement layers.

- :mod:`quada.report.render`: sections, and the page that holds them (``write_report``);
- :mod:`quada.report.vet`, :mod:`~quada.report.sweep`, :mod:`~quada.report.layers`,
  :mod:`~quada.report.clusters`: one module per results file, with its result dataclasses, its
  reader and its sections and figures; :mod:`quada.report.align`: the before/after comparison and
  the model card of `quada align`;
- :mod:`quada.report.story`: the page of a run folder, from every results file in it;
- :mod:`quada.report.format` and :mod:`quada.report.saved`: number formats and results-file readers
  shared by the above.

Importing the package itself loads nothing: the command line reads the number formats without
paying for matplotlib.
"""
