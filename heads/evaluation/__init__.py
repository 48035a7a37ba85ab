"""Evaluation: similarity matrices of stage-one heads, post-processing (DSL, QB-Norm), re-ranking of
stage one's top K by a stage-two head, external stage ones; the ranking code is torch-free."""
