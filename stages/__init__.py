"""DVC pipeline stages for the 7,776-parameter MNIST CNN.

Importing a stage changes nothing in the process: each stage's main() applies
params.yaml's runtime section itself (stages/runtime.py).
"""
