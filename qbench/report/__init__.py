"""Records -> pandas tables (the FP row and every scheme, same protocol), the headline
matrix, REPORT.md / REPORT.html / summary.csv and plots.

Reads records only: what a record says about its scheme and model (qbench.report.facts),
never the live scheme or arm registries, so it imports neither qbench.quant nor
qbench.modeling; the zoo's entries come from the caller (`zoo=`), and no torch loads.

  records    loading and selecting records, checkpoint labels
  facts      each record's scheme and model facts; the matrix's row and column order
  tables     per-model comparison tables (delta vs fp32 of the same protocol), probes, tasks
  matrix     the headline matrix, the first screen, the worst cells
  markdown   markdown tables
  plots      PNG plots and the matrix heatmap
  html_page  the self-contained HTML page
  writer     the report's sections and write_report
"""
from qbench.report.markdown import compact_markdown, markdown_table
from qbench.report.matrix import headline_matrix, matrix_table, matrix_values
from qbench.report.records import REFERENCE_SCHEME, EmptyReportError, label_checkpoints, select_records
from qbench.report.tables import comparison_table, cross_model_table, format_table
from qbench.report.writer import write_report

# what the cli, the study, scripts and bench use
__all__ = ["REFERENCE_SCHEME", "EmptyReportError", "compact_markdown", "comparison_table", "cross_model_table",
           "format_table", "headline_matrix", "label_checkpoints", "markdown_table", "matrix_table", "matrix_values",
           "select_records", "write_report"]
