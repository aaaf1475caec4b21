"""Caption generation with multi-scale stochastic hard attention (paper Section 5.2).

Use: `--config=experiments/configs/captions.py:<variant>` with variant one of

    var, var_cv, wsram, wsram_cv, wsram_q, wsram_q_cv      as in Table 1 ("_cv" = control variates)
    quick                                                    wsram_q_cv, 1,500 steps (RESULTS.md section 4's budget)

The paper compares VAR with WS-RAM+q (Table 2, Figure 4) on Flickr8k. The default task is the offline
digit-caption task of `wsram_jax.captioning.data` (no download); `--config.data.task=flickr8k` with
`--config.data.flickr8k_json` and `--config.data.flickr8k_images` trains on Flickr8k instead. Values the paper
states: M = 5 samples (as in Sec. 5.1), Adam, a convolutional net whose layers are the scales, the inference
network given a word of the target. Everything else is ours.
"""
import ml_collections

from experiments.configs import mnist

VARIANTS = mnist.VARIANTS


def get_config(variant: str = "wsram_q_cv") -> ml_collections.ConfigDict:
  c = mnist.method_config(variant)  # the same methods as Table 1 (M = 5, as in Sec. 5.1)
  c.heuristics = ml_collections.ConfigDict(mnist.HEURISTICS_OFF)  # Sec. 4.5's heuristics off (RESULTS.md 4)

  c.model = ml_collections.ConfigDict()
  c.model.encoder = "conv_pyramid"
  c.model.encoder_channels = (8, 16, 32, 32)  # conv3x3-relu-maxpool blocks; the last num_scales are levels.
  c.model.num_scales = 3  # S pyramid levels (the scale action).
  c.model.encoder_weights = ""  # an .npz of pretrained encoder weights (captioning/encoders.py); '' = none.
  c.model.freeze_encoder = False
  c.model.feature_dim = 32
  c.model.read_size = 2  # a read_size x read_size grid of bilinear samples of the chosen level.
  c.model.embed_dim = 32
  c.model.hidden_size = 128  # LSTM width.
  c.model.glimpse_hidden = 64
  c.model.attention_hidden = 64
  c.model.context_dim = 64  # low-resolution context for the attention heads only; 0 = none.
  c.model.lowres_size = 8
  c.model.loc_std = 0.15
  c.model.learn_loc_std = False  # True: a state-dependent std, clipped to [min_loc_std, max_loc_std].
  c.model.min_loc_std = 0.01
  c.model.max_loc_std = 1.0
  c.model.head_init_scale = 0.1  # variance scale of the action heads' kernels.
  c.model.q_word = "target"  # target | previous: the word of the caption q sees (why target: RESULTS.md 4).

  c.data = ml_collections.ConfigDict()
  c.data.task = "digits"  # digits | flickr8k
  # digits: MNIST canvases (wsram_jax/captioning/data.py). num_digits=3 wants canvas_size=80.
  c.data.source = "offline"  # MNIST source: offline | idx | tfds
  c.data.data_dir = ""
  c.data.canvas_size = 64
  c.data.num_digits = 2
  c.data.small_min = 12
  c.data.small_max = 16
  c.data.large_min = 24
  c.data.large_max = 30
  c.data.test_seed = 0
  c.data.num_test = 1000
  c.data.eval_batch_size = 250
  # flickr8k: Karpathy's split file and the image folder (wsram_jax/captioning/flickr8k.py).
  c.data.flickr8k_json = ""
  c.data.flickr8k_images = ""
  c.data.image_size = 128
  c.data.max_words = 16
  c.data.min_word_count = 5

  c.bleu_smoothing = "method1"  # nltk SmoothingFunction method (wsram_jax/captioning/bleu.py).
  c.batch_size = 32
  c.learning_rate = 1e-3
  c.grad_clip_norm = 10.0
  c.num_steps = 10000  # Figure 4 shows the first 10,000 updates.

  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.diag_every = 0  # Gradient variance and ESS every this many updates; 0 turns them off.
  c.diag_num_estimates = 16  # K independent gradient estimates of one minibatch.
  c.jit = True
  c.mesh_devices = 1  # >1: data-parallel over a `data` mesh axis of that many devices.
  c.num_runs = 1  # >1: that many independent runs (seeds, swept values: c.runs) as one program.
  c.runs = mnist.runs_config()

  if variant == "quick":
    c.num_steps = 1500
    c.eval_every = 500
  return c
