"""Entry points that other tools call into: qbench as an lm-evaluation-harness model
(`lm_eval`, `lm_eval_plugin`).  The top floor beside the CLI: these plan and quantize as a
`qbench bench` cell does, so nothing below imports them."""
