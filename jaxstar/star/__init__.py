"""STaR (spec/star.md): rationale generation with rationalization, filtering, the bootstrap loop.

`rationales` holds the tasks and one generation pass with its fine-tuning set; `stage` is the
`star` stage, the resumable loop. Never imports `jaxstar.quietstar` (not even through another
module: it samples with `jaxstar.sampling` directly).
"""
