"""wsram_jax: the Wake-Sleep Recurrent Attention Model (Ba, Grosse, Salakhutdinov, Frey; NIPS 2015) in JAX."""

__version__ = "0.1.0"
