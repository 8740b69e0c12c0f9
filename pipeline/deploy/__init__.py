"""What leaves nps as a network, and the tools that load and run one: exports (``export``, their ``preprocessing``,
``onnx_export``), their re-evaluation (``verify``) and measured latency (``latency``).

This layer sits above training (it builds, prunes and runs networks with torch) and above results/ (it reads
results files); results/ never imports it, so ``nps status``, ``nps report`` and ``nps table`` need no torch.
"""
