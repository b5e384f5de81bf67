"""The lean trainer: ``python -m fastlab.train``.

One module per concern; :func:`fastlab.train.loop.train` only wires them, top to bottom:

- ``config``: typed sections validated on creation; the ``task`` section is the selected
  task's own dataclass (``task.name`` picks a registered task or ``package.module:Class``).
- the task (``fastlab.tasks``): device batches from (seed, step), ``loss(model, batch)``
  returning the summed loss, its count and named sub-losses, ``evaluate``, curriculum.
- ``stepper``: precision, compile, token-weighted accumulation, the skip flag handed to the
  optimizer (``AdamW.step(grad_scale=, found_inf=)``; torch's fused AdamW through torch's
  amp protocol), and the whole step captured in one CUDA graph and replayed.
- ``guard``: spike detection on the device, snapshot and in-place rollback with lr back-off.
- ``checkpoint``, ``logger``, ``telemetry``, ``distributed``, ``environment``.

Where this differs from the design card: the trainer's step counter, lr and the log
window's sums live on the device (so the step can be captured); the loss scale for fp16 is
the stepper's own device-side scaler rather than ``torch.amp.GradScaler``, whose Python
bookkeeping a captured step would not replay.
"""
