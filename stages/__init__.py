"""DVC pipeline stages for the 7,776-parameter MNIST CNN."""

from stages.runtime import pin_from_params

# before any stage imports torch: the CPU instruction set and thread count that
# params.yaml's runtime section names (stages run from the repository root)
pin_from_params()
