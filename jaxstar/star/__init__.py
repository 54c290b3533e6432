"""STaR (spec/star.md): rationale generation with rationalization, filtering, the bootstrap loop.

`rationales` is one generation pass and its fine-tuning set. Never imports `jaxstar.quietstar`.
"""
