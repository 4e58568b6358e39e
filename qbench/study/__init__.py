"""The study (`make study`, `qbench study`): results/STUDY.md from the result store and the
checkpoints' mechanism logs; `qbench study --compute` first runs the plan's missing cells.

- plan.py: reads the study's suite file (suites/study.yaml, through qbench.plan), `run_study`
- mechanism.py: part 1, Bigram-Backcopy curves and the copy circuit under quantization
- tables.py: parts 2-5, the quantization tables and plots
- published.py: the papers' numbers; claims.py: the claims table and the headline per arm
- verdict.py: the one verdict rule every claims row and headline verdict goes through
- answer.py: the three sentences under the title; provenance.py: how each checkpoint was trained
- prose.py: the discussion and README results text, filled from named values
- writer.py: STUDY.md, section by section (a registry: `SECTIONS`)
- retrofit.py: the retrofit section (arms fine-tuned into SmolLM2) from the records;
  retrofit_experiment.py: issue 32's experiment (H1, H2: trained control, clamp and repair)
- kv.py: the KV-cache section (each arm's cache quantized) from the records
"""
from qbench.study.mechanism import bb_quant_tables, bb_records_frame, mechanism_logs, mechanism_plot, mechanism_table
from qbench.study.plan import StudyPlan, plan, run_study
from qbench.study.tables import (arm_table, degradation_plot, extreme_token_table, more_text_table, ptq_table,
                                 split_protocols)
from qbench.study.writer import write_study

__all__ = ["StudyPlan", "arm_table", "bb_quant_tables", "bb_records_frame", "degradation_plot", "extreme_token_table",
           "mechanism_logs", "mechanism_plot", "mechanism_table", "more_text_table", "plan", "ptq_table", "run_study",
           "split_protocols", "write_study"]
