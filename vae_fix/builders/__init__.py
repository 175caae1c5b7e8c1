"""Builders of VAEs with known properties, for the demo and the tests: real models in real layouts
(random, smooth, or with a planted log-variance hole at a known cell). Never used on a user's VAE."""
