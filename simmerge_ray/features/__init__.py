"""Similarity features of model pairs: structural (weights, `structural`) and, from a sibling
module, functional (probe outputs). The pure math lives in `gram_math`, the module naming in
`module_groups`; import the Ray pass from `simmerge_ray.features.structural`."""
