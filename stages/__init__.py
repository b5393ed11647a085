"""DVC pipeline stages for the 7,776-parameter MNIST CNN."""
