"""The attention classifier of the paper's Section 5.1 (translated and scaled MNIST).

* `model`: the attention network (`AttentionModel`), its one definition, with the equations in its docstring.
* `rollout`: M glimpse trajectories of one canvas under a proposal (`rollout`).
* `loss`: the rollout fed to the objective layer, with the sleep phase (`make_loss_fn`).
* `train`: configuration checks, the train step, evaluation, the whole run (`train_and_evaluate`).
"""
