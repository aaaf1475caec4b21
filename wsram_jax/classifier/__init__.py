"""The attention classifier of the paper's Section 5.1 (translated and scaled MNIST).

* `model`: the attention network (`AttentionModel`), its one definition, with the equations in its docstring.
* `rollout`: M glimpse trajectories of one canvas under a proposal (`rollout`).
* `loss`: the rollout fed to the objective layer, with the sleep phase (`make_loss_fn`).
* `train`: the classifier as a task of the training core (`TASK`: its config checks, data, sampler, evaluation),
  and its entry points (`train_and_evaluate`, `make_train_step`, `restore_state`, ...).
* `pretrained`: a trained classifier as one checked file (`load`, `save`, `evaluate`); the shipped model.
* `inspection`: gradient estimates of any estimator at fixed parameters, from samples the estimators share.
"""
