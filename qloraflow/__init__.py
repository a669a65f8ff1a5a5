"""qloraflow: a raw instruction dataset in, a served QLoRA fine-tuned LLM out.

The library holds all the logic, one module per stage (``data``, ``tokenize``, ``train``,
``evaluate``, ``merge``, ``serve``, ``registry``) and never imports flytekit; ``tasks/`` and
``workflows/`` wrap it for Flyte.
"""

__version__ = "0.1.0"
