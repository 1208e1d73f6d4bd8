"""The AWS CDK app's constructs: storage, state, rounds and edge, composed by the stack.

Imports no torch: the core modules it reads (``sfl.config``, ``sfl.resources``,
``sfl.layout``) are the torch-free definitions shared with the Lambdas and the local mode.
"""
