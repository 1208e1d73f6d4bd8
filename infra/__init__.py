"""The AWS CDK app's constructs: storage, state, rounds and edge, composed by the stack.

Imports no torch: the core modules it reads (``sfl.core.config``, ``sfl.core.resources``,
``sfl.core.layout``) are the torch-free definitions shared with the Lambdas and the local mode.
"""
