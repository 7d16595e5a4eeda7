"""f_plan: the learned operator selector (model, training on Ray Train, search on Ray Tune, evaluation)."""
