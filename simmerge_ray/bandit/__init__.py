"""The online bandit: Linear Thompson sampling over a frozen encoder, served by a Ray actor.

`lints` holds the math, `encoder` the context encoders, `state` the atomic on-disk state,
`core` the decision ledger, `actor` and `service` the Ray and HTTP plumbing, `simulate` the
replay simulator, `initial` the bandit a new state folder starts from.
"""
