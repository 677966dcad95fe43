"""The model client's core: prices, token counts, rate limits, output schemas, cost estimates.

Kept apart from the ``openai.transform`` step so that the CLI (``automator costs``,
``automator run --dry-run``) and other model steps can use the same arithmetic.
"""
