"""The verifier service: scores every sample of a RawGroup with math-verify in killable
worker processes and publishes the ScoredGroup to ``pope:scored``; ``POST /v1/verify``
scores answers ad hoc."""
