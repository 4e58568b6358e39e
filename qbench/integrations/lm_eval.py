"""`qbench` as an lm-evaluation-harness model: a zoo model (or checkpoint path) quantized
in memory with a qbench scheme, evaluated by lm-eval's own HFLM machinery.

    lm_eval --model qbench --model_args model=tiny-vga,scheme=w8a8-dyn --tasks qbench_cloze

`pretrained=` (lm-eval's habit for its `hf` model) is accepted for `model=`.
lm-eval 0.4.13 discovers models only through its registry (no plugin entry points), so
`make setup` installs a one-line startup hook (`qbench.integrations.lm_eval_plugin`) that
registers the name `qbench` lazily, after lm-eval's own models, and adds qbench's task
folder to lm-eval's task index.  From Python, `qbench.integrations.lm_eval.register()`
does the same.
"""
from __future__ import annotations

from pathlib import Path

from lm_eval.models.huggingface import HFLM


class QBenchLM(HFLM):
    """model (or pretrained): zoo name or checkpoint path; scheme: qbench scheme name
    (default fp32); calibration_seed: for calibrated schemes; other arguments go to HFLM."""

    def __init__(self, model: str | None = None, scheme: str = "fp32", calibration_seed: int | None = None,
                 batch_size: int | str = 16, pretrained: str | None = None, **kwargs):
        if model is None and pretrained is None:
            raise TypeError("the qbench model needs model=<zoo name or checkpoint folder> (or pretrained=)")
        if model is not None and pretrained is not None and str(model) != str(pretrained):
            raise TypeError(f"model={model!r} and pretrained={pretrained!r} name different models; give one")
        model = model if model is not None else pretrained
        from qbench.data.calibration import calibration_source
        from qbench.device import place, resolve_device
        from qbench.plan import plan_cells
        from qbench.quant import quantize

        # the planner resolves the model (checked and hashed), the scheme (at this calibration
        # draw) and the model's own protocol, exactly as a `qbench bench` cell would
        try:
            seeds = [int(calibration_seed)] if calibration_seed is not None else None
            [planned] = plan_cells([str(model)], [scheme], ["ppl"], calibration_seeds=seeds)
        except (KeyError, ValueError, OSError) as err:  # an unknown model or scheme, a bad checkpoint
            _refuse(err)
        loaded, resolved, protocol = planned.model_ref.load(), planned.cell.scheme, planned.protocol
        # lm-eval's --device (or device= in model_args): the model, its quantizers and the
        # batches go there; HFLM then reads the device from the model.  lm-eval asks for
        # cuda by default; like its own HFLM, qbench then uses the CPU where CUDA is absent.
        import torch

        device = kwargs.pop("device", None)
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            import warnings

            warnings.warn(f"lm-eval asked for device {device!r}; no CUDA device here, running on the CPU")
            device = "cpu"
        place(loaded.model, resolve_device(device))
        calibration = calibration_source(protocol.corpus, loaded.tokenizer, protocol.window,
                                         bigram_backcopy=protocol.synthetic)
        self.qbench_quantization = quantize(loaded.model, resolved, calibration)
        self.qbench_model, self.qbench_scheme = loaded.name, resolved
        kwargs.pop("dtype", None)  # the model is already built
        max_length = getattr(loaded.model.config, "max_position_embeddings", None)
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size,
                         max_length=kwargs.pop("max_length", max_length), **kwargs)


def _refuse(err: Exception) -> None:
    """Under lm-eval's own command line (`lm_eval --model qbench ...`), which prints a
    traceback for any exception, a bad model or scheme is qbench's one line and exit code
    (README, exit codes); from Python the error is raised as it is."""
    import sys

    if "lm_eval" not in Path(sys.argv[0] if sys.argv else "").parts and \
            Path(sys.argv[0] if sys.argv else "").name not in ("lm_eval", "lm-eval"):
        raise err
    from qbench.cli import exit_code

    message = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
    print(f"lm_eval --model qbench: error: {' '.join(message.split())[:400]}", file=sys.stderr)
    raise SystemExit(exit_code(err)) from None


def register() -> None:
    """Register `qbench` in lm-eval's model registry (idempotent)."""
    import lm_eval.models  # noqa: F401  lm-eval's own models first (an empty registry hides them)
    from lm_eval.api.registry import model_registry

    if "qbench" not in model_registry:
        model_registry.register("qbench", target="qbench.integrations.lm_eval:QBenchLM")
